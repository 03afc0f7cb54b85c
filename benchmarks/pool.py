"""Per-candidate time breakdown and throughput of the Ray worker pool on the zoo.

    .venv/bin/python benchmarks/pool.py [--candidates 40] [--zoo .cache/zoo]

Candidates: random points of the demo's genome (search_spaces/two_experts_layer_groups.yaml) scored
on the demo's evaluator (evaluators/zoo_add_sort.yaml: 2 tasks x 100 documents). Each configuration
keeps every worker busy (a steady campaign) and reports, averaged over the candidates after a warm-up
of one per worker:
- materialize: merging the recipe into the resident weights;
- forward: time inside the model's forward passes (lm-eval's generation and log-likelihood calls);
- lm-eval: the rest of lm-eval's evaluate (building requests, tokenizing, generation loop, metrics);
- other: everything else, i.e. workers x wall time minus the workers' materialize + evaluate: Ray
  dispatch and transfer, recipe parsing, the controller. Target: <= 10% of the wall time.
Throughput: candidates per second of wall time, 1 worker (1 and 2 torch threads) and 2 workers.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure(offline=True)

from evomerge.cluster.pool import WorkerPool  # noqa: E402
from evomerge.cluster.worker import WorkerSpec  # noqa: E402
from evomerge.evaluate.config import load_evaluator  # noqa: E402
from evomerge.search.space import Genome, load_space  # noqa: E402


def candidates(n: int, seed: int = 0) -> list[dict]:
    genome = Genome(load_space(REPO / "search_spaces" / "two_experts_layer_groups.yaml"), num_layers=4)
    lo, hi = genome.bounds
    rng = random.Random(seed)
    return [genome.decode([rng.uniform(a, b) for a, b in zip(lo, hi)]).model_dump(exclude_none=True) for _ in range(n)]


def run(zoo: Path, workers: int, threads: int, recipes: list[dict], temp: Path) -> dict:
    ev = load_evaluator(REPO / "evaluators" / "zoo_add_sort.yaml")
    models = {n: str(zoo / n) for n in ("base", "expert-add", "expert-sort")}
    spec = WorkerSpec(
        models=models, base="base", evaluator=ev.model_dump(), evaluator_source=str(ev.source), threads=threads
    )
    started = time.perf_counter()
    with WorkerPool(spec, workers=workers, cpus_per_worker=threads, temp_dir=temp) as pool:
        ready = time.perf_counter() - started
        for i, r in enumerate(recipes[:workers]):  # warm-up: first calls pay one-time costs
            pool.submit(("warm", i), r)
        while pool.in_flight:
            pool.poll()
        t0 = time.perf_counter()
        queue = list(enumerate(recipes))
        outcomes = []
        while queue or pool.in_flight:
            while queue and pool.free:
                key, r = queue.pop(0)
                pool.submit(key, r)
            outcomes += pool.poll()
        wall = time.perf_counter() - t0
    failed = [o for o in outcomes if o.score.status != "done"]
    if failed:
        raise SystemExit(f"{len(failed)} candidates failed: {failed[0].score.reason}")
    n = len(outcomes)
    mean = lambda key: sum(o.score.timings[key] for o in outcomes) / n
    busy = workers * wall
    return {
        "ready": ready,
        "wall": wall,
        "n": n,
        "materialize": mean("materialize"),
        "forward": mean("forward"),
        "evaluate": mean("evaluate"),
        "other_share": (busy - sum(o.score.timings["materialize"] + o.score.timings["evaluate"] for o in outcomes))
        / busy,
        "per_candidate": busy / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    args = ap.parse_args()
    if not (args.zoo / "manifest.json").exists():
        raise SystemExit(f"no zoo at {args.zoo}: run `make demo` or `evomerge zoo build --out {args.zoo}`")
    recipes = candidates(args.candidates)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {args.candidates} candidates per configuration")
    print(
        f"{'configuration':<24}{'start s':>9}{'cand/s':>8}{'worker-s/cand':>15}{'materialize':>13}"
        f"{'forward':>9}{'lm-eval':>9}{'other':>8}"
    )
    base = None
    import tempfile

    for workers, threads in ((1, 1), (1, 2), (2, 1)):
        with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
            r = run(args.zoo, workers, threads, recipes, Path(tmp) / "ray")
        rate = r["n"] / r["wall"]
        base = base or rate
        per = r["per_candidate"]
        print(
            f"{f'{workers} worker(s) x {threads} thread(s)':<24}{r['ready']:>9.1f}{rate:>8.2f}{per:>15.3f}"
            f"{r['materialize'] / per:>12.1%}{r['forward'] / per:>9.1%}{(r['evaluate'] - r['forward']) / per:>9.1%}"
            f"{r['other_share']:>8.1%}   ({rate / base:.2f}x the first)"
        )


if __name__ == "__main__":
    main()
