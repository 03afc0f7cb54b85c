"""Zoo benchmark: fresh build time of a preset, then every model and pairwise merge on both splits.

    .venv/bin/python benchmarks/zoo.py [--preset default|micro]

Prints the build time (target: under 5 minutes on 2 CPU cores), the evaluation time per model, and
the score tables with the zoo's quality verdict.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure(offline=True)

import torch  # noqa: E402

from evomerge.zoo.build import build_zoo  # noqa: E402
from evomerge.zoo.quality import evaluate_zoo  # noqa: E402
from evomerge.zoo.spec import PRESETS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        manifest = build_zoo(Path(tmp) / "zoo", PRESETS[args.preset])
        build_s = time.perf_counter() - started
        print(
            f"preset {args.preset}: {manifest['models'][0]['parameters']:,} parameters per model, "
            f"{len(manifest['models'])} models, fresh build {build_s:.1f} s (target < 300 s)"
        )
        for split in ("search", "report"):
            started = time.perf_counter()
            report = evaluate_zoo(Path(tmp) / "zoo", REPO / "evaluators" / "zoo", split=split)
            elapsed = time.perf_counter() - started
            print(
                f"\n{split} split: {len(report.scores)} models x {len(report.skills)} tasks x 200 docs "
                f"in {elapsed:.1f} s"
            )
            print(report.table())
            pairs = ", ".join(f"{a}+{b}" for a, b in report.winning_pairs) or "none"
            print(f"merges beating both experts on their two-skill mean: {pairs}")
            print("quality:", "OK" if report.ok else "; ".join(report.failures))


if __name__ == "__main__":
    main()
