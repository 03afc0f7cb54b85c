"""A pool of scoring workers on Ray: dispatch as soon as a worker is free, survive worker deaths.

The pool runs on a ``RayRuntime`` (``evomerge.cluster.runtime``): a private local Ray it starts and
shuts down, or a cluster it joins and leaves running.

Fault tolerance: workers are actors that Ray restarts when their process dies. A candidate whose
worker died (or overran ``timeout_s``: the worker is killed and restarted) is retried up to
``max_retries`` times, then reported failed with the reason once its worker is back (so a node that
died is never taken for the candidate's failure). Results already returned are never affected.

Node loss: the pool asks its runtime on every poll whether the Ray node is still there, and raises
``PoolError`` ("the Ray node died: ...", "lost the connection to the Ray cluster: ...") instead of
waiting forever on workers that will never come back; a private Ray's raylet or GCS exiting is seen
within ``PROBE_EVERY`` seconds. Candidates returned before are never affected; those in flight stay
unreturned (``in_flight`` still counts them).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from evomerge.background import Background
from evomerge.cluster.runtime import RayRuntime
from evomerge.cluster.worker import ScoringWorker, WorkerSpec
from evomerge.errors import first_line
from evomerge.evaluate.candidate import Score
from evomerge.merge.registry import MergeError

#: Seconds between readiness probes of a worker that is being restarted.
PROBE_EVERY = 0.5
#: Seconds to fetch a finished candidate's result (it may live on another node that just died).
RESULT_TIMEOUT = 60.0

SlotState = Literal["starting", "idle", "busy", "restarting"]


class PoolError(RuntimeError):
    """The pool could not start (Ray, or a worker failing to load its models), or its Ray node is gone."""


@dataclass
class Outcome:
    """A finished candidate: its key, score, which worker scored it, tries, and wall seconds from
    first dispatch to result (includes queueing, transfer and any retries)."""

    key: Any
    score: Score
    worker: int
    attempts: int
    seconds: float
    pid: int | None = None


@dataclass
class _Job:
    key: Any
    recipe: dict
    log_samples: bool
    documents: int | dict[str, list[int]] | None = None  # per task: a rung's count, or racing's ids; None: the limit
    attempts: int = 0
    first_dispatch: float | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    index: int
    actor: Any
    state: SlotState = "starting"
    job: _Job | None = None
    ref: Any = None  # the running score call, or the readiness probe
    since: float = 0.0
    next_probe: float = 0.0
    info: dict = field(default_factory=dict)
    kill_reason: str | None = None  # set when the pool killed the worker itself (timeout)


#: The automatic per-candidate limit (no ``timeout_s``): a worker that stops answering (stopped,
#: hung in a kernel or a code task) is killed and restarted instead of holding the campaign forever.
AUTO_FACTOR, AUTO_FLOOR_S, AUTO_FIRST_S = 10.0, 600.0, 7200.0


class WorkerPool:
    def __init__(
        self,
        spec: WorkerSpec,
        workers: int = 1,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        address: str | None = None,
        temp_dir: str | Path | None = None,
        max_retries: int = 2,
        timeout_s: float | None = None,
        start_timeout_s: float = 300.0,
        resources: dict[str, float] | None = None,
    ):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.spec, self.n = spec, workers
        self.cpus, self.gpus = cpus_per_worker, gpus_per_worker
        self.max_retries, self.timeout_s, self.start_timeout_s = max_retries, timeout_s, start_timeout_s
        #: Without ``timeout_s``, the automatic limit: ``auto_factor`` x the slowest evaluation so far,
        #: at least ``auto_floor_s``; ``auto_first_s`` until an evaluation has finished.
        self.auto_factor, self.auto_floor_s, self.auto_first_s = AUTO_FACTOR, AUTO_FLOOR_S, AUTO_FIRST_S
        self.slowest: float | None = None  # seconds of the slowest evaluation finished so far
        self.resources = dict(resources or {})
        self.runtime = RayRuntime(address, temp_dir)
        self.slots: list[_Slot] = []
        self.queue: deque[_Job] = deque()
        self.restarts = 0
        self._store = None
        self._inputs = None  # the shared copy's inputs, parameter names included
        #: when start() passed each stage (time.time()): ray (up or joined), shared (the shared copy
        #: is in the object store), workers (every worker ready)
        self.stages: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, meanwhile: Callable[[], None] | None = None) -> list[dict]:
        """Start (or join) Ray and the workers; wait until every worker has loaded its models.
        ``meanwhile``: called once the workers are starting, before the wait (work of this process
        that would otherwise take the interpreter from Ray's own start-up)."""
        from evomerge import environment

        environment.configure()
        import ray

        if ray.is_initialized():
            raise PoolError("Ray is already initialized in this process; one pool per process")
        share = self.spec.memory.share and self.spec.resident == "merge"  # a path holds no task vectors
        # the shared copy's exact size needs the parameter names (transformers, seconds to import): they
        # are read while Ray starts, which is sized from the safetensors headers (at least that size)
        naming, shared_bytes = self._read_models() if share else (None, 0)
        try:
            self.runtime.start(self.n * self.cpus, self.n * self.gpus, shared_bytes)
        except Exception as e:
            raise PoolError(f"cannot start Ray: {first_line(e, with_type=True)}") from None
        self.stages["ray"] = time.time()
        publishing = self._define_workers(naming)
        # the workers start (imports, evaluator, tasks) while the store reads the models; they ask it
        # for the refs once they need them, which it answers once its publish has ended
        self.slots = [_Slot(i, self._make()) for i in range(self.n)]
        if meanwhile is not None:
            meanwhile()
        if publishing is not None:
            self._await_shared(publishing)
        self._await_workers()
        self.stages["workers"] = time.time()
        self._placement()
        return [s.info for s in self.slots]

    def _define_workers(self, naming: Background | None):
        """Set how a worker is made (``_make``); with ``naming`` (the shared copy's parameter names
        being read), first start publishing the shared copy and return the ref to wait for."""
        import ray

        actor_cls = ray.remote(ScoringWorker)
        threads = self.spec.threads or max(1, int(self.cpus))
        spec = replace(self.spec, threads=threads)
        publishing = None
        if naming is not None:
            try:
                shared, publishing = self._publish(self._shared_bytes(naming))
                spec = replace(spec, shared=shared)
            except BaseException:
                self.shutdown()
                raise
        # Ray restarts a dead worker (forever); the pool counts retries per candidate itself.
        self._make = lambda: actor_cls.options(
            num_cpus=self.cpus, num_gpus=self.gpus, resources=self.resources, max_restarts=-1, max_task_retries=0
        ).remote(spec)
        return publishing

    def _await_shared(self, publishing) -> None:
        """Wait until the shared copy is in the object store (the pool is shut down if it cannot be)."""
        import ray

        try:
            ray.get(publishing)
            self.stages["shared"] = time.time()
        except BaseException as e:
            self.shutdown()
            if isinstance(e, Exception):
                raise PoolError(f"cannot share the models: {_cause(e)}") from None
            raise

    def _await_workers(self) -> None:
        """Wait until every worker has loaded its models, at most ``start_timeout_s`` seconds (the
        pool is shut down if one cannot, or the Ray node is lost meanwhile)."""
        import ray

        refs = {s.actor.ready.remote(): s for s in self.slots}
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while refs:
                if lost := self.runtime.node_lost():
                    raise PoolError(lost)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolError(self._not_started(sorted(s.index for s in refs.values())))
                done, _ = ray.wait(list(refs), num_returns=1, timeout=min(PROBE_EVERY, left))
                if not done:
                    continue
                slot = refs.pop(done[0])
                try:
                    slot.info = ray.get(done[0])
                except Exception as e:
                    raise PoolError(f"worker {slot.index} failed to start: {_cause(e)}") from None
                slot.state = "idle"
        except BaseException:
            self.shutdown()
            raise

    def _not_started(self, waiting: list[int]) -> str:
        """Why workers ``waiting`` were not ready in time: the cluster lacks what they ask for, or they
        were still loading."""
        import ray

        have, short = ray.cluster_resources(), []
        for name, each in [("CPU", self.cpus), ("GPU", self.gpus), *self.resources.items()]:
            if each and have.get(name, 0) < self.n * each:
                short.append(f"{have.get(name, 0):g} {name} for {self.n} worker(s) of {each:g}")
        which = f"worker(s) {', '.join(map(str, waiting))} of {self.n}"
        if short:
            return f"{which} could not be placed within {self.start_timeout_s:g} s: the cluster has {'; '.join(short)}"
        return (
            f"{which} were still loading their models ({len(self.spec.models)}) and tasks after "
            f"{self.start_timeout_s:g} s; give them longer with workers.start_timeout_s"
        )

    def kinship(self) -> dict | None:
        """The experts' kinship table, computed by an idle worker from its resident task vectors
        (no disk read); call before submitting candidates. Waits for it (Ctrl-C stops the wait like
        any other), so the worker is idle again when candidates come."""
        import ray

        slot = next((s for s in self.slots if s.state == "idle"), None)
        if slot is None:
            return None
        try:  # bounded like a first evaluation: a worker that stops answering does not hold the start
            return ray.get(slot.actor.kinship.remote(), timeout=self.limit_s())
        except ray.exceptions.GetTimeoutError:
            ray.kill(slot.actor, no_restart=False)
            self._restarting(slot)
            raise PoolError(f"the kinship table took over {self.limit_s():g} s: its worker was restarted") from None

    def _placement(self) -> None:
        """Add to each worker's info the node it runs on: address and custom resources (its labels)."""
        import ray

        from evomerge.cluster import RAY_STANDARD_RESOURCES as standard

        nodes = {n["NodeID"]: n for n in ray.nodes()}
        for slot in self.slots:
            node = nodes.get(slot.info.get("node_id"), {})
            slot.info["node_address"] = node.get("NodeManagerAddress")
            slot.info["node_resources"] = {
                k: v for k, v in node.get("Resources", {}).items() if k not in standard and not k.startswith("node:")
            }

    def _read_models(self) -> tuple[Background, int]:
        """Start reading the parameter names (a thread) and return it with the shared copy's size
        over the tensors the files hold (headers only; pickled checkpoints: the exact size, now)."""
        from evomerge.merge.shared import plan_bytes, stored_names, with_names

        inputs = self.spec.shared_inputs()
        try:  # headers only: cheap, and a model that cannot be read is reported before Ray starts
            stored = stored_names(inputs)
            estimate = sum(plan_bytes(replace(inputs, names=stored)).values()) if stored is not None else None
        except Exception:  # a header it cannot size (an odd buffer), or the model's own fault: the exact way
            estimate = None
        if estimate is None:
            with _models_error():
                inputs = with_names(inputs)
                estimate = sum(plan_bytes(inputs).values())
        naming = Background(lambda: with_names(inputs), "parameter-names")
        naming.start()
        return naming, estimate

    def _shared_bytes(self, naming: Background) -> int:
        """The shared copy's exact size, once ``naming`` has read the parameter names."""
        from evomerge.merge.shared import plan_bytes

        with _models_error():
            self._inputs = naming.result()  # sent to the producer, which then needs no transformers
            return sum(plan_bytes(self._inputs).values())

    def _publish(self, nbytes: int):
        """Start putting one copy of the base and the task vectors in Ray's object store (one per
        node that runs workers), after checking that every node's store can hold them. Returns the
        store's name and the ref of its publishing, to wait for."""
        import ray

        from evomerge.cluster.store import SharedStoreActor

        stores = {
            n["NodeManagerAddress"]: n["Resources"].get("object_store_memory", 0)
            for n in ray.nodes()
            if n["Alive"] and n["Resources"].get("CPU", 0) >= self.cpus
        }
        small = {a: b for a, b in stores.items() if b < nbytes}
        if small:
            address, have = next(iter(small.items()))
            raise PoolError(
                f"the shared models need {nbytes / 2**30:.2f} GiB of Ray's object store, node {address} "
                f"has {have / 2**30:.2f} GiB (start Ray with a larger --object-store-memory, or set "
                "workers.memory.share: false)"
            )
        # named: the workers look it up by name (a handle among their constructor arguments would
        # count as an object-store dependency, which Ray warns about for restartable actors)
        name = f"shared-store-{os.getpid()}-{time.monotonic_ns()}"
        store = SharedStoreActor.options(num_cpus=0, max_restarts=0, name=name, max_concurrency=self.n).remote()
        self._store = store  # it owns the objects: they live while it does, as long as the pool
        # the workers ask the store for the refs by its name; the caller waits for the publishing
        return name, store.publish.remote(asdict(self._inputs))

    def shutdown(self) -> None:
        """Stop the workers and, if this pool started Ray, that Ray (and only it); a joined cluster
        is left running, this process disconnected from it."""
        import ray

        lost = self.runtime.lost
        if ray.is_initialized():
            for slot in self.slots if not lost else ():  # ray.kill blocks while the GCS is gone
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:
                    pass
            if self._store is not None and not lost:
                try:
                    ray.kill(self._store)
                except Exception:
                    pass
            self._store = None
        self.runtime.stop()
        self.slots = []

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- work -------------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        """Workers that would start a new candidate right now (idle, nothing queued for them)."""
        return max(0, sum(s.state == "idle" for s in self.slots) - len(self.queue))

    @property
    def in_flight(self) -> int:
        """Candidates submitted and not yet returned by ``poll``."""
        return len(self.queue) + sum(s.job is not None for s in self.slots)

    def submit(
        self, key: Any, recipe: dict, log_samples: bool = False, documents: int | dict[str, list[int]] | None = None
    ) -> None:
        """Queue a candidate (a recipe as a plain dict), scored on ``documents`` per task (default: the
        evaluator's limit; a task -> ids mapping names them); it starts on the first free worker."""
        self.queue.append(_Job(key, recipe, log_samples, documents))
        self._dispatch()

    def _dispatch(self) -> None:
        for slot in self.slots:
            if not self.queue:
                return
            if slot.state == "idle":
                job = self.queue.popleft()
                job.attempts += 1
                job.first_dispatch = job.first_dispatch or time.perf_counter()
                slot.state, slot.job, slot.since = "busy", job, time.monotonic()
                slot.ref = slot.actor.score.remote(job.recipe, job.log_samples, job.documents)

    def poll(self, timeout: float | None = None) -> list[Outcome]:
        """Wait up to ``timeout`` seconds (None: until something finishes) and return every candidate
        finished by then, in completion order; also handles worker deaths, restarts and timeouts."""
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Outcome] = []
        while True:
            if lost := self.runtime.node_lost():
                if out:  # hand over what finished; the next call raises
                    return out
                raise PoolError(lost)
            self._probe_restarting()
            self._kill_overdue()
            self._dispatch()
            refs = {s.ref: s for s in self.slots if s.ref is not None}
            if not refs and not self.queue:
                return out
            now = time.monotonic()
            wait = 0.0 if out else (PROBE_EVERY if deadline is None else max(0.0, min(PROBE_EVERY, deadline - now)))
            limit = self.limit_s()  # wake up when the first busy worker becomes overdue
            if limit is not None:
                due = [s.since + limit - now for s in self.slots if s.state == "busy" and not s.kill_reason]
                wait = min(wait, PROBE_EVERY, *(max(0.0, d) + 0.001 for d in due))
            done = []
            if refs:  # the first to finish, then whatever else is ready already
                done, rest = ray.wait(list(refs), num_returns=1, timeout=wait)
                if done and rest:
                    done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            elif wait:
                time.sleep(wait)
            for ref in done:
                slot = refs[ref]
                result = self._collect(slot, ref) if slot.state == "busy" else self._restart_probe_done(slot, ref)
                if result is not None:
                    out.append(result)
            if out and not done:
                return out
            if deadline is not None and time.monotonic() >= deadline:
                return out

    def _collect(self, slot: _Slot, ref) -> Outcome | None:
        import ray

        job = slot.job
        slot.job, slot.ref = None, None
        try:
            result = ray.get(ref, timeout=RESULT_TIMEOUT)
        except ray.exceptions.RayActorError as e:
            reason = slot.kill_reason or f"worker died during evaluation ({_cause(e)})"
            slot.kill_reason = None
            job.reasons.append(reason)
            self._restarting(slot)
            if job.attempts <= self.max_retries:
                self.queue.appendleft(job)
            else:  # failed once the worker is back: had its node died, the candidate must stay unreturned
                slot.job = job
            return None
        except Exception as e:  # the call itself raised (a bug in the worker): fail the candidate, keep the worker
            slot.state = "idle"
            return self._outcome(job, Score("failed", reason=f"worker raised {_cause(e)}"), slot)
        slot.state = "idle"
        self.slowest = max(self.slowest or 0.0, time.monotonic() - slot.since)
        score = Score(
            result["status"],
            values=result["values"],
            reason=result["reason"],
            timings=result["timings"],
            samples=result.get("samples"),
            per_document=result.get("per_document"),
        )
        return self._outcome(job, score, slot, pid=result.get("pid"))

    def _outcome(self, job: _Job, score: Score, slot: _Slot, pid: int | None = None) -> Outcome:
        seconds = time.perf_counter() - (job.first_dispatch or time.perf_counter())
        if job.reasons and score.status == "done":
            score.timings["retried_after"] = job.reasons[-1]
        return Outcome(job.key, score, slot.index, job.attempts, seconds, pid)

    def _restarting(self, slot: _Slot) -> None:
        self.restarts += 1
        slot.state, slot.ref, slot.next_probe = "restarting", None, time.monotonic()

    def _probe_restarting(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "restarting" and slot.ref is None and now >= slot.next_probe:
                slot.ref = slot.actor.ready.remote()

    def _restart_probe_done(self, slot: _Slot, ref) -> Outcome | None:
        import ray

        slot.ref = None
        try:
            slot.info = ray.get(ref)
            slot.state = "idle"
            if slot.job is not None:  # the candidate that ran out of attempts on this worker
                job, slot.job = slot.job, None
                reason = f"{job.reasons[-1]}; gave up after {job.attempts} attempts"
                return self._outcome(job, Score("failed", reason=reason), slot)
        except ray.exceptions.ActorUnavailableError:  # still coming back
            slot.next_probe = time.monotonic() + PROBE_EVERY
        except ray.exceptions.RayActorError:  # gone for good: a fresh worker in its place
            slot.actor = self._make()
            slot.next_probe = time.monotonic()

    def _kill_overdue(self) -> None:
        import ray

        limit, now = self.limit_s(), time.monotonic()
        for slot in self.slots:
            if slot.state == "busy" and now - slot.since > limit and not slot.kill_reason:
                slot.kill_reason = (
                    f"evaluation exceeded timeout_s={limit:g}"
                    if self.timeout_s is not None
                    else f"evaluation exceeded the automatic limit of {limit:.0f} s ({self.auto_factor:g} x the "
                    f"slowest evaluation so far, at least {self.auto_floor_s:g} s; set workers.timeout_s to choose)"
                )
                ray.kill(slot.actor, no_restart=False)

    def limit_s(self) -> float:
        """Seconds an evaluation may take: ``timeout_s``, else the automatic limit."""
        if self.timeout_s is not None:
            return self.timeout_s
        if self.slowest is None:
            return self.auto_first_s
        return max(self.auto_floor_s, self.auto_factor * self.slowest)

    def worker_pids(self) -> list[int | None]:
        return [s.info.get("pid") for s in self.slots]


@contextmanager
def _models_error():
    """Errors reading the models, as the PoolError a campaign reports in one line."""
    try:
        yield
    except Exception as e:
        reason = str(e) if isinstance(e, MergeError) else first_line(e, with_type=True)
        raise PoolError(f"cannot read the models: {reason}") from None


def _cause(e: BaseException) -> str:
    """The root cause of a Ray error in one line (Ray wraps the worker's exception and traceback)."""
    cause = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    if isinstance(cause, BaseException) and cause is not e:
        return _cause(cause)
    text = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    # Ray's messages put the original exception's "Type: message" on the last line
    last = text[-1].strip() if text else type(e).__name__
    return last if len(last) < 300 else last[:300] + "..."
