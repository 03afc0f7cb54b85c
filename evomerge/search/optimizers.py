"""Optimizers behind one ask/tell interface, over the unit box [0, 1]^d.

The search maps the unit box onto a genome's bounds; optimizers never see parameter names. Every
optimizer is deterministic given its seed and the order of ask/tell calls, and draws from its own
random generator (lm-eval reseeds the global ones), which is what makes journal replay an exact
resume (see ``evomerge.search.journal``).

- ``random``: uniform sampling, the baseline.
- ``cma``: pycma CMA-ES with box bounds, population size, sigma0, and IPOP/BIPOP restarts. Asks do not
  wait for a generation: once a generation's points are all out, further asks draw from the current
  distribution; a generation is told as soon as ``popsize`` results are in (in arrival order).
- ``tpe``, ``nsga2``, ``nsga3``, ``gp``, ``cmaes``, ``optuna-random``: Optuna samplers; the
  multi-objective ones (tpe, nsga2, nsga3, gp, optuna-random) receive the objective vector, the others
  a weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict


class Objective(BaseModel):
    """A named objective read from an evaluation's scores."""

    model_config = ConfigDict(extra="forbid")
    name: str
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: float = 1.0


def scalarize(values: Sequence[float], objectives: Sequence[Objective]) -> float:
    """The weighted sum to *minimize*: maximized objectives enter negated."""
    return float(sum(o.weight * (-v if o.direction == "maximize" else v) for v, o in zip(values, objectives)))


class Optimizer:
    """ask() -> a point of [0, 1]^dim; tell(point, values or None for a failure)."""

    name = "base"
    multi_objective = False

    def __init__(self, dim: int, objectives: Sequence[Objective], seed: int, **options: Any):
        if dim < 1:
            raise ValueError("the genome has no searched gene")
        self.dim, self.objectives, self.seed = dim, list(objectives), seed
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {sorted(unknown)}; valid: {sorted(self.OPTIONS) or 'none'}")
        self.options = {**self.OPTIONS, **options}

    OPTIONS: dict[str, Any] = {}

    def enqueue(self, x: Sequence[float]) -> None:
        """Make ``x`` (a known recipe's point) the next ask."""
        self._enqueued = [*getattr(self, "_enqueued", []), [float(v) for v in x]]

    def ask(self) -> list[float]:
        queued = getattr(self, "_enqueued", [])
        return queued.pop(0) if queued else self._ask()

    def _ask(self) -> list[float]:
        raise NotImplementedError

    def tell(self, x: Sequence[float], values: Sequence[float] | None) -> None:
        raise NotImplementedError


class RandomSearch(Optimizer):
    name = "random"
    multi_objective = True

    def __init__(self, dim, objectives, seed, **options):
        super().__init__(dim, objectives, seed, **options)
        self.rng = np.random.default_rng(seed)

    def _ask(self):
        return self.rng.random(self.dim).tolist()

    def tell(self, x, values):
        pass


class CMA(Optimizer):
    """pycma CMA-ES on the weighted sum; failed points are told as worse than anything seen."""

    name = "cma"
    # sigma0 in units of the box (range / 6, a common rule; 0.25 measured ~1.6x slower on a 56-gene bowl)
    OPTIONS = {"popsize": None, "sigma0": 1 / 6, "restarts": 0, "restart_strategy": "ipop", "tolfun": 1e-11}

    def __init__(self, dim, objectives, seed, **options):
        super().__init__(dim, objectives, seed, **options)
        if self.options["restart_strategy"] not in ("ipop", "bipop"):
            raise ValueError("cma: restart_strategy must be 'ipop' or 'bipop'")
        self.rng = np.random.default_rng(seed)
        self.default_popsize = self.options["popsize"] or 4 + int(3 * math.log(dim))
        self.runs = 0
        self.budget = {"large": 0, "small": 0}
        self.large_popsize = self.default_popsize
        self.worst = None
        self._start(self.default_popsize, self.options["sigma0"], "large")

    def _start(self, popsize: int, sigma0: float, regime: str) -> None:
        import cma

        self.regime = regime
        opts = {"bounds": [0.0, 1.0], "popsize": popsize, "seed": int(self.rng.integers(1, 2**31 - 1)),
                "verbose": -9, "verb_log": 0, "verb_disp": 0, "tolfun": self.options["tolfun"],
                "randn": lambda *shape: self.rng.standard_normal(shape)}
        x0 = self.rng.random(self.dim).tolist() if self.runs else [0.5] * self.dim
        self.es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
        self.queue: list[list[float]] = []
        self.results: list[tuple[list[float], float]] = []
        self._asked_since_tell = False
        self.runs += 1

    def _ask(self):
        if not self.queue:
            self._draw()
        return self.queue.pop(0)

    def _draw(self) -> None:
        self.queue.extend(list(map(float, x)) for x in self.es.ask())
        self._asked_since_tell = True

    def tell(self, x, values):
        if values is None or not all(math.isfinite(v) for v in values):
            f = (self.worst if self.worst is not None else 0.0) + 1.0
        else:
            f = scalarize(values, self.objectives)
            self.worst = f if self.worst is None else max(self.worst, f)
        self.results.append((list(x), f))
        while len(self.results) >= self.es.popsize:
            popsize = self.es.popsize
            batch, self.results = self.results[:popsize], self.results[popsize:]
            if not self._asked_since_tell:  # pycma wants an ask between two tells
                self._draw()
            self.es.tell([np.asarray(p) for p, _ in batch], [v for _, v in batch])
            self._asked_since_tell = False
            self.budget[self.regime] += popsize
            if self.es.stop() and self.runs <= self.options["restarts"]:
                self._restart()  # results still pending from the old run are not told to the new one

    def _restart(self) -> None:
        sigma0 = self.options["sigma0"]
        if self.options["restart_strategy"] == "ipop" or self.budget["small"] >= self.budget["large"]:
            self.large_popsize *= 2
            self._start(self.large_popsize, sigma0, "large")
        else:  # BIPOP's small regime: a random, smaller population and step size
            u = float(self.rng.random())
            popsize = int(self.default_popsize * (0.5 * self.large_popsize / self.default_popsize) ** (u * u))
            self._start(max(2, popsize), sigma0 * 10 ** (-2 * float(self.rng.random())), "small")


class OptunaSampler(Optimizer):
    """An Optuna sampler over d float parameters in [0, 1], through study.ask/tell."""

    SAMPLERS = {"tpe": True, "nsga2": True, "nsga3": True, "gp": True, "cmaes": False, "optuna-random": True}
    OPTIONS = {"sampler_options": {}}

    def __init__(self, dim, objectives, seed, name="tpe", **options):
        self.name = name
        super().__init__(dim, objectives, seed, **options)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.multi_objective = self.SAMPLERS[name] and len(objectives) > 1
        kw = {"seed": seed, **self.options["sampler_options"]}
        sampler = {
            "tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
            "nsga3": optuna.samplers.NSGAIIISampler, "gp": optuna.samplers.GPSampler,
            "cmaes": optuna.samplers.CmaEsSampler, "optuna-random": optuna.samplers.RandomSampler,
        }[name](**kw)
        if self.multi_objective:
            self.study = optuna.create_study(directions=[o.direction for o in objectives], sampler=sampler)
        else:
            self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.dists = {f"x{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(dim)}
        self.open: dict[tuple, list] = {}

    def enqueue(self, x):
        self.study.enqueue_trial({f"x{i}": float(v) for i, v in enumerate(x)})

    def ask(self):
        trial = self.study.ask(self.dists)
        x = [float(trial.params[f"x{i}"]) for i in range(self.dim)]
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


OPTIMIZERS = ["random", "cma", *OptunaSampler.SAMPLERS]


def make_optimizer(name: str, dim: int, objectives: Sequence[Objective], seed: int, **options) -> Optimizer:
    """The optimizer ``name`` (see OPTIMIZERS) with its options; unknown names and options are refused."""
    if name == "random":
        return RandomSearch(dim, objectives, seed, **options)
    if name == "cma":
        return CMA(dim, objectives, seed, **options)
    if name in OptunaSampler.SAMPLERS:
        return OptunaSampler(dim, objectives, seed, name=name, **options)
    raise ValueError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")
