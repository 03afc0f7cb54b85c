"""A campaign: experiment file -> search (space + optimizer) -> worker pool -> tracking, resumable.

The campaign directory holds everything needed to continue: ``experiment.yaml`` (the experiment as
resolved, absolute paths), ``campaign.json`` (MLflow ids, hypervolume reference point, elapsed
time; replaced atomically), the search journal (``journal.jsonl``, which *is* the state: see
``evomerge.search.journal``), Ray's temp dir, and by default the MLflow store. One process at a
time runs a campaign: ``campaign.lock`` is held (``flock``) while it does, and a dead holder's lock
is free again at once. ``run`` and ``resume`` are the same loop: keep every worker busy until the
budget is met (finished candidates, done or failed, over all runs), tell each result to the search
as it arrives, queue it for MLflow. Ctrl-C or SIGTERM stops cleanly; after any interruption,
SIGKILL included, ``resume`` re-issues the candidates that were in flight and goes on, so the
campaign ends with exactly the budgeted number of finished candidates, none evaluated twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from evomerge import __version__
from evomerge.errors import first_line
from evomerge.experiment import CheckedExperiment, Experiment, check_experiment, load_experiment

STATE = "campaign.json"
EXPERIMENT_COPY = "experiment.yaml"
LOCK = "campaign.lock"

#: Exit statuses of ``run``/``resume`` beyond 0 (finished) and 2 (bad input).
EXIT_HALTED = 3  # stopped on a systemic failure (every first result failed alike, a lost Ray node)
#: Finished, but MLflow did not get every result (its store failed, died or stopped answering): the
#: results are in the journal, and ``resume`` logs what MLflow lacks once it answers again.
EXIT_UNTRACKED = 4
RunStatus = Literal["FINISHED", "KILLED", "FAILED"]


#: What the warning that MLflow failed during a campaign adds.
GOES_ON = "the campaign goes on; its results are kept in the journal, and what MLflow lacks is logged when it answers"


def untracked_line(untracked: dict, results: int, directory) -> str:
    """The one line saying what MLflow did not get (``untracked``: see ``CampaignRun.note_untracked``)."""
    trials = untracked["trials"]
    what = (
        f"{len(trials)} of {results} results (trials {id_ranges(trials)}) did not reach MLflow"
        if trials
        else "the campaign run's end and final front did not reach MLflow"
    )
    return (
        f"{what} at {untracked['uri']} ({untracked['problem']}); they are kept in the journal: "
        f"once the server answers, `evomerge resume {directory}` logs them"
    )


def id_ranges(ids) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2, 5, 7-8``."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


class CampaignError(ValueError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: a clean stop; exit status 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def why(self) -> str:
        return "terminated" if self.signum == signal.SIGTERM else "interrupted"


class Halted(Exception):
    """The campaign cannot make progress (a systemic failure); its state stays resumable."""


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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CampaignError(f"cannot write {path}: {e.strerror}") from None


class CampaignLock:
    """An exclusive ``flock`` on ``DIR/campaign.lock``, holding the owner's pid. The kernel frees it
    when the owner dies, SIGKILL included, so a stale lock never blocks."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CampaignError(f"{self.path.parent}: campaign directory not writable ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CampaignError(
                    f"{self.path.parent}: the campaign is in use by another evomerge process "
                    f"(pid {holder}); wait for it to end or stop it"
                ) from None
            raise CampaignError(f"{self.path}: cannot lock ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


@dataclass
class Loaded:
    """A campaign directory opened for reading, or for running (then it holds the campaign's lock)."""

    directory: Path
    experiment: Experiment
    state: dict
    checked: CheckedExperiment
    lock: CampaignLock | None = None
    #: Made by this process (``prepare``): removed again if its workers cannot start.
    new: bool = False

    @property
    def objective_specs(self):
        wanted = self.experiment.objectives or [o.name for o in self.checked.evaluator.objectives]
        by_name = {o.name: o for o in self.checked.evaluator.objectives}
        return [by_name[n] for n in wanted]

    @property
    def objectives(self):
        from evomerge.objectives import Objective

        return [Objective(name=o.name, direction=o.direction, weight=o.weight) for o in self.objective_specs]

    def search(self):
        """The search replayed from the journal; writable only while this process holds the lock."""
        from evomerge.search.fidelity import Fidelity
        from evomerge.search.racing import Racing
        from evomerge.search.study import Search

        genome = self.checked.genome()
        f, r = self.experiment.fidelity, self.experiment.racing
        return Search(
            genome,
            self.experiment.optimizer.name,
            self.objectives,
            self.experiment.seed,
            self.directory,
            self.experiment.optimizer.options,
            writable=self.lock is not None,
            fidelity=Fidelity(tuple(f.rungs), f.promote) if f is not None else None,
            racing=Racing(
                r.anchors,
                r.check,
                r.z,
                r.min_full,
                r.refit,
                self.experiment.seed,
                raced_setting(r, self.directory, "rule"),
                raced_setting(r, self.directory, "estimate"),
                racing_gain(r),
            )
            if r
            else None,
        )

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

    def document_records(self):
        """The campaign's per-document records (``evomerge.search.records``)."""
        from evomerge.search.records import DocumentRecords

        split = self.checked.evaluator.split
        documents = self.state.get("documents") or {}
        return DocumentRecords(self.directory, {t: s[split] for t, s in documents.items() if split in s})

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def prepare(experiment_file: str | Path, out: str | Path | None = None) -> Loaded:
    """Validate an experiment file (exit-2 errors before anything is written), then create its
    campaign directory and take its lock."""
    exp = load_experiment(experiment_file)
    checked = check_experiment(exp, experiment_file)
    directory = Path(out or exp.output_dir).resolve()
    if (directory / STATE).exists():
        raise CampaignError(
            f"{directory} already holds a campaign; continue it with `evomerge resume {directory}` "
            "or choose another output_dir"
        )
    if directory.exists() and not directory.is_dir():
        raise CampaignError(f"output_dir {directory} is a file")
    if directory.exists() and any(directory.iterdir()):
        raise CampaignError(f"output_dir {directory} exists and is not empty")
    existed = directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CampaignError(f"output_dir {directory}: cannot create it ({e.strerror})") from None
    lock = CampaignLock(directory)
    try:
        lock.acquire()
        if (directory / STATE).exists():  # another `run` got here first
            raise CampaignError(f"{directory} already holds a campaign (started just now by another process)")
        exp = exp.model_copy(update={"output_dir": str(directory)})
        write_atomic(directory / EXPERIMENT_COPY, yaml.safe_dump(exp.model_dump(), sort_keys=False))
        state = {
            "name": exp.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": str(Path(experiment_file).resolve()),
            "seed": exp.seed,
            "versions": versions(),
            "elapsed_s": 0.0,
            "parent_run_id": None,
            "reference_point": None,
            "finished": False,
        }
        loaded = Loaded(directory, exp, state, checked, lock=lock, new=True)
        loaded.save_state()
    except BaseException:
        lock.release()
        if not existed or not (directory / STATE).exists():
            _remove_new(directory, existed)
        raise
    return loaded


def _remove_new(directory: Path, keep_dir: bool) -> None:
    """Undo a campaign directory this process created (nothing in it was computed)."""
    import shutil

    if keep_dir:
        for p in directory.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)


def state_problem(state) -> str | None:
    """What makes ``campaign.json``'s content not a campaign state (JSON of another shape), or None."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    kinds = {
        "elapsed_s": (number, "a number"),
        "finished": (lambda v: isinstance(v, bool), "true or false"),
        "parent_run_id": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "experiment_id": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "reference_point": (lambda v: v is None or (isinstance(v, list) and all(map(number, v))), "numbers or null"),
        "sessions": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "a list of objects"),
    }
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    for key, (ok, what) in kinds.items():
        if key in state and not ok(state[key]):
            return f"'{key}' must be {what}"
    return None


def open_campaign(directory: str | Path, check: bool = True, lock: bool = False) -> Loaded:
    """Open a campaign directory. ``check``: check it like a new experiment (the tracking server
    answers, the tasks load); ``lock``: take its lock, to run it (refused while another process holds it)."""
    directory = Path(directory).resolve()
    if not (directory / STATE).is_file() or not (directory / EXPERIMENT_COPY).is_file():
        raise CampaignError(f"{directory}: not a campaign directory (no {STATE})")
    held = None
    if lock:
        held = CampaignLock(directory)
        held.acquire()
    try:
        try:
            state = json.loads((directory / STATE).read_text())
        except ValueError:
            raise CampaignError(f"{directory / STATE}: corrupt campaign state") from None
        except OSError as e:
            raise CampaignError(f"{directory / STATE}: cannot read ({e.strerror})") from None
        problem = state_problem(state)
        if problem:
            raise CampaignError(f"{directory / STATE}: corrupt campaign state: {problem}")
        exp = load_experiment(directory / EXPERIMENT_COPY)
        checked = check_experiment(exp, directory / EXPERIMENT_COPY, check_tracking=check, check_tasks=check)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return Loaded(directory, exp, state, checked, lock=held)


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


def seed_points(loaded: Loaded, search) -> list[tuple[str, list[float]]]:
    """(label, point) of the known points the search starts from: the uniform average, each expert
    alone, the hand recipes; an expert alone that the space cannot express exactly (an inclusion
    minimum, a method gene) is labelled as the space's nearest point, and is scored as itself apart
    (``experts_outside``)."""
    from evomerge.recipe import load_recipe

    genome, seeds = search.genome, loaded.experiment.seeds
    points = []
    if seeds.uniform_average and genome.uniform_average() is not None:  # a path space has no average
        points.append(("uniform average", genome.uniform_average()))
    if seeds.experts_alone:
        for m in genome.space.models:
            point = genome.expert_alone(m)
            exact = genome.space.kind == "path" or is_expert_alone(genome.decode(point), m)
            points.append((f"{m} alone" if exact else f"nearest to {m} alone in the space", point))
    for path in seeds.recipes:
        points.append((f"recipe {Path(path).name}", genome.encode(load_recipe(path))))
    return points


def experts_outside(points: list[tuple[str, list[float]]]) -> list[str]:
    """The experts whose "alone" seed is only the space's nearest point: scored as themselves apart."""
    prefix, suffix = "nearest to ", " alone in the space"
    return [label[len(prefix) : -len(suffix)] for label, _ in points if label.startswith(prefix)]


def expert_alone_recipe(expert: str, seed: int):
    """``expert``'s own weights as a recipe: a linear merge of it alone."""
    from evomerge.recipe import parse_recipe

    data = {"merge_method": "linear", "models": [{"model": expert, "parameters": {"weight": 1.0}}]}
    return parse_recipe({**data, "evomerge": {"seed": seed}}, f"{expert} alone")


def is_expert_alone(recipe, expert: str) -> bool:
    """Whether ``recipe`` merges to ``expert``'s own weights: a linear merge or task arithmetic
    (lambda 1, no LiNeS) in which ``expert`` has weight 1 and every other model weight 0, in every
    layer."""

    def constant(value):  # a setting with one value everywhere: that value, else None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) and v == value[0] for v in value):
            return float(value[0])
        return None

    if recipe.merge_method not in ("linear", "task_arithmetic") or recipe.models is None or recipe.evomerge.lines:
        return False
    if recipe.merge_method == "task_arithmetic" and constant((recipe.parameters or {}).get("lambda", 1.0)) != 1.0:
        return False
    weights = {m.model: constant((m.parameters or {}).get("weight", 1.0)) for m in recipe.models}
    others = [w for name, w in weights.items() if name not in (expert, recipe.base_model)]
    return weights.get(expert) == 1.0 and all(w == 0.0 for w in others)


#: ``seeds.baselines``: (label, merge method, per-expert parameters, method parameters); every
#: expert at weight 1 unless said otherwise.
BASELINES = [
    ("task_arithmetic lambda=0.5", "task_arithmetic", {}, {"lambda": 0.5}),
    ("task_arithmetic lambda=0.7", "task_arithmetic", {}, {"lambda": 0.7}),
    ("task_arithmetic lambda=1.0", "task_arithmetic", {}, {"lambda": 1.0}),
    ("ties density=0.5", "ties", {"density": 0.5}, {}),
    ("ties density=0.8", "ties", {"density": 0.8}, {}),
    ("dare_ties density=0.5", "dare_ties", {"density": 0.5}, {}),
    ("uniform average", "linear", {}, {}),
]


def raced_setting(racing, directory: Path, key: str) -> str:
    """The ``rule`` or ``estimate`` a campaign races with: the experiment's where it names one;
    otherwise the one its journal was raced with (a campaign raced before ``hypervolume`` and
    ``neighbours`` became the defaults resumes on ``dominance`` and ``strata``), or the default for
    a new campaign."""
    if key in racing.model_fields_set:
        return getattr(racing, key)
    from evomerge.search.journal import JOURNAL, Journal
    from evomerge.search.racing import Racing

    return Racing.raced_with(Journal(Path(directory) / JOURNAL).header(), key) or getattr(racing, key)


def racing_gain(racing) -> float:
    """The least share of the front's hypervolume the hypervolume rule races with: the experiment's
    ``racing.gain``, else :data:`evomerge.search.racing.GAIN`."""
    from evomerge.search.racing import GAIN

    return GAIN if racing.gain is None else racing.gain


def baseline_recipes(base: str, experts: list[str], seed: int) -> list[tuple[str, object]]:
    """The hand baselines over ``experts`` as (label, Recipe); the uniform average is the experts'
    linear merge at equal weights (the base is not one of its inputs)."""
    from evomerge.recipe import parse_recipe

    out = []
    for label, method, per_model, shared in BASELINES:
        data = {
            "merge_method": method,
            "models": [{"model": m, "parameters": {"weight": 1.0, **per_model}} for m in experts],
            "evomerge": {"seed": seed},
        }
        if method != "linear":
            data["base_model"] = base
        if shared:
            data["parameters"] = shared
        out.append((label, parse_recipe(data, f"baseline {label}")))
    return out


@dataclass
class Budget:
    """Candidates to finish and minutes to spend, both over all runs of the campaign."""

    max_evaluations: int | None
    max_seconds: float | None
    elapsed0: float  # seconds spent by earlier runs
    started: float = field(default_factory=time.monotonic)

    def restart_clock(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.started

    def met(self, told: int) -> bool:
        return (self.max_evaluations is not None and told >= self.max_evaluations) or (
            self.max_seconds is not None and self.elapsed() >= self.max_seconds
        )

    def room(self, told: int, in_flight: int) -> int:
        """How many more candidates may be started now."""
        if self.met(told):
            return 0
        return 1 << 30 if self.max_evaluations is None else max(0, self.max_evaluations - told - in_flight)


class FailFast:
    """Holds back the failures that open a run until one result succeeds (or fails differently):
    when ``limit`` of them share one reason, the run halts and they stay untold, so ``resume``
    evaluates them again once the cause is fixed. Disarmed by the first other result."""

    def __init__(self, limit: int):
        self.limit, self.armed = limit, limit > 0
        self.held: list = []  # outcomes

    def admit(self, outcome) -> list:
        """The outcomes to tell now (in arrival order); raises Halted when the limit is reached."""
        if not self.armed:
            return [outcome]
        failed = outcome.score.status != "done"
        if failed and (not self.held or outcome.score.reason == self.held[0].score.reason):
            self.held.append(outcome)
            if len(self.held) >= self.limit:
                raise Halted(f"the first {len(self.held)} candidates all failed: {outcome.score.reason}")
            return []
        self.armed = False
        released, self.held = [*self.held, outcome], []
        return released


@contextmanager
def stop_signals():
    """Ctrl-C and SIGTERM raise Interrupted wherever the controller is (even when the shell that
    started it ignores SIGINT, as for background jobs); both are ignored while cleaning up after.
    Yields the signals received: Ray's C++ calls turn any exception raised inside them into a
    plain KeyboardInterrupt, so the signal's identity is kept here too."""
    received: list[int] = []

    def stop(signum, _frame):
        received.append(signum)
        raise Interrupted(signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)


@contextmanager
def restored_signals():
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def worker_pool(loaded: Loaded):
    """The pool of scoring workers the experiment asks for (not started)."""
    from evomerge.cluster.pool import WorkerPool
    from evomerge.cluster.worker import WorkerSpec
    from evomerge.environment import OFFLINE, QUIET_DEFAULTS, SAFETY

    exp, w = loaded.experiment, loaded.experiment.workers
    space = loaded.checked.space
    spec = WorkerSpec(
        # a path's workers hold its models whole; a merge's, the base and the experts' task vectors
        models=space.resident_models(exp.models),
        base=space.resident_base,
        resident=space.kind,
        evaluator=loaded.checked.evaluator,
        split=loaded.checked.evaluator.split,
        device=w.device,
        dtype=w.dtype,
        trust_remote_code=exp.trust_remote_code,
        allow_pickle=exp.allow_pickle,
        env={k: os.environ[k] for k in (*QUIET_DEFAULTS, *SAFETY, *OFFLINE) if k in os.environ},
        memory=w.memory,
    )
    return WorkerPool(
        spec,
        workers=w.count,
        cpus_per_worker=w.cpus_per_worker,
        gpus_per_worker=w.gpus_per_worker,
        address=w.address,
        resources=w.resources,
        temp_dir=loaded.directory / "ray",
        max_retries=w.max_retries,
        timeout_s=w.timeout_s,
        start_timeout_s=w.start_timeout_s or start_limit(spec.models.values()),
    )


#: Seconds a worker is given to start whatever it reads, and the read rate its models are given on top.
START_BASE_S, START_READ_BYTES_PER_S = 300.0, 50e6


def start_limit(models) -> float:
    """How long a worker may take to start: ``START_BASE_S`` plus its models' weight bytes read at
    ``START_READ_BYTES_PER_S`` (a slow disk or network filesystem; models not measurable here count 0)."""
    from evomerge.models.weights import stored_bytes

    read = sum(stored_bytes(ref) or 0 for ref in models)
    return START_BASE_S + read / START_READ_BYTES_PER_S


def make_tracker(loaded: Loaded):
    """The campaign's tracker, its store reached (MLflow imported, a new local store created):
    seconds of work that nothing of the workers' start waits for, so ``run`` does it meanwhile."""
    from evomerge.tracking.mlflow_tracker import Tracker

    exp = loaded.experiment
    uri, artifacts = loaded.tracking()
    return Tracker(
        uri,
        exp.tracking.experiment or exp.name,
        [o.name for o in loaded.objectives],
        [o.direction for o in loaded.objectives],
        artifacts,
        exp.tracking.refresh_s,
    )


def process_started() -> float:
    """When this process started, as ``time.time()``: its start in clock ticks since boot (/proc),
    against the clock since boot (psutil's create_time counts from a boot time rounded to the
    second); elsewhere psutil's, else now."""
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - int(after_name[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime
    except (OSError, ValueError, IndexError, AttributeError):
        try:
            import psutil

            return psutil.Process().create_time()
        except Exception:
            return time.time()


#: The start-up stages of a session in the order they are reached, with the words `evomerge status`
#: reports them in.
STARTUP_STAGES = {
    "checked": "checks",
    "ray": "Ray",
    "shared": "shared copy",
    "workers": "workers",
    "tracking": "MLflow",
}
#: Every stage ``Stages`` marks in a session, in order: the start-up, the kinship table, the search loop, the stop.
STAGES = (*STARTUP_STAGES, "kinship", "first_result", "last_result", "shutdown")


class Stages:
    """When each stage of a session ended, in seconds since this process was created (so that its
    imports and the experiment's checks count too); kept in ``campaign.json`` under ``sessions``."""

    def __init__(self):
        self.origin = process_started()
        self.at: dict[str, float] = {}

    def mark(self, stage: str, when: float | None = None) -> None:
        self.at.setdefault(stage, round((time.time() if when is None else when) - self.origin, 3))


#: Sessions (a run or a resume each) whose stages ``campaign.json`` keeps, the latest last.
SESSIONS_KEPT = 20


def open_tracker(loaded: Loaded, search, tracker):
    """The campaign's MLflow run (created, or reopened on resume) on ``tracker`` (``make_tracker``),
    with every candidate told before an interruption but never logged queued for logging."""
    exp = loaded.experiment
    params = flatten({"experiment": exp.model_dump(exclude={"output_dir"})})
    if exp.racing is not None:  # what it races with, its journal's where the experiment names none
        params["experiment.racing.estimate"] = raced_setting(exp.racing, loaded.directory, "estimate")
        params["experiment.racing.rule"] = rule = raced_setting(exp.racing, loaded.directory, "rule")
        if rule == "hypervolume":  # the gain it races with
            params["experiment.racing.gain"] = str(racing_gain(exp.racing))
    params.update({f"versions.{k}": v for k, v in loaded.state["versions"].items()})
    parent = tracker.open(
        loaded.state.get("parent_run_id"),
        params,
        {"evomerge.seed": str(exp.seed), "evomerge.campaign_dir": str(loaded.directory)},
        loaded.directory / EXPERIMENT_COPY,
    )
    if parent is None:  # the store failed: the campaign goes on, and a later resume logs it all
        return tracker
    if (loaded.state.get("parent_run_id"), loaded.state.get("experiment_id")) != (parent, tracker.experiment_id):
        loaded.state["parent_run_id"], loaded.state["experiment_id"] = parent, tracker.experiment_id
        loaded.save_state()
    genes = [g.name for g in search.genome.genes]
    for trial in search.trials:
        if trial.status != "running" and trial.id not in tracker.logged:
            tracker.candidate(trial, genes)
    return tracker


def log_kinship(loaded: Loaded, pool, tracker, display: Display) -> None:
    """Once per campaign: the experts' kinship table to the campaign run (a failure only warns)."""
    if not loaded.experiment.tracking.kinship or loaded.state.get("kinship_logged"):
        return
    display.update("kinship of the experts' task vectors ...", force=True)
    try:
        table = pool.kinship()
        if table is None:
            return
        tracker.log_kinship(table)
    except Exception as e:
        display.update(f"warning: kinship table not logged: {first_line(e)}", force=True)
        return
    flagged = [p for p in table["pairs"] if p["flags"]]
    pairs = ", ".join(f"{p['a']}~{p['b']}" for p in flagged)
    verdict = f"{len(flagged)} pair(s) flagged: {pairs}" if flagged else "no pair flagged"
    display.update(f"kinship of {len(table['experts'])} experts logged; {verdict}", force=True)
    loaded.state["kinship_logged"] = True
    loaded.save_state()


def run(loaded: Loaded, display: Display | None = None, on_result=None) -> dict:
    """Run (or continue) the campaign until its budget is met, it is interrupted or halted; returns a
    summary (``status``: FINISHED | KILLED | FAILED, ``stopped``: why it stopped early)."""
    return CampaignRun(loaded, display or Display(), on_result).execute()


class CampaignRun:
    """One session of a campaign: its search, workers and tracker, from start to a clean stop."""

    def __init__(self, loaded: Loaded, display: Display, on_result=None):
        exp = loaded.experiment
        self.loaded, self.display, self.on_result = loaded, display, on_result
        self.stages = Stages()
        self.search = search = loaded.search()
        seeds = seed_points(loaded, search)
        baselines = []
        if exp.seeds.baselines:
            space = loaded.checked.space
            baselines = baseline_recipes(space.base, list(space.models), exp.seed)
        outside = experts_outside(seeds)
        if not search.trials:
            for label, point in seeds:
                search.enqueue(point, label)
            for m in outside:  # what the space cannot express: the expert itself, outside the optimizer
                search.add_baseline(expert_alone_recipe(m, exp.seed), f"{m} alone", expert=m)
            for label, recipe in baselines:
                search.add_baseline(recipe, label)
        self.n_seeds = len(seeds) + len(outside) + len(baselines)
        b = exp.budget
        self.budget = Budget(
            b.max_evaluations, b.max_minutes * 60 if b.max_minutes else None, float(loaded.state.get("elapsed_s", 0.0))
        )
        halt = b.halt_after_failures
        self.fail_fast = FailFast(exp.workers.count + 2 if halt is None else halt)
        self.pool = self.tracker = self.preparing = None
        self.records = None  # the per-document records, once the workers have said their documents
        self.racer = None  # racing's fits and judgements (``evomerge.search.racing.Racer``), with the records
        self.status: RunStatus = "FAILED"
        self.stopped, self.exit_code = None, 0
        self.untracked: dict | None = None  # what MLflow did not get (see note_untracked)
        self.warned = False  # that MLflow failed, said while the search goes on

    def told(self) -> int:
        return sum(t.status != "running" for t in self.search.trials)

    def execute(self) -> dict:
        from evomerge.cluster.pool import PoolError

        loaded, search = self.loaded, self.search
        if self.budget.met(self.told()):  # nothing left to search: no workers; MLflow gets what it lacks
            return self._sync()
        self.pool = worker_pool(loaded)
        self.stages.mark("checked")
        with restored_signals():
            try:
                with stop_signals() as received:
                    self._start()
                    self.budget.restart_clock()
                    self._loop()
                    self.status = "FINISHED"
            except KeyboardInterrupt as e:
                stop = e if isinstance(e, Interrupted) else Interrupted(received[-1] if received else signal.SIGINT)
                self.status, self.stopped, self.exit_code = "KILLED", stop.why, 128 + stop.signum
            except (Halted, PoolError) as e:
                self.stopped, self.exit_code = f"halted: {e}", EXIT_HALTED
            except CampaignError:
                if loaded.new and self.tracker is None and not self.told():  # never ran: leave no campaign behind
                    self._abandon()
                raise
            finally:
                self._stop()
        return summary(loaded, search, self.stopped, self.status, self.exit_code, self.untracked)

    def _sync(self) -> dict:
        """A finished campaign resumed: every result MLflow has no run for is logged (a candidate's
        run is found by its trial tag, so none twice), then the final front, and the campaign run
        is ended again. Nothing missing: nothing logged but the run's end."""
        loaded, search = self.loaded, self.search
        self.tracker = tracker = open_tracker(loaded, search, make_tracker(loaded))
        lacking = tracker.missing(search.trials)
        owed = bool(lacking) or "untracked" in loaded.state  # the last session's final front too
        tracker.close("FINISHED", search.snapshot(loaded.reference_point) if owed else None)
        self.status = "FINISHED"
        self.note_untracked()
        loaded.save_state()
        out = summary(loaded, search, None, "FINISHED", self.exit_code, self.untracked)
        out["synced"] = [i for i in lacking if i in tracker.logged]
        return out

    def note_untracked(self) -> None:
        """What MLflow did not get this session (results, the campaign run's end), kept in
        campaign.json until a later session logs it; a finished campaign then exits EXIT_UNTRACKED."""
        tracker, state = self.tracker, self.loaded.state
        missing = tracker.missing(self.search.trials)
        if tracker.problem is None or (not missing and tracker.ended):
            state.pop("untracked", None)
            return
        self.untracked = state["untracked"] = {"trials": missing, "problem": tracker.problem, "uri": tracker.uri}
        if self.exit_code == 0:
            self.exit_code = EXIT_UNTRACKED

    def _start(self) -> None:
        """The workers, and meanwhile the tracker; then the campaign run and the kinship table."""
        from evomerge.background import Background
        from evomerge.cluster.pool import PoolError

        loaded, pool, stages = self.loaded, self.pool, self.stages
        self.display.update(f"starting {loaded.experiment.workers.count} worker(s) ...", force=True)
        self.preparing = Background(lambda: make_tracker(loaded), "tracker-start")  # started by the pool
        try:  # MLflow's import and store start while the workers load (the process only waits then)
            workers = pool.start(meanwhile=self.preparing.start)
        except PoolError as e:
            raise CampaignError(str(e)) from None
        finally:
            for stage, when in pool.stages.items():
                stages.mark(stage, when)
        loaded.state["workers"] = [  # where this run's workers were placed
            {k: w.get(k) for k in ("node_id", "node_address", "node_resources", "pid", "device")} for w in workers
        ]
        # the documents each task is scored on: recorded so that an export can show its report split's apart
        loaded.state["documents"] = workers[0].get("documents") if workers else None
        self.records = loaded.document_records()
        if self.search.racing is not None:
            from evomerge.search.racing import Racer

            pools, seeds = self.records.full_ids, self.n_seeds
            self.racer = Racer(self.search, self.records, pools, first_fit=seeds, reference=lambda: self.reference)
        nodes = len({w["node_id"] for w in workers})
        self.display.update(f"{len(workers)} worker(s) ready on {nodes} Ray node(s)", force=True)
        self.tracker = open_tracker(loaded, self.search, self.preparing.result())
        stages.mark("tracking")
        log_kinship(loaded, pool, self.tracker, self.display)
        stages.mark("kinship")

    def _abandon(self) -> None:
        """A new campaign that never ran: its workers stopped, its directory removed."""
        self.pool.shutdown()
        if self.preparing is not None:  # it may be writing the local store into the directory
            self.preparing.wait()
        self.loaded.release()
        _remove_new(self.loaded.directory, keep_dir=False)

    def _stop(self) -> None:
        """Save the state, end the campaign run while the workers stop, record the session."""
        loaded, tracker, display = self.loaded, self.tracker, self.display
        loaded.state["elapsed_s"] = self.budget.elapsed()
        if tracker is not None:  # the tracking thread ends the run while the workers stop
            tracker.finish(self.status, self.search.snapshot(loaded.reference_point))
        try:
            self.pool.shutdown()
            display.end()
            if loaded.directory.exists():
                loaded.state["finished"] = self.status == "FINISHED"
                loaded.save_state()
        finally:  # whatever the stop raised, the tracking thread is not left half-way (nor waited on unbounded)
            if tracker is not None:
                tracker.join()
                self.note_untracked()
            elif self.preparing is not None:
                self.preparing.wait()
        self.stages.mark("shutdown")
        record_session(loaded, self.stages, self.status, display)

    def _loop(self) -> None:
        """Keep every worker busy until the budget is met and nothing is in flight."""
        search, pool, budget, tracker = self.search, self.pool, self.budget, self.tracker
        log_samples = self.loaded.experiment.tracking.log_samples
        told = self.told()
        self.session0, self.reference = told, self.loaded.reference_point
        self._fix_reference()  # a campaign killed before it saved the reference fixes the same one now
        while not (budget.met(told) and not pool.in_flight):
            for _ in range(min(pool.free, budget.room(told, pool.in_flight + search.parked))):
                if not budget.room(told, pool.in_flight + search.parked):  # a repeat told, a twin parked
                    break
                if self.racer is not None:  # anchors fitted (or refitted) before the next candidate
                    self.racer.maybe_fit()
                trial = search.ask()
                original = search.repeat_of(trial)
                if original is not None:  # a recipe scored in full already: its result, no documents
                    told += self._told(search.tell_repeat(trial, original))
                    continue
                if search.park(trial):  # the same recipe is being scored: its result, once in
                    continue
                recipe = trial.recipe.model_dump(exclude_none=True)
                documents = (self.racer or search).documents_for(trial)
                pool.submit(trial.id, recipe, log_samples=log_samples, documents=documents)
            for outcome in pool.poll(timeout=1.0):
                for result in self.fail_fast.admit(outcome):
                    told += self._record(result)
                self.display.update(lambda: progress_line(search, budget, self.session0, tracker.latest))
            if tracker.problem is not None and not self.warned:  # said once: the search goes on
                self.warned = True
                self.display.update(f"warning: MLflow ({tracker.uri}): {tracker.problem}; {GOES_ON}", force=True)
            if tracker.due():
                tracker.publish(search.snapshot(self.reference))

    def _record(self, result) -> int:
        """One worker's result told to the search and the tracker; 1 if it ended a trial, 0 if the
        trial goes on to its next rung."""
        search, score = self.search, result.score
        info = {
            "timings": score.timings,
            "attempts": result.attempts,
            "wall_s": result.seconds,
            "worker": result.worker,
            "documents": int(score.timings.get("documents", 0)),
            **({"reason": score.reason} if score.reason else {}),
        }
        from evomerge.search.racing import settle

        values = score.values if score.status == "done" else None
        trial = settle(search, self.racer, self.records, search.trials[result.key], values, score.per_document, info)
        if trial is None:  # promoted to the next rung (or from racing's anchors to the full evaluation)
            return 0
        self.stages.mark("first_result")
        self.stages.at["last_result"] = round(time.time() - self.stages.origin, 3)
        told = self._told(trial, score.samples)
        return told + sum(self._told(twin) for twin in search.release(trial))

    def _fix_reference(self) -> None:
        """Fix the hypervolume reference (where the experiment gives none) once the first ``n_seeds``
        results in full are told: their worst on each objective, taken in the journal's order, so that
        a resumed campaign fixes the one its uninterrupted self would have."""
        n = max(1, self.n_seeds)
        if self.reference is None and len(self.search.full_order) >= n:
            self.reference = self.loaded.state["reference_point"] = worst(self.search, self.search.directions, n)
            self.loaded.save_state()

    def _told(self, trial, samples: dict | None = None) -> int:
        """A trial's final result logged, the reference point fixed once the seeds are in; 1."""
        search = self.search
        self.tracker.candidate(trial, [g.name for g in search.genome.genes], samples=samples)
        if self.racer is not None and trial.estimate is not None and trial.full and self.racer.checked(trial):
            self.tracker.metrics(self.racer.metrics(), sum(t.status != "running" for t in search.trials))
        self._fix_reference()
        if self.on_result:
            self.on_result(trial)
        return 1


def record_session(loaded: Loaded, stages: Stages, status: RunStatus, display: Display) -> None:
    """Add the session's stages to campaign.json (the last SESSIONS_KEPT); a failure only warns: the
    campaign's own state was saved before."""
    if not loaded.directory.exists():
        return
    sessions = loaded.state.setdefault("sessions", [])
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stages.origin))
    sessions.append({"started": started, "status": status, "stages": stages.at})
    del sessions[:-SESSIONS_KEPT]
    try:
        loaded.save_state()
    except (OSError, CampaignError) as e:
        display.update(f"warning: the session's stages not recorded: {first_line(e)}", force=True)


def worst(search, directions, n: int) -> list[float]:
    """The worst of the first ``n`` results in full on each objective, in the journal's order."""
    values = [search.trials[i].values for i in search.full_order[:n]]
    return [(min if d == "maximize" else max)(v[j] for v in values) for j, d in enumerate(directions)]


def progress_line(search, budget: Budget, session0: int, front) -> str:
    """``front``: the last FrontSnapshot tracking applied (at most refresh_s old; sorting the front
    again for every line shown would cost O(N^2) per line)."""
    told = [t for t in search.trials if t.status != "running"]
    done = search.finished
    parts = [f"evaluations {len(told)}" + (f"/{budget.max_evaluations}" if budget.max_evaluations else "")]
    if done:
        best = []
        for j, o in enumerate(search.objectives):
            pick = max if o.direction == "maximize" else min
            best.append(f"{o.name} {pick(t.values[j] for t in done):.4g}")
        parts.append("best " + ", ".join(best))
    if front is not None and front.front:
        parts.append(f"front {len(front.front)}")
        if front.hypervolume is not None:
            parts.append(f"hv {front.hypervolume:.4g}")
    # the run summary's words: a candidate stopped at a lower rung is done, not failed
    parts.append(f"{sum(t.status == 'failed' for t in told)} failed")
    if search.stopped_early:
        parts.append(f"{len(search.stopped_early)} stopped {stopped_where(search)}")
    spent = time.monotonic() - budget.started
    rate = (len(told) - session0) / spent if spent > 0 else 0.0
    if rate > 0:
        left = []
        if budget.max_evaluations:
            left.append((budget.max_evaluations - len(told)) / rate)
        if budget.max_seconds:
            left.append(budget.max_seconds - budget.elapsed())
        if left:
            eta = max(0, min(left))
            parts.append(f"{rate:.2f}/s, ETA {int(eta // 60)}:{int(eta % 60):02d}")
    return " | ".join(parts)


def stopped_where(search) -> str:
    """Where a candidate stopped early stopped: on its anchor documents (racing) or at a lower rung."""
    return "on their anchor documents" if search.racing is not None else "at a lower rung"


def summary(
    loaded: Loaded, search, stopped: str | None, status: RunStatus, exit_code: int = 0, untracked: dict | None = None
) -> dict:
    """What a run did; ``exit``: the process's exit status for it (0, 128 + signal, EXIT_HALTED or
    EXIT_UNTRACKED); ``untracked``: what MLflow did not get, if anything."""
    told = [t for t in search.trials if t.status != "running"]
    reference = loaded.reference_point
    out = {
        "directory": str(loaded.directory),
        "evaluations": len(told),
        "done": len(search.finished),
        "failed": sum(t.status == "failed" for t in told),
        "stopped_early": len(search.stopped_early),
        "raced": len(search.raced),
        "repeats": len(search.repeats),
        "documents": search.documents,
        "front": [t.id for t in search.front()],
        "status": status,
        "stopped": stopped,
        "stopped_where": stopped_where(search),
        "exit": exit_code,
        "parent_run_id": loaded.state.get("parent_run_id"),
        "experiment_id": loaded.state.get("experiment_id"),
        "tracking_uri": loaded.tracking()[0],
        "budget": loaded.experiment.budget.max_evaluations,
        "untracked": untracked,
    }
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
    rows = [
        {"trial": t.id, **{o.name: v for o, v in zip(loaded.objectives, t.values)}, "crowding": c}
        for t, c in zip(front, crowd)
    ]
    first = loaded.objectives[0]
    return sorted(rows, key=lambda r: r[first.name], reverse=first.direction == "maximize")


def pick(loaded: Loaded, search, trial: int | None = None, weights: dict[str, float] | None = None):
    """The trial to export: by id, by weights over the front, or the best: a single objective's best
    weighted sum; several that share a direction (scores on one scale): the best mean over them on
    the search split (a member of the front, whatever kind: a hand baseline or an expert alone that
    beats every searched candidate is the honest pick); several of mixed directions: the front's knee."""
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
            raise CampaignError(
                f"--weights: unknown objective(s) {', '.join(unknown)}; "
                f"objectives: {', '.join(o.name for o in objectives)}"
            )
        try:
            return done[weighted_pick(points, directions, [weights.get(o.name, 0.0) for o in objectives])]
        except ValueError as e:
            raise CampaignError(f"--weights: {e}") from None
    if len(objectives) == 1:
        return min(done, key=lambda t: (scalarize(t.values, objectives), t.id))
    if len(set(directions)) == 1:
        sign = 1.0 if directions[0] == "maximize" else -1.0
        return max(done, key=lambda t: (sign * sum(t.values) / len(t.values), -t.id))
    return done[knee(points, directions)]
