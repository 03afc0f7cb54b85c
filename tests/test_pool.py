"""The Ray worker pool, for real: a private local Ray, two workers, a worker SIGKILLed mid-evaluation,
a Ray node killed under the pool, signal handlers, loopback-only sockets."""

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from conftest import REPO

from evomerge.cluster.pool import PoolError, WorkerPool
from evomerge.cluster.runtime import GCS_TIMEOUT, NODE_CHECK_EVERY
from evomerge.cluster.worker import WorkerSpec
from evomerge.evaluate.candidate import CandidateScorer
from evomerge.evaluate.config import parse_evaluator

# 200 documents per task in batches of 8: an evaluation takes 0.3 s or more (0.34 s on a 2-core EPYC)
EVALUATOR = {
    "limit": 200,
    "seed": 1,
    "batch_size": 8,
    "objectives": [
        {"name": "add", "task": "zoo/zoo_add_{split}.yaml"},
        {"name": "sort", "task": "zoo/zoo_sort_{split}.yaml"},
    ],
}
SOURCE = str(REPO / "evaluators" / "inline.yaml")


def spec(zoo, **kw):
    models = {n: str(zoo / n) for n in ("base", "expert-add", "expert-sort")}
    return WorkerSpec(models=models, base="base", evaluator=EVALUATOR, evaluator_source=SOURCE, **kw)


def recipe(w_add, w_sort):
    return {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "expert-add", "parameters": {"weight": w_add}},
            {"model": "expert-sort", "parameters": {"weight": w_sort}},
        ],
    }


def ray_processes():
    """This test process's descendants: the Ray it started and its workers."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def drain(pool):
    out = []
    while pool.in_flight:
        out += pool.poll(timeout=60)
    return out


def started_worker(markers, timeout=60):
    """The pid of a worker once it has started evaluating a candidate (it touches markers/<pid>)."""
    deadline = time.monotonic() + timeout
    while not (found := list(markers.iterdir())):
        assert time.monotonic() < deadline, "no worker started a candidate"
        time.sleep(0.02)
    return int(found[0].name)


def leftovers(pids, timeout=20):
    """Those of ``pids`` still running (zombies count as gone) once ``timeout`` s have passed or none are."""

    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def test_pool_scores_candidates_and_survives_a_killed_worker(zoo, tmp_path):
    from evomerge.recipe import parse_recipe

    recipes = {k: recipe(*w) for k, w in enumerate([(1.0, 0.0), (0.0, 1.0), (0.7, 0.9), (1.0, 1.0), (0.3, 0.3)])}
    markers = tmp_path / "started"
    markers.mkdir()
    pool = WorkerPool(
        spec(zoo, threads=1, started_dir=str(markers)), workers=2, temp_dir=tmp_path / "campaign" / "ray", max_retries=1
    )
    infos = pool.start()
    try:
        assert len(infos) == 2 and all(i["device"] == "cpu" for i in infos)
        assert (tmp_path / "campaign" / "ray").is_dir()  # Ray's files are reachable from the campaign
        assert any(p.name.startswith("session_") for p in (tmp_path / "campaign" / "ray").iterdir())
        started = ray_processes()
        assert set(pool.worker_pids()) <= started

        # 1. dispatch as workers free up; kill a worker while it evaluates: its candidate is retried
        for key, r in recipes.items():
            pool.submit(key, r)
        assert pool.free == 0 and pool.in_flight == 5
        victim = started_worker(markers)  # inside its first evaluation, which takes seconds
        victim_key = next(s.job.key for s in pool.slots if s.info["pid"] == victim)
        os.kill(victim, signal.SIGKILL)
        outcomes = drain(pool)
        assert sorted(o.key for o in outcomes) == list(recipes)  # every candidate once, nothing lost
        assert all(o.score.status == "done" for o in outcomes), [o.score.reason for o in outcomes]
        retried = [o for o in outcomes if o.attempts == 2]
        assert [o.key for o in retried] == [victim_key] and "worker died" in retried[0].score.timings["retried_after"]
        assert victim not in {o.pid for o in outcomes}
        assert pool.restarts == 1

        # the values are exactly what the in-process scorer gives for the same recipes
        scorer = CandidateScorer(spec(zoo).models, "base", parse_evaluator(EVALUATOR, SOURCE))
        # both workers mapped the store's one copy of the base and task vectors for every tensor
        assert [i["shared_tensors"] for i in infos] == [len(scorer.resident.params)] * 2
        for o in outcomes:
            assert o.score.values == scorer.score(parse_recipe(recipes[o.key])).values
            assert {"materialize", "evaluate", "total", "worker"} <= set(o.score.timings)

        # 2. out of retries: the candidate fails with the reason, the pool goes on
        pool.max_retries = 0
        while pool.free < 2:  # the restarted worker is back
            pool.poll(timeout=1)
        for marker in markers.iterdir():  # nothing in flight: no worker writes one now
            marker.unlink()
        pool.submit("doomed", recipes[3])
        os.kill(started_worker(markers), signal.SIGKILL)
        (doomed,) = drain(pool)
        assert doomed.score.status == "failed" and doomed.attempts == 1
        assert doomed.score.reason.startswith("worker died during evaluation")
        assert "gave up after 1 attempts" in doomed.score.reason

        # 3. a candidate over the time limit: its worker is killed and restarted, the candidate failed
        pool.timeout_s = 0.05  # an evaluation here takes 0.3 s or more
        while pool.free < 2:
            pool.poll(timeout=1)
        pool.submit("slow", recipes[2])
        (slow,) = drain(pool)
        assert slow.score.status == "failed" and slow.score.reason.startswith("evaluation exceeded timeout_s=0.05")
        pool.timeout_s = None
        pool.submit("after", recipes[2])
        (after,) = drain(pool)
        assert after.score.status == "done"

        # 4. no timeout_s: the automatic limit, a factor of the slowest evaluation so far (at least a
        # floor); a worker that stops answering (SIGSTOP) is killed past it, its candidate failed
        assert pool.slowest > 0 and pool.limit_s() == max(600.0, 10 * pool.slowest)
        pool.auto_floor_s, pool.auto_factor = 0.01, 0.5  # half the slowest: the stopped worker never ends
        while pool.free < 2:
            pool.poll(timeout=1)
        for marker in markers.iterdir():
            marker.unlink()
        pool.submit("stuck", recipes[2])
        os.kill(started_worker(markers), signal.SIGSTOP)
        (stuck,) = drain(pool)
        assert stuck.score.status == "failed"
        assert stuck.score.reason.startswith("evaluation exceeded the automatic limit of"), stuck.score.reason
        children = ray_processes()
    finally:
        pool.shutdown()
    assert not leftovers(children), "processes left behind after shutdown"


@pytest.mark.parametrize(
    "share, damage, reason",
    [
        (True, "missing", r"cannot read the models: model directory not found: .*missing"),  # before Ray starts
        (False, "missing", r"worker 0 failed to start: .*model directory not found: .*missing"),
        # the header reads, the weights do not: the store fails while the worker starts beside it
        (True, "truncated", r"^cannot share the models: "),
    ],
)
def test_models_that_cannot_load_fail_the_start_with_the_reason(zoo, tmp_path, share, damage, reason):
    bad = spec(zoo, memory={"share": share})
    bad.models["expert-sort"] = str(tmp_path / damage)
    if damage == "truncated":
        shutil.copytree(zoo / "expert-sort", tmp_path / damage)
        weights = tmp_path / damage / "model.safetensors"
        header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
        with weights.open("r+b") as f:
            f.truncate(header + 1000)
    pool = WorkerPool(bad, workers=1, temp_dir=tmp_path / "ray", start_timeout_s=120)
    with pytest.raises(PoolError, match=reason):
        pool.start()
    import ray

    assert not ray.is_initialized()


# the raylet itself; a killed DashboardAgent (which takes the raylet down) is tested at the campaign
# level, tests/test_campaign.py::test_a_lost_ray_node_halts_the_campaign_resumably
@pytest.mark.parametrize("victim", ["raylet"])
def test_a_dead_ray_node_raises_pool_error_and_shutdown_cleans_up(zoo, tmp_path, victim):
    markers = tmp_path / "started"
    markers.mkdir()
    pool = WorkerPool(
        spec(zoo, threads=1, started_dir=str(markers)), workers=1, temp_dir=tmp_path / "ray", max_retries=0
    )  # a worker death would fail the candidate: the node's must not
    pool.start()
    try:
        pool.submit("doomed", recipe(1.0, 0.0))
        started_worker(markers)
        children = ray_processes()  # before the kill: the raylet's children are orphaned by it
        next(p for p in psutil.Process().children(recursive=True) if p.name() == victim).kill()
        killed, returned = time.monotonic(), []
        with pytest.raises(PoolError, match=r"^the Ray node died: "):
            while time.monotonic() - killed < 30:
                returned += pool.poll(timeout=1)
        assert time.monotonic() - killed < 10
        # never reported failed: finished before the death was noticed (a real result, evaluations
        # here are short), or still in flight, which a resumed campaign redoes
        assert all(o.score.status == "done" for o in returned) and pool.in_flight == 1 - len(returned)
    finally:
        began = time.monotonic()
        pool.shutdown()
    assert time.monotonic() - began < 15
    assert not leftovers(children, timeout=5), "processes left behind after shutdown"


HEAD_SCRIPT = """
import sys
from evomerge import environment
environment.configure()
import ray
ray.init(address="local", num_cpus=1, _node_ip_address="127.0.0.1", _temp_dir=sys.argv[1], include_dashboard=False,
         log_to_driver=False, logging_level="ERROR")
node = ray._private.worker._global_node
print(node.gcs_address, node.all_processes["gcs_server"][0].process.pid, flush=True)
sys.stdin.read()  # until the test lets go
"""


def test_a_lost_connection_to_a_joined_cluster_raises_pool_error(zoo, tmp_path, monkeypatch):
    from evomerge.cluster.reaper import reap

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # Ray 2.60 clusters want the token it keeps in ~/.ray
    head_dir = tempfile.mkdtemp(prefix="emhead-")  # short: Ray's unix socket paths
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD_SCRIPT, head_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    markers = tmp_path / "started"
    markers.mkdir()
    pool = worker = None
    try:
        address, gcs = head.stdout.readline().split()
        pool = WorkerPool(spec(zoo, threads=1, started_dir=str(markers)), workers=1, address=address, max_retries=0)
        pool.start()
        pool.submit("doomed", recipe(1.0, 0.0))
        # frozen mid-candidate: on a loaded machine its result could otherwise reach the driver before
        # the lost connection is noticed
        worker = psutil.Process(started_worker(markers))
        worker.suspend()
        os.kill(int(gcs), signal.SIGKILL)
        killed, returned = time.monotonic(), []
        with pytest.raises(PoolError, match=r"^lost the connection to the Ray cluster: "):
            while time.monotonic() - killed < 30:
                returned += pool.poll(timeout=1)
        assert time.monotonic() - killed < NODE_CHECK_EVERY + GCS_TIMEOUT + 3
        assert not returned and pool.in_flight == 1
    finally:
        began = time.monotonic()
        if worker is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        if pool is not None:
            pool.shutdown()
        head.kill()
        head.wait()
        reap(os.path.realpath(head_dir))
        shutil.rmtree(head_dir, ignore_errors=True)
    assert time.monotonic() - began < 20  # ray.shutdown without a GCS takes ~5 s


SIGTERM_SCRIPT = """
import json, signal, sys, time
from evomerge.cluster.pool import WorkerPool
from evomerge.cluster.worker import WorkerSpec

got = []
signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
sigint = signal.getsignal(signal.SIGINT)
pool = WorkerPool(WorkerSpec(**json.loads(sys.argv[1])), workers=1, temp_dir=sys.argv[2])
pool.start()
print("started", signal.getsignal(signal.SIGINT) is sigint, flush=True)
while not got:
    time.sleep(0.05)
pool.shutdown()
print("handled", got, flush=True)
"""


def test_starting_a_pool_keeps_the_callers_signal_handlers(zoo, tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, json.dumps(spec(zoo, threads=1).to_dict()), str(tmp_path / "ray")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "started True\n"  # SIGINT's handler is still the caller's
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert (child.returncode, out) == (0, "handled [15]\n"), err  # ours ran, not Ray's (exit 134)
    assert "SIGTERM received" not in err


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_a_private_ray_listens_on_loopback_only(zoo, tmp_path):
    pool = WorkerPool(spec(zoo, threads=1), workers=1, temp_dir=tmp_path / "ray")
    pool.start()
    try:
        listening = []
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                listening += [
                    (proc.name(), c.laddr) for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                ]
            except psutil.NoSuchProcess:  # an idle Ray worker may come and go
                pass
    finally:
        pool.shutdown()
    assert {"gcs_server", "raylet", "ray::ScoringWorker"} <= {name for name, _ in listening}
    assert all(_loopback(addr.ip) for _, addr in listening), [x for x in listening if not _loopback(x[1].ip)]


def test_a_users_environment_cannot_move_a_private_ray_off_loopback(monkeypatch):
    """Ray binds the external interface when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 1: configure() forces 0."""
    from evomerge import environment

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # an ordinary default: the user's value wins
    environment.configure()
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
