"""Search quality on cheap synthetic objectives with known optima, every optimizer vs random search.

    .venv/bin/python benchmarks/search.py [--seeds 3] [--with-gp]

1. Per-layer quadratic bowl (single objective): the genome of
   search_spaces/three_experts_ties_dare.yaml without its method gene (56 genes) on a 4-layer
   model; fitness exp(-5 e) in (0, 1], e the mean squared distance to a random optimum x* in units of
   the gene ranges (0.95 means within about 10% of the range per gene; a random point has e ~ 0.17).
   Reported: evaluations until the best fitness reaches 0.95 (median over seeds; ">B" if never
   within the budget B).
2. Two-objective trade-off (the demo's 4-gene genome): maximize f1 = -|x - a|^2 and f2 = -|x - b|^2;
   the Pareto set is the segment [a, b]. Reported: hypervolume after the budget against reference
   (-4, -4), as a fraction of the true front's hypervolume.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from evomerge.search.journal import Search  # noqa: E402
from evomerge.search.optimizers import Objective  # noqa: E402
from evomerge.search.pareto import hypervolume  # noqa: E402
from evomerge.search.space import Genome, SearchSpace, load_space  # noqa: E402

BOWL_BUDGET = 800
FRONT_BUDGET = 150
REFERENCE = [-2.6, -2.6]  # just beyond the front's worst values (-2.56)


def bowl_genome() -> Genome:
    data = load_space(REPO / "search_spaces" / "three_experts_ties_dare.yaml").model_dump()
    data["method"] = "ties"
    return Genome(SearchSpace.model_validate(data), num_layers=4)


def run_bowl(name: str, seed: int, budget: int) -> int | None:
    genome = bowl_genome()
    lo, hi = map(np.array, genome.bounds)
    target = lo + np.random.default_rng(100 + seed).random(genome.dimension) * (hi - lo)
    scale = ((hi - lo) ** 2).sum() / genome.dimension
    with tempfile.TemporaryDirectory() as tmp:
        s = Search(genome, name, [Objective(name="fit")], seed, tmp)
        for n in range(1, budget + 1):
            t = s.ask()
            fit = math.exp(-float(((np.array(t.genome) - target) ** 2).sum()) / (genome.dimension * scale) * 5)
            s.tell(t.id, [fit])
            if fit >= 0.95:
                return n
    return None


def run_front(name: str, seed: int, budget: int) -> float:
    genome = Genome(load_space(REPO / "search_spaces" / "two_experts_layer_groups.yaml"), num_layers=4)
    a, b = np.full(4, 0.3), np.full(4, 1.1)
    objectives = [Objective(name="f1"), Objective(name="f2")]
    with tempfile.TemporaryDirectory() as tmp:
        s = Search(genome, name, objectives, seed, tmp)
        for _ in range(budget):
            t = s.ask()
            x = np.array(t.genome)
            s.tell(t.id, [-float(((x - a) ** 2).sum()), -float(((x - b) ** 2).sum())])
        return s.hypervolume(REFERENCE)


def true_front_hv() -> float:
    a, b = np.full(4, 0.3), np.full(4, 1.1)
    pts = [a + u * (b - a) for u in np.linspace(0, 1, 4001)]
    return hypervolume([[-float(((p - a) ** 2).sum()), -float(((p - b) ** 2).sum())] for p in pts],
                       ["maximize", "maximize"], REFERENCE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--with-gp", action="store_true",
                    help="include Optuna's GP sampler in part 2 (over 5 minutes for 3 x 150 trials on 2 cores)")
    args = ap.parse_args()
    seeds = range(args.seeds)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {args.seeds} seeds")
    print(f"\n1. per-layer quadratic bowl, {bowl_genome().dimension} genes: evaluations to fitness 0.95 (budget {BOWL_BUDGET})")
    for name in ("random", "cma", "cmaes", "tpe"):
        started = time.perf_counter()
        hits = [run_bowl(name, s, BOWL_BUDGET) for s in seeds]
        shown = [str(h) if h else f">{BOWL_BUDGET}" for h in hits]
        med = statistics.median(h or BOWL_BUDGET + 1 for h in hits)
        print(f"  {name:<14} median {med if med <= BOWL_BUDGET else '>' + str(BOWL_BUDGET):>6}   runs {', '.join(shown)}"
              f"   ({time.perf_counter() - started:.0f} s)")
    ideal = true_front_hv()
    print(f"\n2. two-objective trade-off, 4 genes: hypervolume after {FRONT_BUDGET} evaluations, "
          f"fraction of the true front's ({ideal:.3f})")
    for name in ("random", "nsga2", "nsga3", "tpe", *(["gp"] if args.with_gp else [])):
        started = time.perf_counter()
        hv = [run_front(name, s, FRONT_BUDGET) / ideal for s in seeds]
        print(f"  {name:<14} median {statistics.median(hv):.3f}   runs {', '.join(f'{h:.3f}' for h in hv)}"
              f"   ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
