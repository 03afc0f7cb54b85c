"""Does kinship predict what pairwise task arithmetic gains? Measured on the zoo's five experts.

    .venv/bin/python benchmarks/kinship.py [--zoo .cache/zoo] [--split search|report|both]

For every pair of the zoo's experts: their kinship (``evomerge kinship``: cosine, Pearson and
Euclidean distance of the task vectors, share of sign conflicts) and the gain of their task
arithmetic merge (weights 1, lambda 1) on the mean of the two experts' skills, over the better of
the two experts alone (``evomerge zoo eval``'s scores, lm-eval, 200 documents per task and split).
Prints the Spearman rank correlation of each kinship metric with the gain over the pairs, whatever
it is. With 10 pairs, |rho| must exceed about 0.65 to be told from chance at the 5 % level.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure(offline=True)

import torch  # noqa: E402

from evomerge.models.kinship import kinship_of, stream_models  # noqa: E402
from evomerge.zoo.build import build_zoo, load_manifest  # noqa: E402
from evomerge.zoo.quality import evaluate_zoo  # noqa: E402
from evomerge.zoo.spec import PRESETS  # noqa: E402


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else float("nan")


def pair_mean(row: dict[str, float], a: str, b: str) -> float:
    return (row[a] + row[b]) / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    ap.add_argument("--split", choices=["search", "report", "both"], default="both")
    args = ap.parse_args()
    build_zoo(args.zoo, PRESETS["default"])
    manifest = load_manifest(args.zoo)
    skills = [m["skill"] for m in manifest["models"] if m["role"] == "expert"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; zoo {manifest['spec_fingerprint']} ({len(skills)} experts)"
    )
    started = time.perf_counter()
    layers, tensors = stream_models(args.zoo / "base", [args.zoo / f"expert-{s}" for s in skills])
    table = kinship_of(skills, layers, tensors)
    print(f"kinship of {len(skills)} experts: {time.perf_counter() - started:.2f} s\n")
    print(table.format())
    kin = {(p["a"], p["b"]): p for p in table.pairs}
    splits = ["search", "report"] if args.split == "both" else [args.split]
    gains: dict[tuple[str, str], float] = {}
    for split in splits:
        report = evaluate_zoo(args.zoo, REPO / "evaluators" / "zoo", split=split)
        for a, b in combinations(skills, 2):
            merged = pair_mean(report.scores[f"merge({a}+{b})"], a, b)
            best = max(pair_mean(report.scores[f"expert-{e}"], a, b) for e in (a, b))
            gains[(a, b)] = gains.get((a, b), 0.0) + (merged - best) / len(splits)
    pairs = list(combinations(skills, 2))
    print(f"\ngain of task arithmetic over the better expert (mean of the two skills; {' + '.join(splits)} split)")
    print(f"{'pair':<14}{'gain':>8}{'cosine':>9}{'pearson':>9}{'euclid':>9}{'conflict':>10}")
    for p in pairs:
        k = kin[p]
        print(
            f"{p[0] + '+' + p[1]:<14}{gains[p]:>8.3f}{k['cosine']:>9.4f}{k['pearson']:>9.4f}"
            f"{k['euclidean']:>9.3f}{k['sign_conflict']:>10.4f}"
        )
    g = [gains[p] for p in pairs]
    print(f"\nSpearman rank correlation with the gain over {len(pairs)} pairs:")
    for metric in ("cosine", "pearson", "euclidean", "sign_conflict"):
        print(f"  {metric:<14} rho = {spearman([kin[p][metric] for p in pairs], g):+.3f}")


if __name__ == "__main__":
    main()
