"""A campaign: experiment file -> search (space + optimizer) -> worker pool -> tracking, resumable.

The campaign directory holds everything needed to continue: ``experiment.yaml`` (the experiment as
resolved, absolute paths), ``campaign.json`` (MLflow ids, hypervolume reference point, elapsed
time; replaced atomically), the search journal (``journal.jsonl``, which *is* the state: see
``evomerge.search.journal``), Ray's temp dir, and by default the MLflow store. ``run`` and
``resume`` are the same loop: keep every worker busy until the budget is met (finished
candidates, done or failed, over all runs), tell each result to the search as it arrives, queue it
for MLflow. Ctrl-C or SIGTERM stops cleanly; after any interruption, SIGKILL included, ``resume``
re-issues the candidates that were in flight and goes on, so the campaign ends with exactly the
budgeted number of finished candidates, none evaluated twice.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge import __version__
from evomerge.experiment import Experiment, check_experiment, load_experiment

STATE = "campaign.json"
EXPERIMENT_COPY = "experiment.yaml"


class CampaignError(ValueError):
    pass


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"evomerge": __version__, "python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "lm_eval", "cma", "optuna", "ray", "mlflow", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Loaded:
    """A campaign directory opened for reading or running."""

    directory: Path
    experiment: Experiment
    state: dict
    parts: dict  # space, evaluator, num_layers

    @property
    def objective_specs(self):
        wanted = self.experiment.objectives or [o.name for o in self.parts["evaluator"].objectives]
        by_name = {o.name: o for o in self.parts["evaluator"].objectives}
        return [by_name[n] for n in wanted]

    @property
    def objectives(self):
        from evomerge.search.optimizers import Objective

        return [Objective(name=o.name, direction=o.direction, weight=o.weight) for o in self.objective_specs]

    def search(self):
        from evomerge.search.journal import Search
        from evomerge.search.space import Genome

        genome = Genome(self.parts["space"], self.parts["num_layers"], seed=self.experiment.seed)
        return Search(genome, self.experiment.optimizer.name, self.objectives, self.experiment.seed,
                      self.directory, self.experiment.optimizer.options)

    @property
    def reference_point(self) -> list[float] | None:
        """The hypervolume reference: the experiment's, else the one fixed once the seeds were scored."""
        given = self.experiment.reference_point
        return [given[o.name] for o in self.objectives] if given else self.state.get("reference_point")

    def tracking(self) -> tuple[str, str | None]:
        from evomerge.tracking.mlflow_tracker import local_store

        if self.experiment.tracking.uri:
            return self.experiment.tracking.uri, None
        return local_store(self.directory)

    def save_state(self) -> None:
        write_atomic(self.directory / STATE, json.dumps(self.state, indent=2) + "\n")


def prepare(experiment_file: str | Path, out: str | Path | None = None) -> Loaded:
    """Validate an experiment file (exit-2 errors before compute) and create its campaign directory."""
    exp = load_experiment(experiment_file)
    parts = check_experiment(exp, experiment_file)
    directory = Path(out or exp.output_dir).resolve()
    if (directory / STATE).exists():
        raise CampaignError(f"{directory} already holds a campaign; continue it with `evomerge resume {directory}` "
                            "or choose another output_dir")
    if directory.exists() and any(p.name not in ("ray",) for p in directory.iterdir()):
        raise CampaignError(f"output_dir {directory} exists and is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    exp = exp.model_copy(update={"output_dir": str(directory)})
    write_atomic(directory / EXPERIMENT_COPY, yaml.safe_dump(exp.model_dump(), sort_keys=False))
    state = {"name": exp.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "source": str(Path(experiment_file).resolve()),
             "seed": exp.seed, "versions": versions(), "elapsed_s": 0.0, "parent_run_id": None,
             "reference_point": None, "finished": False}
    loaded = Loaded(directory, exp, state, parts)
    loaded.save_state()
    return loaded


def open_campaign(directory: str | Path, check: bool = True) -> Loaded:
    directory = Path(directory)
    if not (directory / STATE).is_file() or not (directory / EXPERIMENT_COPY).is_file():
        raise CampaignError(f"{directory}: not a campaign directory (no {STATE})")
    try:
        state = json.loads((directory / STATE).read_text())
    except ValueError:
        raise CampaignError(f"{directory / STATE}: corrupt campaign state") from None
    exp = load_experiment(directory / EXPERIMENT_COPY)
    parts = check_experiment(exp, directory / EXPERIMENT_COPY, check_tracking=check)
    return Loaded(directory.resolve(), exp, state, parts)


class Display:
    """One progress line: evaluations/budget, best per objective, front size, hypervolume, failures, ETA."""

    def __init__(self, stream=None, every: float = 5.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every, self.last = every, 0.0

    def update(self, text, force: bool = False) -> None:
        """``text``: a string, or a callable making it (only called when a line is shown)."""
        now = time.monotonic()
        if self.tty and (force or now - self.last >= 0.2):
            self.stream.write("\r\033[K" + (text() if callable(text) else text))
            self.stream.flush()
            self.last = now
        elif not self.tty and (force or now - self.last >= self.every):
            self.stream.write((text() if callable(text) else text) + "\n")
            self.stream.flush()
            self.last = now

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")


def seed_points(loaded: Loaded, search) -> list[list[float]]:
    from evomerge.recipe import load_recipe

    genome, seeds = search.genome, loaded.experiment.seeds
    points = []
    if seeds.uniform_average:
        points.append(genome.uniform_average())
    if seeds.experts_alone:
        points += [genome.expert_alone(m) for m in genome.space.models]
    for path in seeds.recipes:
        points.append(genome.encode(load_recipe(path)))
    return points


def run(loaded: Loaded, display: Display | None = None, on_result=None) -> dict:
    """Run (or continue) the campaign until its budget is met or it is interrupted; returns a summary."""
    from evomerge.cluster.pool import PoolError, WorkerPool
    from evomerge.cluster.worker import WorkerSpec
    from evomerge.environment import QUIET_DEFAULTS, OFFLINE
    from evomerge.tracking.mlflow_tracker import Tracker

    exp, directory = loaded.experiment, loaded.directory
    display = display or Display()
    search = loaded.search()
    seeds = seed_points(loaded, search)
    if not search.trials:
        for point in seeds:
            search.enqueue(point)
    names = [o.name for o in loaded.objectives]
    directions = [o.direction for o in loaded.objectives]
    gene_names = [g.name for g in search.genome.genes]

    uri, artifacts = loaded.tracking()
    tracker = Tracker(uri, exp.tracking.experiment or exp.name, names, directions, artifacts, exp.tracking.refresh_s)
    params = flatten({"experiment": exp.model_dump(exclude={"output_dir"})})
    params.update({f"versions.{k}": v for k, v in loaded.state["versions"].items()})
    parent = tracker.open(loaded.state.get("parent_run_id"), params,
                          {"evomerge.seed": str(exp.seed), "evomerge.campaign_dir": str(directory)},
                          directory / EXPERIMENT_COPY)
    if loaded.state.get("parent_run_id") != parent:
        loaded.state["parent_run_id"] = parent
        loaded.save_state()
    reference = loaded.reference_point
    if reference:
        tracker.set_reference(reference)
    for trial in search.trials:  # told before an interruption but never logged
        if trial.status != "running" and trial.id not in tracker.logged:
            tracker.candidate(trial, gene_names)

    budget_n = exp.budget.max_evaluations
    budget_s = exp.budget.max_minutes * 60 if exp.budget.max_minutes else None
    spec = WorkerSpec(models=exp.models, base=loaded.parts["space"].base,
                      evaluator=loaded.parts["evaluator"].model_dump(), evaluator_source=exp.evaluator,
                      split=loaded.parts["evaluator"].split, device=exp.workers.device, dtype=exp.workers.dtype,
                      trust_remote_code=exp.trust_remote_code, allow_pickle=exp.allow_pickle,
                      env={k: os.environ[k] for k in (*QUIET_DEFAULTS, *OFFLINE) if k in os.environ})
    pool = WorkerPool(spec, workers=exp.workers.count, cpus_per_worker=exp.workers.cpus_per_worker,
                      gpus_per_worker=exp.workers.gpus_per_worker, address=exp.workers.address,
                      temp_dir=directory / "ray", max_retries=exp.workers.max_retries, timeout_s=exp.workers.timeout_s)
    stop = {"why": None}

    def on_term(signum, _frame):
        stop["why"] = "terminated"

    old_term = signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops cleanly even when started from a shell that ignores SIGINT for background jobs
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    status = "FAILED"
    told = lambda: sum(t.status != "running" for t in search.trials)
    elapsed0 = float(loaded.state.get("elapsed_s", 0.0))
    started = time.monotonic()
    session_told0 = told()
    try:
        met = lambda: (budget_n is not None and told() >= budget_n) or (budget_s is not None and elapsed0 >= budget_s)
        if met():  # nothing left to do: no workers to start
            status = "FINISHED"
            return summary(loaded, search, reference, None)
        display.update(f"starting {exp.workers.count} worker(s) ...", force=True)
        try:
            pool.start()
        except PoolError as e:
            raise CampaignError(str(e)) from None
        started = time.monotonic()
        while True:
            elapsed = elapsed0 + time.monotonic() - started
            n = told()
            if (budget_n is not None and n >= budget_n) or (budget_s is not None and elapsed >= budget_s):
                if not pool.in_flight:
                    break
            elif stop["why"] is None:
                while pool.free and (budget_n is None or n + pool.in_flight < budget_n):
                    trial = search.ask()
                    pool.submit(trial.id, trial.recipe.model_dump(exclude_none=True),
                                log_samples=exp.tracking.log_samples)
            if stop["why"] is not None:
                break
            for outcome in pool.poll(timeout=1.0):
                values = [outcome.score.values[k] for k in names] if outcome.score.status == "done" else None
                info = {"timings": outcome.score.timings, "attempts": outcome.attempts, "wall_s": outcome.seconds,
                        "worker": outcome.worker}
                if outcome.score.reason:
                    info["reason"] = outcome.score.reason
                trial = search.tell(outcome.key, values, info)
                tracker.candidate(trial, gene_names, samples=outcome.score.samples)
                if reference is None and len(search.finished) >= max(1, len(seeds)):
                    reference = worst(search, directions)
                    loaded.state["reference_point"] = reference
                    loaded.save_state()
                    tracker.set_reference(reference)
                if on_result:
                    on_result(trial)
                display.update(lambda: progress_line(search, budget_n, budget_s, elapsed0, started, session_told0,
                                                     reference))
            if (budget_s is not None and elapsed0 + time.monotonic() - started >= budget_s
                    and pool.in_flight == 0):
                break
        status = "FINISHED"
    except KeyboardInterrupt:
        stop["why"] = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        loaded.state["elapsed_s"] = elapsed0 + time.monotonic() - started
        pool.shutdown()
        display.end()
        if stop["why"]:
            status = "KILLED"
        loaded.state["finished"] = status == "FINISHED"
        loaded.save_state()
        try:
            tracker.close(status)
        except Exception as e:
            display.update(f"warning: {e}", force=True)
    return summary(loaded, search, reference, stop["why"])


def worst(search, directions) -> list[float]:
    values = [t.values for t in search.finished]
    return [(min if d == "maximize" else max)(v[j] for v in values) for j, d in enumerate(directions)]


def progress_line(search, budget_n, budget_s, elapsed0, started, session0, reference) -> str:
    told = [t for t in search.trials if t.status != "running"]
    done = search.finished
    failed = len(told) - len(done)
    parts = [f"evaluations {len(told)}" + (f"/{budget_n}" if budget_n else "")]
    if done:
        best = []
        for j, o in enumerate(search.objectives):
            pick = max if o.direction == "maximize" else min
            best.append(f"{o.name} {pick(t.values[j] for t in done):.4g}")
        parts.append("best " + ", ".join(best))
        parts.append(f"front {len(search.front())}")
        if reference:
            parts.append(f"hv {search.hypervolume(reference):.4g}")
    parts.append(f"failed {failed}")
    spent = time.monotonic() - started
    rate = (len(told) - session0) / spent if spent > 0 else 0.0
    if rate > 0:
        left = []
        if budget_n:
            left.append((budget_n - len(told)) / rate)
        if budget_s:
            left.append(budget_s - elapsed0 - spent)
        if left:
            eta = max(0, min(left))
            parts.append(f"{rate:.2f}/s, ETA {int(eta // 60)}:{int(eta % 60):02d}")
    return " | ".join(parts)


def summary(loaded: Loaded, search, reference, stopped) -> dict:
    told = [t for t in search.trials if t.status != "running"]
    out = {"directory": str(loaded.directory), "evaluations": len(told), "done": len(search.finished),
           "failed": len(told) - len(search.finished), "front": [t.id for t in search.front()],
           "stopped": stopped, "parent_run_id": loaded.state.get("parent_run_id"),
           "tracking_uri": loaded.tracking()[0], "budget": loaded.experiment.budget.max_evaluations}
    if reference:
        out["hypervolume"] = search.hypervolume(reference)
        out["reference_point"] = reference
    return out


def flatten(data, prefix: str = "") -> dict[str, str]:
    out = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(data) if not isinstance(data, str) else data
    return out


# -- reading a campaign ------------------------------------------------------------------------------
def front_table(loaded: Loaded, search) -> list[dict]:
    """The front as rows: trial, objectives, crowding distance (sorted by the first objective)."""
    from evomerge.search.pareto import crowding_distances

    front = search.front()
    directions = [o.direction for o in loaded.objectives]
    crowd = crowding_distances([t.values for t in front], directions) if front else []
    rows = [{"trial": t.id, **{o.name: v for o, v in zip(loaded.objectives, t.values)}, "crowding": c}
            for t, c in zip(front, crowd)]
    first = loaded.objectives[0]
    return sorted(rows, key=lambda r: r[first.name], reverse=first.direction == "maximize")


def pick(loaded: Loaded, search, trial: int | None = None, weights: dict[str, float] | None = None):
    """The trial to export: by id, by weights over the front, or the best (single objective: the
    best weighted sum; several: the front's knee)."""
    from evomerge.search.optimizers import scalarize
    from evomerge.search.pareto import knee, weighted_pick

    done = search.finished
    if trial is not None:
        if not 0 <= trial < len(search.trials):
            raise CampaignError(f"--trial {trial}: the campaign has trials 0..{len(search.trials) - 1}")
        t = search.trials[trial]
        if t.status != "done":
            raise CampaignError(f"--trial {trial}: that candidate is {t.status}, not done")
        return t
    if not done:
        raise CampaignError("no finished candidate to export yet")
    objectives = loaded.objectives
    directions = [o.direction for o in objectives]
    points = [t.values for t in done]
    if weights is not None:
        unknown = sorted(set(weights) - {o.name for o in objectives})
        if unknown:
            raise CampaignError(f"--weights: unknown objective(s) {', '.join(unknown)}; "
                                f"objectives: {', '.join(o.name for o in objectives)}")
        try:
            return done[weighted_pick(points, directions, [weights.get(o.name, 0.0) for o in objectives])]
        except ValueError as e:
            raise CampaignError(f"--weights: {e}") from None
    if len(objectives) == 1:
        return min(done, key=lambda t: (scalarize(t.values, objectives), t.id))
    return done[knee(points, directions)]
