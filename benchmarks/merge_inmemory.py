"""In-memory materialization cost per candidate, each method relative to linear.

    .venv/bin/python benchmarks/merge_inmemory.py [--hidden 768 --layers 12 --vocab 16000 --experts 3]
                                                  [--cache all|auto|none --task-vector-dtype float32|bfloat16|auto]

A random-weight Llama of about 110M parameters (the default) is built in memory with `--experts`
perturbed copies. One ResidentMerge holds the base and the task vectors, under the memory policy the
flags give (default: float32 task vectors, every statistic cached); the first candidate of each
method pays its one-time precomputation (reported apart), then `--repeats` candidates with fresh
random parameters are timed. Target: every sparsifying method at most 3x linear (with caches).
PCB keeps nothing per element (its balance is recomputed for its drop thresholds: two histogram
passes, then the merge pass); Consensus adds one pass over the task vectors for the TALL masks.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from random_llama import random_llama  # noqa: E402  (beside this script)

from evomerge.merge.apply import ResidentMerge  # noqa: E402
from evomerge.merge.memory import MemoryPolicy  # noqa: E402
from evomerge.merge.registry import METHODS as METHODS_BY_NAME  # noqa: E402
from evomerge.recipe import parse_recipe  # noqa: E402

METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "darex",
    "pcb",
    "consensus_ta",
    "consensus_ties",
    "slerp",
    "model_stock",
]


def recipe_for(method: str, experts: list[str], rng: random.Random, seed: int):
    per = {"weight": round(rng.uniform(0.2, 1.0), 3)}
    if method != "pcb" and any(p.name == "density" for p in METHODS_BY_NAME[method].params):
        per["density"] = round(rng.uniform(0.3, 0.7), 3)
    if method == "pcb":  # the paper's kept fractions are 5-20 %
        per["density"] = round(rng.uniform(0.05, 0.2), 3)
    if method.startswith("della"):
        per["epsilon"] = 0.1
    if method == "darex":
        per["q"] = round(rng.uniform(per["density"], 1.0), 3)
    if method.startswith("consensus"):
        per["tall_lambda"] = round(rng.uniform(0.2, 0.6), 3)
    if method == "slerp":
        return parse_recipe(
            {
                "merge_method": "slerp",
                "base_model": "base",
                "models": [{"model": experts[0]}],
                "parameters": {"t": round(rng.uniform(0, 1), 3)},
            }
        )
    if method == "model_stock":
        return parse_recipe(
            {"merge_method": "model_stock", "base_model": "base", "models": [{"model": e} for e in experts]}
        )
    if method == "linear":
        return parse_recipe(
            {"merge_method": "linear", "models": [{"model": e, "parameters": dict(per)} for e in experts]}
        )
    return parse_recipe(
        {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": e, "parameters": dict(per)} for e in experts],
            "evomerge": {"seed": seed},
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cache", default="all", choices=["all", "auto", "none"])
    ap.add_argument("--task-vector-dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    args = ap.parse_args()
    model = random_llama(args.vocab, args.hidden, args.layers)
    n = sum(p.numel() for p in model.parameters())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = {f"e{i}": {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for i in range(args.experts)}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"model: random Llama, {n / 1e6:.1f}M parameters (float32), {args.experts} experts")
    started = time.perf_counter()
    policy = MemoryPolicy(task_vector_dtype=args.task_vector_dtype, cache=args.cache)
    resident = ResidentMerge(model, base, experts, memory=policy)
    print(f"resident set-up (task vectors): {time.perf_counter() - started:.2f} s; memory: {policy.model_dump()}")
    del experts
    rng = random.Random(0)
    names = list(resident.experts)
    methods = args.methods.split(",")
    first = {m: resident.materialize(recipe_for(m, names, rng, 0)).seconds for m in methods}
    times = {m: [] for m in methods}
    for _ in range(args.repeats):  # round-robin, so machine drift hits every method alike
        for m in methods:
            times[m].append(resident.materialize(recipe_for(m, names, rng, 0)).seconds)
    rows = [(m, first[m], statistics.median(times[m])) for m in methods]
    linear = dict((m, t) for m, _, t in rows)["linear"]
    print(f"\n{'method':<18}{'first (s)':>10}{'per candidate (s)':>19}{'x linear':>10}")
    for method, first, t in rows:
        print(f"{method:<18}{first:>10.2f}{t:>19.3f}{t / linear:>10.2f}")


if __name__ == "__main__":
    main()
