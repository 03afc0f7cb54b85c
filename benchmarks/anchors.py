"""Anchor-document estimates on real per-document records: error against the full score, per design.

    .venv/bin/python benchmarks/anchors.py --campaign runs/anchors-1000 --limit 1000 --ks 25 50 100 --refit 16

Reads (or first runs, when the directory does not exist yet) a campaign on the zoo: the demo's
experiment (experiments/demo.yaml: five experts, four task objectives, 160 candidates) with the
evaluator's ``limit`` set to ``--limit`` documents per task (the zoo has 1,000 search documents per
skill; the demo scores 100). Running it needs the zoo (``make demo`` builds it in .cache/zoo, or
``--zoo``) and takes minutes.

Protocol: the candidates with per-document records, in trial order (seeds, experts alone and hand
baselines first, then the search's), are split into the first ``--fit`` (the estimator is fitted on
their per-document scores) and the rest (never fitted on). For each task, design, k and anchor seed,
each later candidate's task score is estimated from its k anchor documents alone and compared with
its full score (the mean over the pool): MAE per task (averaged over the tasks), MAE of the mean over
tasks, and Spearman's rank correlation over the later candidates (per task averaged, and of the mean
over tasks). ``--pool`` also evaluates on the first n documents of each task only (a smaller pool,
as the demo's limit of 100). With ``--refit R``, a second protocol refits on every candidate before
the current one each R results (what a live campaign would do).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from demo_campaign import demo_experiment, run_experiment  # noqa: E402  (beside this script)

from evomerge.search.anchors import DESIGNS, AnchorEstimator, score_matrix  # noqa: E402


def run_campaign(directory: Path, zoo: Path, limit: int, budget: int, seed: int) -> None:
    """The demo's experiment with absolute paths and ``limit`` documents per task, run into ``directory``."""
    experiment, work = demo_experiment(directory, zoo, limit, budget, seed, f"anchors-{limit}-docs-seed-{seed}")
    run_experiment(experiment, work, directory)


def task_matrices(directory: Path) -> dict[str, np.ndarray]:
    """objective -> (candidates in trial order) x (documents in id order), one task per objective."""
    from evomerge.campaign import open_campaign

    loaded = open_campaign(directory, check=False)
    records = loaded.document_records().read()
    out = {}
    for objective in loaded.objectives:
        tasks = sorted({t for scored in records.values() for t in scored.get(objective.name, {})})
        for task in tasks:
            _, _, matrix = score_matrix(records, objective.name, task)
            out[objective.name if len(tasks) == 1 else f"{objective.name}/{task}"] = matrix
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho with average ranks for ties (nan when either side is constant)."""

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def estimates(matrix: np.ndarray, design: str, k: int, seed: int, fit: int, refit: int | None, times: list):
    """Estimates of rows fit..end: fitted once on rows < fit, or refitted on all earlier rows every ``refit``."""
    out = []
    estimator = None
    for i in range(fit, len(matrix)):
        if estimator is None or (refit and (i - fit) % refit == 0):
            start = time.perf_counter()
            estimator = AnchorEstimator(k, design, seed).fit(matrix[: i if refit else fit])
            times.append(time.perf_counter() - start)
        out.append(estimator.estimate({d: matrix[i, d] for d in estimator.anchors}))
    return np.array(out)


def evaluate(matrices, design, k, seeds, fit, refit):
    """Mean over anchor seeds of (MAE per task, MAE of the task mean, Spearman per task, Spearman of
    the task mean), the MAEs' spread over seeds, and the median fit time."""
    rows, times = [], []
    for seed in range(seeds):
        est = {name: estimates(m, design, k, seed, fit, refit, times) for name, m in matrices.items()}
        full = {name: m[fit:].mean(1) for name, m in matrices.items()}
        mean_est = np.mean([est[n] for n in matrices], axis=0)
        mean_full = np.mean([full[n] for n in matrices], axis=0)
        rows.append(
            (
                np.mean([np.abs(est[n] - full[n]).mean() for n in matrices]),
                np.abs(mean_est - mean_full).mean(),
                np.nanmean([spearman(est[n], full[n]) for n in matrices]),
                spearman(mean_est, mean_full),
            )
        )
    rows = np.array(rows)
    return rows.mean(0), rows.std(0), float(np.median(times))


def table(matrices, ks, seeds, fit, refit, title):
    pool = next(iter(matrices.values())).shape[1]
    later = len(next(iter(matrices.values()))) - fit
    print(
        f"\n{title}: pool {pool} documents per task, {len(matrices)} tasks, fitted on {fit} candidates, "
        f"{later} later candidates, {seeds} anchor seeds" + (f", refit every {refit}" if refit else "")
    )
    print("design    k  (share)  MAE task   MAE mean  rho task  rho mean  fit ms")
    for k in ks:
        for design in DESIGNS:
            (mae, mae_mean, rho, rho_mean), (sd, sd_mean, _, _), t = evaluate(matrices, design, k, seeds, fit, refit)
            print(
                f"{design:8} {k:3}  ({k / pool:5.3f})  {mae:.4f}±{sd:.3f} {mae_mean:.4f}±{sd_mean:.3f}"
                f"  {rho:7.3f}  {rho_mean:7.3f}  {1000 * t:6.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaign", type=Path, required=True, help="campaign directory (run first if absent)")
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache/zoo")
    parser.add_argument("--limit", type=int, default=200, help="documents per task when running the campaign")
    parser.add_argument("--budget", type=int, default=160, help="candidates when running the campaign")
    parser.add_argument("--seed", type=int, default=0, help="the campaign's seed when running it")
    parser.add_argument("--fit", type=int, default=40, help="first candidates fitted on")
    parser.add_argument("--seeds", type=int, default=5, help="anchor seeds per design and k")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--pool", type=int, nargs="*", default=[100], help="also a smaller pool: first n documents")
    parser.add_argument("--refit", type=int, default=None, help="also refit on all earlier candidates every R")
    args = parser.parse_args()
    if not args.campaign.exists():
        run_campaign(args.campaign, args.zoo.resolve(), args.limit, args.budget, args.seed)
    matrices = task_matrices(args.campaign)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(
        "full scores of the candidates, per task: mean (sd) "
        + ", ".join(f"{n} {m.mean():.3f} ({m.mean(1).std():.3f})" for n, m in matrices.items())
    )
    sizes = [None, *[p for p in args.pool if p < next(iter(matrices.values())).shape[1]]]
    for pool in sizes:
        subset = matrices if pool is None else {n: m[:, :pool] for n, m in matrices.items()}
        table(
            subset,
            [k for k in args.ks if k <= subset[next(iter(subset))].shape[1]],
            args.seeds,
            args.fit,
            None,
            "fitted once",
        )
        if args.refit:
            table(
                subset,
                [k for k in args.ks if k <= subset[next(iter(subset))].shape[1]],
                args.seeds,
                args.fit,
                args.refit,
                "refitted",
            )


if __name__ == "__main__":
    main()
