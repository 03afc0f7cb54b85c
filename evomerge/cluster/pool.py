"""A pool of scoring workers on Ray: dispatch as soon as a worker is free, survive worker deaths.

By default the pool starts a private local Ray (``address="local"``: never an existing cluster found
on the machine), bound to loopback, with its temporary files under the campaign directory, and shuts
exactly that Ray down at the end (never ``ray stop``, which would kill every Ray on the machine).
Given an address it joins that cluster instead and leaves it running.

Fault tolerance: workers are actors that Ray restarts when their process dies. A candidate whose
worker died (or overran ``timeout_s``: the worker is killed and restarted) is retried up to
``max_retries`` times, then reported failed with the reason once its worker is back (so a node that
died is never taken for the candidate's failure). Results already returned are never affected.

Node loss: the pool checks on every poll that the Ray node is still there, and raises ``PoolError``
("the Ray node died: ...", "lost the connection to the Ray cluster: ...") instead of waiting forever
on workers that will never come back. A private Ray's raylet or GCS process exiting is seen within
``PROBE_EVERY`` seconds; besides, every ``NODE_CHECK_EVERY`` seconds the GCS is asked whether this
driver's node is alive, which bounds the detection on a joined cluster at about 25 s (the GCS marks a
node dead after ~15 s of missed health checks) and a GCS that stops answering at
``NODE_CHECK_EVERY + GCS_TIMEOUT`` seconds. Candidates returned before are never affected; those in
flight stay unreturned (``in_flight`` still counts them).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import psutil

from evomerge.cluster.worker import ScoringWorker, WorkerSpec
from evomerge.errors import first_line
from evomerge.evaluate.candidate import Score
from evomerge.merge.memory import MemoryPolicy
from evomerge.merge.registry import MergeError

#: Unix socket paths are limited to 107 bytes; Ray puts ~70 characters of its own under its temp dir.
MAX_TEMP_DIR = 36
#: Seconds between readiness probes of a worker that is being restarted.
PROBE_EVERY = 0.5
#: Seconds between asking the GCS whether this driver's node is alive.
NODE_CHECK_EVERY = 5.0
#: Seconds the GCS may take to answer before the connection counts as lost (well under the 60 s
#: after which Ray aborts a driver that cannot reach its GCS).
GCS_TIMEOUT = 5.0
#: Seconds to fetch a finished candidate's result (it may live on another node that just died).
RESULT_TIMEOUT = 60.0

SlotState = Literal["starting", "idle", "busy", "restarting"]


def cluster_mode(address: str | None) -> bool:
    """Whether this driver joins ``address`` as a node of a multi-node cluster, so that Ray must find
    this node's own address (as ``ray start`` does by default), rather than a loopback-only Ray: a
    private one, or one whose address is the literal loopback (127.0.0.1, localhost), which Ray would
    otherwise rewrite to the machine's external address and miss."""
    if address in (None, "local"):
        return False
    if address.startswith("ray://"):
        return True
    if address == "auto":  # the cluster `ray start` made on this node, or RAY_ADDRESS
        try:
            from ray._private.services import get_ray_address_from_environment

            address = get_ray_address_from_environment("auto", None) or ""
        except Exception:
            return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host not in ("", "127.0.0.1", "localhost", "::1")


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
    documents: int | None = None  # per task (a multi-fidelity rung); None: the evaluator's limit
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
        self.address, self.temp_dir = address, Path(temp_dir) if temp_dir else None
        self.max_retries, self.timeout_s, self.start_timeout_s = max_retries, timeout_s, start_timeout_s
        self.resources = dict(resources or {})
        self.slots: list[_Slot] = []
        self.queue: deque[_Job] = deque()
        self.started_ray = False
        self.restarts = 0
        self._ray_dir: Path | None = None
        self._ray_temp: str | None = None  # the private Ray's temp dir, as Ray was given it
        self._reaper = None
        self._node_id = None
        self._store = None
        self._inputs = None  # the shared copy's inputs, parameter names included
        self._next_node_check = 0.0
        self.lost: str | None = None  # why the Ray node is gone, once it is
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
        from ray._private import ray_constants

        # evomerge's environment keeps Ray on loopback (SAFETY), which a private Ray needs; a driver that
        # joins a multi-node cluster must see this node's address as the cluster's nodes do (read per call)
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode(self.address)
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "namespace": "evomerge"}
        share = MemoryPolicy(**self.spec.memory).share and not self.spec.path  # a path holds no task vectors
        # the shared copy's exact size needs the parameter names (transformers, seconds to import): they
        # are read while Ray starts, which is sized from the safetensors headers (at least that size)
        naming, shared_bytes = self._read_models() if share else (None, 0)
        if self.address in (None, "local"):
            cpus = max(1, int(round(self.n * self.cpus)))
            gpus = int(-(-self.n * self.gpus // 1)) if self.gpus else 0
            self._ray_temp = self._private_temp_dir()
            kwargs.update(
                address="local",
                num_cpus=cpus,
                num_gpus=gpus,
                _node_ip_address="127.0.0.1",
                _temp_dir=self._ray_temp,
                include_dashboard=False,
            )
            if shared_bytes:  # room for the shared models beside Ray's own objects, when its default is less
                default = int(0.3 * psutil.virtual_memory().available)
                kwargs["object_store_memory"] = max(default, int(shared_bytes * 1.1) + (256 << 20))
            self.started_ray = True
        else:
            kwargs["address"] = self.address
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            ray.init(**kwargs)
        except Exception as e:
            self.started_ray = False
            raise PoolError(f"cannot start Ray: {first_line(e, with_type=True)}") from None
        finally:  # ray.init installs its own SIGTERM handlers (C and Python): the caller's must win
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
        self.stages["ray"] = time.time()
        if naming is not None:
            try:
                shared_bytes = self._shared_bytes(naming)
            except BaseException:
                self.shutdown()
                raise
        self.lost, self._next_node_check = None, time.monotonic() + NODE_CHECK_EVERY
        self._node_id = ray.NodeID.from_hex(ray.get_runtime_context().get_node_id())
        if self.started_ray:  # ends this Ray's leftovers should the controller be killed
            import subprocess
            import sys

            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "evomerge.cluster.reaper", str(os.getpid()), self._ray_temp],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        actor_cls = ray.remote(ScoringWorker)
        threads = self.spec.threads or max(1, int(self.cpus))
        spec = {**self.spec.to_dict(), "threads": threads}
        publishing = None
        if share:
            try:
                spec["shared"], publishing = self._publish(shared_bytes)
            except BaseException:
                self.shutdown()
                raise
        # Ray restarts a dead worker (forever); the pool counts retries per candidate itself.
        self._make = lambda: actor_cls.options(
            num_cpus=self.cpus, num_gpus=self.gpus, resources=self.resources, max_restarts=-1, max_task_retries=0
        ).remote(spec)
        # the workers start (imports, evaluator, tasks) while the store reads the models; they ask it
        # for the refs once they need them, which it answers once its publish has ended
        self.slots = [_Slot(i, self._make()) for i in range(self.n)]
        if meanwhile is not None:
            meanwhile()
        if publishing is not None:
            try:
                ray.get(publishing)
                self.stages["shared"] = time.time()
            except BaseException as e:
                self.shutdown()
                if isinstance(e, Exception):
                    raise PoolError(f"cannot share the models: {_cause(e)}") from None
                raise
        refs = {s.actor.ready.remote(): s for s in self.slots}
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while refs:
                if self._node_lost():
                    raise PoolError(self.lost)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolError(
                        f"workers did not start within {self.start_timeout_s:.0f} s "
                        "(not enough CPUs/GPUs in the cluster for the requested resources?)"
                    )
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
        self.stages["workers"] = time.time()
        self._placement()
        return [s.info for s in self.slots]

    def kinship(self) -> dict | None:
        """The experts' kinship table, computed by an idle worker from its resident task vectors
        (no disk read); call before submitting candidates. Waits for it (Ctrl-C stops the wait like
        any other), so the worker is idle again when candidates come."""
        import ray

        slot = next((s for s in self.slots if s.state == "idle"), None)
        if slot is None:
            return None
        return ray.get(slot.actor.kinship.remote())

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

    def _private_temp_dir(self) -> str:
        """Ray's temp dir: inside the campaign directory when its path is short enough for Ray's unix
        sockets, else a short directory in the system temp dir linked from the campaign directory."""
        if self.temp_dir is None:
            self._ray_dir = Path(tempfile.mkdtemp(prefix="evomerge-ray-"))
            return str(self._ray_dir)
        self.temp_dir.parent.mkdir(parents=True, exist_ok=True)
        if len(str(self.temp_dir.resolve())) <= MAX_TEMP_DIR:
            self.temp_dir.mkdir(exist_ok=True)
            return str(self.temp_dir.resolve())
        short = Path(tempfile.mkdtemp(prefix="emray-"))
        if self.temp_dir.is_symlink():  # an earlier run's link
            self.temp_dir.unlink()
        if not self.temp_dir.exists():
            self.temp_dir.symlink_to(short, target_is_directory=True)
        self._ray_dir = short
        return str(short)

    def shutdown(self) -> None:
        """Stop the workers and, if this pool started Ray, that Ray (and only it); a joined cluster
        is left running, this process disconnected from it."""
        import ray

        from evomerge.cluster.reaper import reap

        if ray.is_initialized():
            for slot in self.slots if not self.lost else ():  # ray.kill blocks while the GCS is gone
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:
                    pass
            if self._store is not None and not self.lost:
                try:
                    ray.kill(self._store)
                except Exception:
                    pass
            self._store = None
            if self.started_ray:
                _stop_monitor()
            ray.shutdown()
        self.slots = []
        if self._reaper is not None:  # Ray is down: the watchdog has nothing left to guard
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None
        if self.started_ray and self.lost:  # a dead node's orphans (agents, workers) outlive ray.shutdown
            reap(os.path.realpath(self._ray_temp))
        self.started_ray = False

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

    def submit(self, key: Any, recipe: dict, log_samples: bool = False, documents: int | None = None) -> None:
        """Queue a candidate (a recipe as a plain dict), scored on ``documents`` per task (default: the
        evaluator's limit); it starts on the first free worker."""
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
            if self._node_lost():
                if out:  # hand over what finished; the next call raises
                    return out
                raise PoolError(self.lost)
            self._probe_restarting()
            self._kill_overdue()
            self._dispatch()
            refs = {s.ref: s for s in self.slots if s.ref is not None}
            if not refs and not self.queue:
                return out
            now = time.monotonic()
            wait = 0.0 if out else (PROBE_EVERY if deadline is None else max(0.0, min(PROBE_EVERY, deadline - now)))
            if self.timeout_s is not None:  # wake up when the first busy worker becomes overdue
                due = [s.since + self.timeout_s - now for s in self.slots if s.state == "busy" and not s.kill_reason]
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
        score = Score(
            result["status"],
            values=result["values"],
            reason=result["reason"],
            timings=result["timings"],
            samples=result.get("samples"),
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

        if self.timeout_s is None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "busy" and now - slot.since > self.timeout_s and not slot.kill_reason:
                slot.kill_reason = f"evaluation exceeded timeout_s={self.timeout_s:g}"
                ray.kill(slot.actor, no_restart=False)

    def worker_pids(self) -> list[int | None]:
        return [s.info.get("pid") for s in self.slots]

    def _node_lost(self) -> str | None:
        """Why the Ray node is gone (sticky once set), or None while it is there."""
        import ray

        if self.lost:
            return self.lost
        if self.started_ray:  # our own Ray: its core processes are this process's children
            for kind in ("raylet", "gcs_server"):
                for info in ray._private.worker._global_node.all_processes.get(kind, []):
                    if (code := info.process.poll()) is not None:
                        self.lost = f"the Ray node died: its {kind} exited ({_exit_status(code)})"
                        return self.lost
        now = time.monotonic()
        if now < self._next_node_check:
            return None
        self._next_node_check = now + NODE_CHECK_EVERY
        try:
            (alive,) = ray._private.worker.global_worker.gcs_client.check_alive([self._node_id], timeout=GCS_TIMEOUT)
        except Exception as e:
            self.lost = f"lost the connection to the Ray cluster: {first_line(e, with_type=True)}"
            return self.lost
        if not alive:
            self.lost = f"the Ray node died: the cluster marked this driver's node {self._node_id.hex()[:8]} dead"
        return self.lost


def _stop_monitor() -> None:
    """End a private Ray's autoscaler monitor at once: it outlasts the second ``ray.shutdown`` gives
    it after SIGTERM, so the shutdown would wait that second for nothing (a single node scales no
    further, and nothing talks to the monitor at the end)."""
    import ray

    try:  # Ray's internals: should they change, ray.shutdown ends the monitor as before
        node = ray._private.worker._global_node
        for info in node.all_processes.get("monitor", []) if node is not None else []:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:
        pass


@contextmanager
def _models_error():
    """Errors reading the models, as the PoolError a campaign reports in one line."""
    try:
        yield
    except Exception as e:
        reason = str(e) if isinstance(e, MergeError) else first_line(e, with_type=True)
        raise PoolError(f"cannot read the models: {reason}") from None


class Background:
    """``fn()`` on a thread of its own from ``start()``; ``result()`` (starting it if need be) waits for
    it and returns its value or raises what it raised; ``wait()`` only waits for a started one (for a
    clean-up that must not race it)."""

    def __init__(self, fn, name: str):
        self._box: dict = {}

        def target():
            try:
                self._box["value"] = fn()
            except BaseException as e:  # handed to whoever asks for the result
                self._box["error"] = e

        self._thread = threading.Thread(target=target, name=name, daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def wait(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    def result(self):
        self.start()
        self.wait()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def _exit_status(code: int) -> str:
    """A Popen return code in words: ``killed by SIGKILL``, ``exit code 1``."""
    if code >= 0:
        return f"exit code {code}"
    return "killed by " + next((s.name for s in signal.Signals if s == -code), f"signal {-code}")


def _cause(e: BaseException) -> str:
    """The root cause of a Ray error in one line (Ray wraps the worker's exception and traceback)."""
    cause = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    if isinstance(cause, BaseException) and cause is not e:
        return _cause(cause)
    text = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    # Ray's messages put the original exception's "Type: message" on the last line
    last = text[-1].strip() if text else type(e).__name__
    return last if len(last) < 300 else last[:300] + "..."
