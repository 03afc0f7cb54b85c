"""What a user waits for in `evomerge run`, stage by stage: a 48-candidate two-worker campaign on the zoo.

    .venv/bin/python benchmarks/startup.py [--runs 3] [--zoo .cache/zoo] [--candidates 48] [--workers 2]
    .venv/bin/python benchmarks/startup.py --names-cache [--runs 3]

The experiment is the demo's earlier problem: `evaluators/zoo_add_sort.yaml` (add + sort, 100
documents each) over `search_spaces/two_experts_layer_groups.yaml`, NSGA-II, a local MLflow store.
Each run is a whole `evomerge --offline run` process in a fresh directory, timed from outside
(wall seconds from fork to exit); the stages come from the campaign's own record of its last
session (`campaign.json` -> `sessions[-1].stages`, seconds since the process was created):

- checked: imports and the experiment's checks (files, configs, tasks), before anything is written;
- ray: the private Ray is up; shared: the base and task vectors are in Ray's object store;
- workers: every worker has loaded its models and tasks; tracking: the MLflow run is open;
- kinship: the experts' kinship table is logged; first/last result: the search loop;
- shutdown: workers, Ray and the MLflow thread are done (the process exits right after).

Medians over the runs are printed, with the minimum and maximum of the whole run's wall time.

With `--names-cache`, runs go in pairs, in turn: one whose parameter-names cache is empty (the
controller imports transformers and builds the model on the meta device) and one whose cache holds
the base's names (filled by a warm-up run); both print wall seconds and the CPU seconds of the
controller and its waited-for children (Ray's daemons and workers are not among them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.campaign import STAGES  # noqa: E402


def experiment(tmp: Path, zoo: Path, candidates: int, workers: int) -> Path:
    import yaml

    data = {
        "name": "startup-benchmark",
        "seed": 0,
        "models": {m: str(zoo / m) for m in ("base", "expert-add", "expert-sort")},
        "search_space": str(REPO / "search_spaces" / "two_experts_layer_groups.yaml"),
        "evaluator": str(REPO / "evaluators" / "zoo_add_sort.yaml"),
        "optimizer": {"name": "nsga2"},
        "budget": {"max_evaluations": candidates},
        "workers": {"count": workers},
        "output_dir": str(tmp / "campaign"),
    }
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_run(zoo: Path, candidates: int, workers: int, names_cache: Path | None = None) -> dict:
    evomerge = Path(sys.executable).with_name("evomerge")
    env = {**os.environ, **({"EVOMERGE_CACHE": str(names_cache)} if names_cache else {})}
    with tempfile.TemporaryDirectory(prefix="evomerge-startup-") as tmp:
        tmp = Path(tmp)
        path = experiment(tmp, zoo, candidates, workers)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        cmd = [str(evomerge), "--offline", "run", str(path)]
        result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise SystemExit(f"evomerge run failed ({result.returncode}):\n{result.stderr[-3000:]}")
        state = json.loads((tmp / "campaign" / "campaign.json").read_text())
        stages = state["sessions"][-1]["stages"]
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        return {"wall": wall, "cpu": cpu, **stages}


def compare_names_cache(args) -> None:
    """Paired runs with an empty and with a filled parameter-names cache, in turn."""
    with tempfile.TemporaryDirectory(prefix="evomerge-names-") as caches:
        warm = Path(caches) / "warm"
        one_run(args.zoo, args.candidates, args.workers, warm)  # warm-up: fills the warm cache
        runs = {"empty cache": [], "names cached": []}
        for i in range(args.runs):
            cold = Path(caches) / f"cold-{i}"
            for kind, cache in (("empty cache", cold), ("names cached", warm)):
                r = one_run(args.zoo, args.candidates, args.workers, cache)
                runs[kind].append(r)
                print(f"pair {i + 1}, {kind}: {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU s", flush=True)
    print()
    print("| names | wall (s, median) | min-max | ray reached at (s) | CPU s, controller and waited-for children |")
    print("|---|---|---|---|---|")
    for kind, rs in runs.items():
        walls = [r["wall"] for r in rs]
        ray = statistics.median(r["ray"] for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs)
        spread = f"{min(walls):.1f}-{max(walls):.1f}"
        print(f"| {kind} | {statistics.median(walls):.1f} | {spread} | {ray:.2f} | {cpu:.1f} |")
    ratios = [w["wall"] / c["wall"] for c, w in zip(runs["empty cache"], runs["names cached"])]
    cpus = [w["cpu"] / c["cpu"] for c, w in zip(runs["empty cache"], runs["names cached"])]
    print(
        f"| cached/empty | {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} (pairwise) | | "
        f"{statistics.median(cpus):.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--names-cache", action="store_true", help="paired runs: names cache empty, then filled")
    args = ap.parse_args()
    if not (args.zoo / "base").is_dir():
        raise SystemExit(f"no zoo at {args.zoo}: build it with `evomerge zoo build --out {args.zoo}`")

    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"{args.candidates} candidates, {args.workers} workers, {args.runs} runs"
    )
    if args.names_cache:
        return compare_names_cache(args)
    runs = []
    for i in range(args.runs):
        r = one_run(args.zoo, args.candidates, args.workers)
        runs.append(r)
        print(f"run {i + 1}: {r['wall']:.1f} s wall", flush=True)
    print()
    print("| stage | reached at (s, median) | stage took (s, median) |")
    print("|---|---|---|")
    previous = [0.0] * len(runs)
    for stage in STAGES:
        at = [r.get(stage) for r in runs]
        if any(a is None for a in at):
            continue
        took = [a - p for a, p in zip(at, previous)]
        print(f"| {stage} | {statistics.median(at):.2f} | {statistics.median(took):.2f} |")
        previous = at
    walls = [r["wall"] for r in runs]
    loop = [r["last_result"] - r["first_result"] for r in runs]
    print(f"| exit (whole process, from outside) | {statistics.median(walls):.2f} | |")
    print()
    wall, in_loop = statistics.median(walls), statistics.median(loop)
    print(
        f"wall: median {wall:.1f} s (min {min(walls):.1f}, max {max(walls):.1f}); "
        f"search loop {in_loop:.1f} s; everything else {wall - in_loop:.1f} s"
    )


if __name__ == "__main__":
    main()
