"""Hypervolume: time per call against the number of front points and objectives.

    .venv/bin/python benchmarks/pareto.py

The campaign computes the hypervolume of its front at every tracking refresh, on the progress line
and in ``status``; ``benchmarks/quality.py`` after every result. Points: n on the front (the positive
orthant of a sphere, every point non-dominated: the worst case for the front's size) plus n behind
it, maximized against the origin. Side by side in one run: evomerge's exact hypervolume (a sweep for
three objectives, WFG for more), the recursive slicing it replaced (O(n^(d-1)); run only where it
ends within a minute or so), and Optuna's own (a private module of the pinned Optuna, for reference only).
All three agree to 1e-12 relative where they all run.
"""

from __future__ import annotations

import math
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from evomerge.search.pareto import hypervolume  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from test_pareto import slicing  # noqa: E402  (the earlier algorithm, the tests' reference)


def points(d: int, n: int, rng: random.Random) -> list[list[float]]:
    out = []
    for _ in range(n):
        v = [abs(rng.gauss(0, 1)) for _ in range(d)]
        norm = math.sqrt(sum(x * x for x in v))
        out.append([x / norm for x in v])
        out.append([max(0.001, x / norm - rng.uniform(0, 0.2)) for x in v])
    return out


def timed(fn, *args) -> tuple[float, float]:
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def main() -> None:
    from optuna import __version__ as optuna_version
    from optuna._hypervolume import compute_hypervolume

    print(f"machine: {platform.machine()}, {platform.python_version()}, optuna {optuna_version}")
    print("| objectives | front points | evomerge (s) | slicing, before (s) | optuna (s) |\n|---|---|---|---|---|")
    # slicing takes minutes or more there (4 objectives, 200 points: 545 s on the RESULTS.md machine)
    slow = {(3, 400), (4, 200), (4, 400), (5, 100), (5, 200), (5, 400)}
    for d in (3, 4, 5):
        for n in (100, 200, 400):
            pts = points(d, n, random.Random(n * d))
            ours, t_ours = timed(hypervolume, pts, ["maximize"] * d, [0.0] * d)
            ref, t_ref = timed(compute_hypervolume, -np.asarray(pts), np.zeros(d))
            assert abs(ours - ref) <= 1e-12 * ref, (ours, ref)
            if (d, n) in slow:
                before = "-"
            else:
                old, t_old = timed(slicing, [[-x for x in p] for p in pts], [0.0] * d)
                assert abs(ours - old) <= 1e-12 * ours, (ours, old)
                before = f"{t_old:.3f}"
            print(f"| {d} | {n} | {t_ours:.3f} | {before} | {t_ref:.3f} |", flush=True)


if __name__ == "__main__":
    main()
