"""The Ray worker pool, for real: a private local Ray, two workers, a worker SIGKILLed mid-evaluation."""

import os
import signal
import time

import psutil
import pytest

from evomerge.cluster.pool import PoolError, WorkerPool
from evomerge.cluster.worker import WorkerSpec
from evomerge.evaluate.candidate import CandidateScorer
from evomerge.evaluate.config import parse_evaluator

from conftest import REPO

# 200 documents per task in batches of 8: an evaluation takes a few seconds, long enough to be killed in
EVALUATOR = {"limit": None, "seed": 1, "batch_size": 8, "objectives": [
    {"name": "add", "task": "zoo/zoo_add_{split}.yaml"}, {"name": "sort", "task": "zoo/zoo_sort_{split}.yaml"}]}
SOURCE = str(REPO / "evaluators" / "inline.yaml")


def spec(zoo, **kw):
    models = {n: str(zoo / n) for n in ("base", "expert-add", "expert-sort")}
    return WorkerSpec(models=models, base="base", evaluator=EVALUATOR, evaluator_source=SOURCE, **kw)


def recipe(w_add, w_sort):
    return {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "expert-add", "parameters": {"weight": w_add}},
        {"model": "expert-sort", "parameters": {"weight": w_sort}}]}


def ray_processes():
    """This test process's descendants: the Ray it started and its workers."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def drain(pool):
    out = []
    while pool.in_flight:
        out += pool.poll(timeout=60)
    return out


def test_pool_scores_candidates_and_survives_a_killed_worker(zoo, tmp_path):
    from evomerge.recipe import parse_recipe

    recipes = {k: recipe(*w) for k, w in enumerate([(1.0, 0.0), (0.0, 1.0), (0.7, 0.9), (1.0, 1.0), (0.3, 0.3)])}
    pool = WorkerPool(spec(zoo, threads=1), workers=2, temp_dir=tmp_path / "campaign" / "ray", max_retries=1)
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
        time.sleep(0.8)  # both workers are inside an evaluation (each takes seconds)
        outcomes = pool.poll(timeout=0)
        busy = next(s for s in pool.slots if s.job is not None)
        victim, victim_key = busy.info["pid"], busy.job.key
        os.kill(victim, signal.SIGKILL)
        outcomes += drain(pool)
        assert sorted(o.key for o in outcomes) == list(recipes)  # every candidate once, nothing lost
        assert all(o.score.status == "done" for o in outcomes), [o.score.reason for o in outcomes]
        retried = [o for o in outcomes if o.attempts == 2]
        assert [o.key for o in retried] == [victim_key] and "worker died" in retried[0].score.timings["retried_after"]
        assert victim not in {o.pid for o in outcomes}
        assert pool.restarts == 1

        # the values are exactly what the in-process scorer gives for the same recipes
        scorer = CandidateScorer(spec(zoo).models, "base", parse_evaluator(EVALUATOR, SOURCE))
        for o in outcomes:
            assert o.score.values == scorer.score(parse_recipe(recipes[o.key])).values
            assert {"materialize", "evaluate", "total", "worker"} <= set(o.score.timings)

        # 2. out of retries: the candidate fails with the reason, the pool goes on
        pool.max_retries = 0
        while pool.free < 2:  # the restarted worker is back
            pool.poll(timeout=1)
        pool.submit("doomed", recipes[3])
        time.sleep(0.8)
        os.kill(next(s.info["pid"] for s in pool.slots if s.job is not None), signal.SIGKILL)
        (doomed,) = drain(pool)
        assert doomed.score.status == "failed" and doomed.attempts == 1
        assert doomed.score.reason.startswith("worker died during evaluation") and "gave up after 1 attempts" in doomed.score.reason

        # 3. a candidate over the time limit: its worker is killed and restarted, the candidate failed
        pool.timeout_s = 0.3
        while pool.free < 2:
            pool.poll(timeout=1)
        pool.submit("slow", recipes[2])
        (slow,) = drain(pool)
        assert slow.score.status == "failed" and slow.score.reason.startswith("evaluation exceeded timeout_s=0.3")
        pool.timeout_s = None
        pool.submit("after", recipes[2])
        (after,) = drain(pool)
        assert after.score.status == "done"
        children = ray_processes()
    finally:
        pool.shutdown()
    deadline = time.time() + 20
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                         for p in children):
        time.sleep(0.2)
    alive = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, f"processes left behind after shutdown: {alive}"


def test_a_worker_that_cannot_load_fails_the_start_with_the_reason(zoo, tmp_path):
    bad = spec(zoo)
    bad.models["expert-sort"] = str(tmp_path / "missing")
    pool = WorkerPool(bad, workers=1, temp_dir=tmp_path / "ray", start_timeout_s=120)
    with pytest.raises(PoolError, match=r"worker 0 failed to start: .*model directory not found: .*missing"):
        pool.start()
    import ray

    assert not ray.is_initialized()

