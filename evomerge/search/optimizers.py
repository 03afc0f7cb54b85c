"""Optimizers behind one ask/tell interface, over the unit box [0, 1]^d.

The search maps the unit box onto a genome's bounds; optimizers never see parameter names. Every
optimizer is deterministic given its seed and the order of ask/tell calls, and draws from its own
random generator (lm-eval reseeds the global ones), which is what makes journal replay an exact
resume (see ``evomerge.search.study``).

- ``random``: uniform sampling, the baseline.
- ``cma``: pycma CMA-ES with box bounds, population size, sigma0, and IPOP/BIPOP restarts. Asks do not
  wait for a generation: once a generation's points are all out, further asks draw from the current
  distribution; a generation is told as soon as ``popsize`` results are in (in arrival order).
  Optional noise handling (``noise: true``), after Hansen et al. 2009 (UH-CMA-ES, as pycma's
  NoiseHandler measures it) but asynchronous: each point is evaluated ``evaluations`` times
  (*replicates*: the same genes, a different merge seed, so random drop masks differ) and told as
  the median; after each told generation a few of its points are re-evaluated with fresh replicates;
  when those are in, the rank changes they cause measure the noise. Noise raises sigma and the
  number of replicates (up to ``noise_max_evaluations``); no noise lowers the replicates back to 1.
- ``tpe``, ``nsga2``, ``nsga3``, ``gp``, ``cmaes``, ``optuna-random``: Optuna samplers; the
  multi-objective ones (tpe, nsga2, nsga3, gp, optuna-random) receive the objective vector, the others
  a weighted sum.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.objectives import Objective


def scalarize(values: Sequence[float], objectives: Sequence[Objective]) -> float:
    """The weighted sum to *minimize*: maximized objectives enter negated."""
    return float(sum(o.weight * (-v if o.direction == "maximize" else v) for v, o in zip(values, objectives)))


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Optimizer:
    """ask() -> a point of [0, 1]^dim; tell(point, values or None for a failure).

    ``options`` is the optimizer's own options model (``Options``), validated at the edge."""

    name = "base"
    multi_objective = False
    Options: type[BaseModel] = NoOptions

    def __init__(self, dim: int, objectives: Sequence[Objective], seed: int, options: BaseModel | None = None):
        if dim < 1:
            raise ValueError("the genome has no searched gene")
        self.dim, self.objectives, self.seed = dim, list(objectives), seed
        self.options = options if options is not None else self.Options()
        self.categories = [0] * dim

    def use_categories(self, categories: Sequence[int]) -> None:
        """Per dimension, the number of choices of a categorical gene (0: continuous). The unit
        interval is cut into that many equal cells; the optimizers that can sample a category do."""
        self.categories = list(categories)

    def enqueue(self, x: Sequence[float]) -> None:
        """Make ``x`` (a known recipe's point) the next ask."""
        self._enqueued = [*getattr(self, "_enqueued", []), [float(v) for v in x]]

    def ask(self) -> list[float]:
        return self.ask_replicate()[0]

    def ask_replicate(self) -> tuple[list[float], int]:
        """The next point and its replicate number: 0, or k > 0 for the k-th re-evaluation of a point
        already asked (to be evaluated with a different random seed)."""
        queued = getattr(self, "_enqueued", [])
        return (queued.pop(0), 0) if queued else (self._ask(), 0)

    def _ask(self) -> list[float]:
        raise NotImplementedError

    def tell(self, x: Sequence[float], values: Sequence[float] | None) -> None:
        raise NotImplementedError


class RandomSearch(Optimizer):
    name = "random"
    multi_objective = True

    def __init__(self, dim, objectives, seed, options=None):
        super().__init__(dim, objectives, seed, options)
        self.rng = np.random.default_rng(seed)

    def _ask(self):
        return self.rng.random(self.dim).tolist()

    def tell(self, x, values):
        pass


class CMAOptions(BaseModel):
    #: strict: a file's "8" or true is not a population size; no NaN or infinity anywhere
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    #: Points per generation (default 4 + 3 ln d, pycma's); pycma allocates per point at once.
    popsize: int | None = Field(default=None, ge=2, le=10_000)
    #: Initial step size in units of the unit box (range / 6, a common rule; 0.25 measured ~1.6x
    #: slower on a 56-gene bowl).
    sigma0: float = Field(default=1 / 6, gt=0, le=1)
    #: Restarts after pycma's stopping criteria, with a larger (ipop) or alternating (bipop) population.
    restarts: int = Field(default=0, ge=0, le=100)
    restart_strategy: Literal["ipop", "bipop"] = "ipop"
    tolfun: float = Field(default=1e-11, ge=0)
    #: Noise handling: replicates per point and re-evaluations (see the module docstring).
    noise: bool = False
    noise_max_evaluations: int = Field(default=5, ge=1, le=100)  # replicates per point, listed at once
    noise_reevals: int | None = Field(default=None, ge=0, le=10_000)
    #: Where the search starts: the middle of the box, or (``best_seed``) the best of the seeds
    #: once they are all scored, e.g. an expert's own layer path in a path space, whose middle is a
    #: random path. Candidates asked before the seeds were all in belong to the middle start.
    start: Literal["middle", "best_seed"] = "middle"


class CMA(Optimizer):
    """pycma CMA-ES on the weighted sum; failed points are told as worse than anything seen."""

    name = "cma"
    Options = CMAOptions

    def __init__(self, dim, objectives, seed, options=None):
        super().__init__(dim, objectives, seed, options)
        self.rng = np.random.default_rng(seed)
        self.default_popsize = self.options.popsize or 4 + int(3 * math.log(dim))
        self.runs = 0
        self.budget = {"large": 0, "small": 0}
        self.large_popsize = self.default_popsize
        self.worst = None
        self.noise = None
        if self.options.noise:
            import cma

            # pycma's measurement (rank-change statistic) and treatment (sigma and evaluations update);
            # which points to re-evaluate is chosen here, from our generator (pycma's draws on the global one)
            self.noise = cma.NoiseHandler(
                dim, maxevals=[1, 1, self.options.noise_max_evaluations], reevals=self.options.noise_reevals, epsilon=0
            )
        self._seeds: list[tuple[float, ...]] = []  # enqueued points, for ``start: best_seed``
        self._seed_results: list[tuple[list[float], float]] | None = [] if self.options.start == "best_seed" else None
        self._start(self.default_popsize, self.options.sigma0, "large")

    def enqueue(self, x) -> None:
        super().enqueue(x)
        self._seeds.append(tuple(float(v) for v in x))

    def _start(self, popsize: int, sigma0: float, regime: str, x0: list[float] | None = None) -> None:
        import cma

        self.regime = regime
        opts = {
            "bounds": [0.0, 1.0],
            "popsize": popsize,
            "seed": int(self.rng.integers(1, 2**31 - 1)),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolfun": self.options.tolfun,
            "randn": lambda *shape: self.rng.standard_normal(shape),
        }
        if x0 is None:
            x0 = self.rng.random(self.dim).tolist() if self.runs else [0.5] * self.dim
            self.runs += 1
        self.es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
        self.queue: list[list[float]] = []
        self.results: list[tuple[list[float], float]] = []
        self.slots: list[tuple[list[float], int]] = []  # noise mode: (point, replicate) still to hand out
        self.open: dict[tuple, dict] = {}  # noise mode: point -> its replicates' values so far
        self._asked_since_tell = False

    def _ask(self):
        if not self.queue:
            self._draw()
        return self.queue.pop(0)

    def ask_replicate(self):
        if self.noise is None or getattr(self, "_enqueued", None):
            return super().ask_replicate()
        if not self.slots:
            self._draw()
            n = int(self.noise.evaluations)
            for x in self.queue:
                self.open[tuple(x)] = {"values": [], "need": n}
                self.slots.extend((x, j) for j in range(n))
            self.queue = []
        return self.slots.pop(0)

    def _draw(self) -> None:
        self.queue.extend(list(map(float, x)) for x in self.es.ask())
        self._asked_since_tell = True

    def tell(self, x, values):
        if values is None or not all(math.isfinite(v) for v in values):
            f = (self.worst if self.worst is not None else 0.0) + 1.0
        else:
            f = scalarize(values, self.objectives)
            self.worst = f if self.worst is None else max(self.worst, f)
        if self._seed_results is not None and tuple(float(v) for v in x) in self._seeds:
            self._seed_results.append((list(x), f))
            if len(self._seed_results) == len(self._seeds):  # every seed is in: start at the best
                best = min(self._seed_results, key=lambda r: r[1])[0]
                self._seed_results = None
                self._start(self.default_popsize, self.options.sigma0, "large", x0=best)
            return
        if self.noise is not None and tuple(x) in self.open:
            rec = self.open[tuple(x)]
            rec["values"].append(f)
            if len(rec["values"]) < rec["need"]:
                return
            del self.open[tuple(x)]
            f = float(np.median(rec["values"]))
            if "measure" in rec:  # a re-evaluation for the noise measurement
                self._remeasured(rec["measure"], rec["index"], f)
                return
        self.results.append((list(x), f))
        while len(self.results) >= self.es.popsize:
            popsize = self.es.popsize
            batch, self.results = self.results[:popsize], self.results[popsize:]
            if not self._asked_since_tell:  # pycma wants an ask between two tells
                self._draw()
            self.es.tell([np.asarray(p) for p, _ in batch], [v for _, v in batch])
            self._asked_since_tell = False
            if self.noise is not None:
                self._reevaluate(batch)
            self.budget[self.regime] += popsize
            if self.es.stop() and self.runs <= self.options.restarts:
                self._restart()  # results still pending from the old run are not told to the new one

    def _reevaluate(self, batch: list[tuple[list[float], float]]) -> None:
        """Hand out fresh replicates of a few of the generation's points before anything else: the
        first ones asked and the best of the rest (pycma's policy)."""
        fit = [v for _, v in batch]
        if self.noise.lam_reeval == 0:  # measurement switched off
            return
        lam = self.noise.lam_reeval or 2 + len(fit) / 20
        lam = int(lam) + (lam % 1 > self.rng.random())
        first = lam - lam // 2
        idx = list(range(first)) + [int(i) + first for i in np.argsort(fit[first:])[: lam - first]]
        measure = {"fit": fit, "fitre": list(fit), "idx": idx, "left": len(idx), "es": self.es}
        n, first_new = int(self.noise.evaluations), self.noise.maxevals  # replicates below maxevals are taken
        slots = []
        for i in idx:
            x = batch[i][0]
            self.open[tuple(x)] = {"values": [], "need": n, "measure": measure, "index": i}
            slots.extend((x, first_new + j) for j in range(n))
        self.slots[:0] = slots

    def _remeasured(self, measure: dict, i: int, f: float) -> None:
        measure["fitre"][i] = f
        measure["left"] -= 1
        if measure["left"] or measure["es"] is not self.es:  # incomplete, or the run has restarted
            return
        nh = self.noise
        nh.fit, nh.fitre, nh.idx = measure["fit"], measure["fitre"], np.asarray(measure["idx"])
        nh.update_measure()
        self.es.sigma *= nh.treat()

    def _restart(self) -> None:
        sigma0 = self.options.sigma0
        if self.options.restart_strategy == "ipop" or self.budget["small"] >= self.budget["large"]:
            self.large_popsize *= 2
            self._start(self.large_popsize, sigma0, "large")
        else:  # BIPOP's small regime: a random, smaller population and step size
            u = float(self.rng.random())
            popsize = int(self.default_popsize * (0.5 * self.large_popsize / self.default_popsize) ** (u * u))
            self._start(max(2, popsize), sigma0 * 10 ** (-2 * float(self.rng.random())), "small")


def _optuna_samplers() -> dict[str, tuple[type, bool]]:
    """Optuna sampler name -> (class, whether it takes the objective vector rather than a weighted sum)."""
    import optuna

    s = optuna.samplers
    return {
        "tpe": (s.TPESampler, True),
        "nsga2": (s.NSGAIISampler, True),
        "nsga3": (s.NSGAIIISampler, True),
        "gp": (s.GPSampler, True),
        "cmaes": (s.CmaEsSampler, False),
        "optuna-random": (s.RandomSampler, True),
    }


OPTUNA_SAMPLERS = ("tpe", "nsga2", "nsga3", "gp", "cmaes", "optuna-random")


#: Ranges of the Optuna samplers' numeric keywords (the annotations give only types): (low, high,
#: whether low itself is excluded); the upper bounds keep per-ask work and memory sane.
SAMPLER_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "n_startup_trials": (0, None, False),
    "n_ei_candidates": (1, 100_000, False),
    "population_size": (2, None, False),
    "popsize": (2, 10_000, False),
    "dividing_parameter": (1, None, False),
    "prior_weight": (0, None, True),
    "sigma0": (0, None, True),
    "mutation_prob": (0, 1, False),
    "crossover_prob": (0, 1, False),
    "swapping_prob": (0, 1, False),
}
_FILE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _alternatives(annotation: str) -> list[str]:
    """The members of a union annotation written as a string (``int | None``), split at top level."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        depth += (ch == "[") - (ch == "]")
        if ch == "|" and depth == 0:
            out.append(annotation[start:i].strip())
            start = i + 1
    return [*out, annotation[start:].strip()]


def _fits(kind: str, value) -> bool:
    """Whether a value read from a file is of the annotation member ``kind``."""
    if kind in ("int", "float") and isinstance(value, bool):
        return False
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind in _FILE_TYPES:
        return isinstance(value, _FILE_TYPES[kind])
    if kind.startswith("dict["):  # e.g. CmaEsSampler's x0: parameter name -> a plain value
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float, str, bool)) for k, v in value.items()
        )
    return False  # an object (a callable, a crossover, arrays): nothing a file can hold


def _value_problem(annotation, value) -> str | None:
    """Why ``value`` does not fit a sampler keyword's annotation, or None."""
    if annotation is inspect.Parameter.empty:
        return None
    if not isinstance(annotation, str):  # annotations evaluated at definition: their written form
        annotation = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    kinds = _alternatives(annotation.replace("typing.", "").replace("NoneType", "None"))
    if any(_fits(k, value) for k in kinds):
        return None
    plain = [k for k in kinds if k in _FILE_TYPES or k.startswith("dict[")]
    if plain == ["None"] or not plain:
        return f"takes a Python object ({annotation}) for this option, which a file cannot give; leave it out"
    shown = type(value).__name__ if isinstance(value, (list, dict)) else repr(value)[:40]
    return f"takes {' or '.join(plain)} for this option, got {shown}"


def _range_problem(key: str, value) -> str | None:
    if key not in SAMPLER_RANGES or value is None or isinstance(value, bool):
        return None
    low, high, open_low = SAMPLER_RANGES[key]
    if (value <= low if open_low else value < low) or (high is not None and value > high):
        where = f"> {low:g}" if open_low else (f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]")
        return f"takes a value {where} for this option, got {value!r}"
    return None


class OptunaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Keyword arguments of the Optuna sampler's constructor (``seed`` comes from the experiment).
    sampler_options: dict[str, Any] = Field(default_factory=dict)


class OptunaSampler(Optimizer):
    """An Optuna sampler over d float parameters in [0, 1], through study.ask/tell."""

    Options = OptunaOptions

    def __init__(self, dim, objectives, seed, options=None, name="tpe"):
        self.name = name
        super().__init__(dim, objectives, seed, options)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        cls, takes_vector = _optuna_samplers()[name]
        self.multi_objective = takes_vector and len(objectives) > 1
        sampler = cls(**{"seed": seed, **self.options.sampler_options})
        if self.multi_objective:
            self.study = optuna.create_study(directions=[o.direction for o in objectives], sampler=sampler)
        else:
            self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.dists = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(dim)}
        self.open: dict[tuple, list] = {}

    @staticmethod
    def check_sampler_options(name: str, options: dict[str, Any]) -> None:
        """Refuse keywords the sampler's constructor does not take, and values its annotations (or
        ``SAMPLER_RANGES``) do not allow, before any compute. Only plain values come from a file:
        a keyword that takes an object (a callable, a crossover) can only be left out."""
        cls = _optuna_samplers()[name][0]
        parameters = {
            p.name: p.annotation
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "seed") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            raise ValueError(
                f"sampler_options: {cls.__name__} takes no option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(parameters))}"
            )
        for key, value in options.items():
            problem = _value_problem(parameters[key], value) or _range_problem(key, value)
            if problem:
                raise ValueError(f"sampler_options.{key}: {cls.__name__} {problem}")

    def use_categories(self, categories):
        import optuna

        super().use_categories(categories)
        for i, k in enumerate(self.categories):
            if k:
                self.dists[f"x{i}"] = optuna.distributions.CategoricalDistribution(list(range(k)))

    def _value(self, i: int, v: float):
        """Dimension i's unit-interval value as the study's parameter (a category's index)."""
        k = self.categories[i]
        return min(int(v * k), k - 1) if k else float(v)

    def enqueue(self, x):
        self.study.enqueue_trial({f"x{i}": self._value(i, v) for i, v in enumerate(x)})

    def _ask(self):  # enqueued points are the study's own (enqueue_trial)
        trial = self.study.ask(self.dists)
        x = []
        for i, k in enumerate(self.categories):
            v = trial.params[f"x{i}"]
            x.append((v + 0.5) / k if k else float(v))  # a category: its cell's middle
        self.open.setdefault(tuple(x), []).append(trial)
        return x

    def tell(self, x, values):
        import optuna

        trial = self.open[tuple(x)].pop(0)
        if values is None or not all(math.isfinite(v) for v in values):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif self.multi_objective:
            self.study.tell(trial, list(values))
        else:
            self.study.tell(trial, scalarize(values, self.objectives))


@dataclass(frozen=True)
class OptimizerKind:
    """A registered optimizer: its options model and how to build it."""

    name: str
    Options: type[BaseModel]
    build: Callable[..., Optimizer]  # (dim, objectives, seed, options) -> Optimizer


def _registry() -> dict[str, OptimizerKind]:
    kinds = [OptimizerKind("random", NoOptions, RandomSearch), OptimizerKind("cma", CMAOptions, CMA)]
    for sampler in OPTUNA_SAMPLERS:
        kinds.append(
            OptimizerKind(sampler, OptunaOptions, lambda d, o, s, opts, n=sampler: OptunaSampler(d, o, s, opts, name=n))
        )
    return {k.name: k for k in kinds}


#: name -> OptimizerKind, in the order they are documented.
OPTIMIZERS: dict[str, OptimizerKind] = _registry()


def check_options(name: str, options: dict[str, Any]) -> BaseModel:
    """The optimizer ``name``'s options, validated; ValueError (one line, naming the option) otherwise."""
    from evomerge.configfile import field_path

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")
    kind = OPTIMIZERS[name]
    try:
        typed = kind.Options.model_validate(options or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = field_path(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            valid = ", ".join(kind.Options.model_fields) or "none"
            raise ValueError(f"{where}: not an option of optimizer '{name}'; valid: {valid}") from None
        raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    if isinstance(typed, OptunaOptions):
        OptunaSampler.check_sampler_options(name, typed.sampler_options)
    return typed


def make_optimizer(
    name: str,
    dim: int,
    objectives: Sequence[Objective],
    seed: int,
    *,
    categories: Sequence[int] | None = None,
    **options,
) -> Optimizer:
    """The optimizer ``name`` (see OPTIMIZERS) with its options; unknown names and options are refused.
    ``categories``: per dimension, a categorical gene's number of choices (0: continuous)."""
    options = check_options(name, options)  # refuses unknown names first
    optimizer = OPTIMIZERS[name].build(dim, objectives, seed, options)
    if categories is not None and any(categories):
        optimizer.use_categories(categories)
    return optimizer
