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
3. Noisy bowl (16 genes in [0, 1], mean squared distance to a random optimum, minimized) under three
   noise models: additive gaussian (sd 0.01), multiplicative (1 + 0.5 N), additive Cauchy (0.01).
   CMA-ES with and without noise handling, ours (asynchronous ask/tell) beside pycma's own
   synchronous loop (``ask_and_eval`` + ``NoiseHandler``) as the reference. Reported: the noise-free
   error of the final distribution mean after NOISE_BUDGET evaluations (median over seeds; a random
   point scores ~0.17).
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

from evomerge.objectives import Objective  # noqa: E402
from evomerge.search.pareto import hypervolume  # noqa: E402
from evomerge.search.space import Genome, SearchSpace, load_space  # noqa: E402
from evomerge.search.study import Search  # noqa: E402

BOWL_BUDGET = 800
FRONT_BUDGET = 150
REFERENCE = [-2.6, -2.6]
NOISE_BUDGET, NOISE_DIM = 2000, 16  # just beyond the front's worst values (-2.56)


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
    return hypervolume(
        [[-float(((p - a) ** 2).sum()), -float(((p - b) ** 2).sum())] for p in pts], ["maximize", "maximize"], REFERENCE
    )


def noisy(kind: str, rng: np.random.Generator, target: np.ndarray):
    def f(x) -> float:
        true = float(((np.asarray(x) - target) ** 2).mean())
        if kind == "additive":
            return true + 0.01 * rng.standard_normal()
        if kind == "multiplicative":
            return true * (1 + 0.5 * rng.standard_normal())
        return true + 0.01 * rng.standard_cauchy()

    return f


def run_noisy(kind: str, variant: str, seed: int) -> float:
    target = np.random.default_rng(seed).random(NOISE_DIM)
    f = noisy(kind, np.random.default_rng(1000 + seed), target)
    handled = variant.endswith("+noise")
    if variant.startswith("evomerge"):
        from evomerge.search.optimizers import make_optimizer

        opt = make_optimizer("cma", NOISE_DIM, [Objective(name="f", direction="minimize")], seed, noise=handled)
        for _ in range(NOISE_BUDGET):
            x, _replicate = opt.ask_replicate()
            opt.tell(x, [f(x)])
        mean = opt.es.mean
    else:
        import cma

        es = cma.CMAEvolutionStrategy(
            [0.5] * NOISE_DIM,
            1 / 6,
            {"bounds": [0, 1], "seed": seed + 1, "verbose": -9, "verb_log": 0, "maxfevals": NOISE_BUDGET},
        )
        nh = cma.NoiseHandler(NOISE_DIM, maxevals=[1, 1, 5], epsilon=0) if handled else None
        while not es.stop():
            if nh:
                X, fit = es.ask_and_eval(f, evaluations=nh.evaluations)
                es.tell(X, fit)
                es.sigma *= nh(X, fit, f, es.ask)
                es.countevals += nh.evaluations_just_done
            else:
                X = es.ask()
                es.tell(X, [f(x) for x in X])
        mean = es.mean
    return float(((np.asarray(mean) - target) ** 2).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--with-gp",
        action="store_true",
        help="include Optuna's GP sampler in part 2 (over 5 minutes for 3 x 150 trials on 2 cores)",
    )
    args = ap.parse_args()
    seeds = range(args.seeds)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; {args.seeds} seeds")
    print(
        f"\n1. per-layer quadratic bowl, {bowl_genome().dimension} genes: evaluations to fitness 0.95 "
        f"(budget {BOWL_BUDGET})"
    )
    for name in ("random", "cma", "cmaes", "tpe"):
        started = time.perf_counter()
        hits = [run_bowl(name, s, BOWL_BUDGET) for s in seeds]
        shown = [str(h) if h else f">{BOWL_BUDGET}" for h in hits]
        med = statistics.median(h or BOWL_BUDGET + 1 for h in hits)
        print(
            f"  {name:<14} median {med if med <= BOWL_BUDGET else '>' + str(BOWL_BUDGET):>6}   runs {', '.join(shown)}"
            f"   ({time.perf_counter() - started:.0f} s)"
        )
    ideal = true_front_hv()
    print(
        f"\n2. two-objective trade-off, 4 genes: hypervolume after {FRONT_BUDGET} evaluations, "
        f"fraction of the true front's ({ideal:.3f})"
    )
    for name in ("random", "nsga2", "nsga3", "tpe", *(["gp"] if args.with_gp else [])):
        started = time.perf_counter()
        hv = [run_front(name, s, FRONT_BUDGET) / ideal for s in seeds]
        print(
            f"  {name:<14} median {statistics.median(hv):.3f}   runs {', '.join(f'{h:.3f}' for h in hv)}"
            f"   ({time.perf_counter() - started:.0f} s)"
        )
    print(f"\n3. noisy bowl, {NOISE_DIM} genes: noise-free error of the final mean after {NOISE_BUDGET} evaluations")
    variants = ("evomerge cma", "evomerge cma+noise", "pycma loop", "pycma loop+noise")
    print(f"  {'noise':<16}" + "".join(f"{v:>20}" for v in variants))
    for kind in ("additive", "multiplicative", "cauchy"):
        row = [statistics.median(run_noisy(kind, v, s) for s in seeds) for v in variants]
        print(f"  {kind:<16}" + "".join(f"{r:>20.4f}" for r in row))


if __name__ == "__main__":
    main()
