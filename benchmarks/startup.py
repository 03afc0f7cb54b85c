"""What a user waits for in `evomerge run`, stage by stage: a 48-candidate two-worker campaign on the zoo.

    .venv/bin/python benchmarks/startup.py [--runs 3] [--zoo .cache/zoo] [--candidates 48] [--workers 2]

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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def one_run(zoo: Path, candidates: int, workers: int) -> dict:
    evomerge = Path(sys.executable).with_name("evomerge")
    with tempfile.TemporaryDirectory(prefix="evomerge-startup-") as tmp:
        tmp = Path(tmp)
        path = experiment(tmp, zoo, candidates, workers)
        started = time.perf_counter()
        result = subprocess.run([str(evomerge), "--offline", "run", str(path)], cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"evomerge run failed ({result.returncode}):\n{result.stderr[-3000:]}")
        state = json.loads((tmp / "campaign" / "campaign.json").read_text())
        stages = state["sessions"][-1]["stages"]
        return {"wall": wall, **stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not (args.zoo / "base").is_dir():
        raise SystemExit(f"no zoo at {args.zoo}: build it with `evomerge zoo build --out {args.zoo}`")

    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"{args.candidates} candidates, {args.workers} workers, {args.runs} runs"
    )
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
