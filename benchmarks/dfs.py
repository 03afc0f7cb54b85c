"""Data-flow space (layer paths) against parameter space, and the two chained, at an equal budget.

    .venv/bin/python benchmarks/dfs.py [--seeds 3] [--budget 60] [--zoo .cache/zoo] [--repeats 2]

The zoo's three-expert problem (objectives add, rev and sort, lm-eval, 100 documents per task,
seeded subsets, search split; all maximized), CMA-ES on the mean of the three scores throughout,
every run ``--budget`` full evaluations including its seeds:

- PS: search_spaces/three_experts_ties_groups.yaml (TIES, weight and density per expert per group
  of two layers, 12 genes); seeds: the uniform average and each expert alone;
- DFS: a layer path over the three experts (their 3 x 4 layers repeated ``--repeats`` times, an
  inclusion gene and an input scale in [0.5, 1.5] per slot, at most 12 layers); seeds: each expert;
- PS+DFS: PS for half the budget, its pick merged to disk, then DFS for the other half over
  [that merge, the expert of the skill the merge scores lowest on (search split)]; seeds: each alone;
- each expert alone.

CMA-ES starts at the middle of the box (for a path space: a random path) or, ``--start best_seed``,
at the best seed (an expert's own path); both are run by default.

The pick of a run is the searched candidate (seeds excluded) with the best mean on the search
split; the table gives its mean report score (held-out split), median over seeds, each seed in
brackets. In-process, one candidate at a time (the campaign's Search and CandidateScorer, no Ray
or MLflow): the figures count evaluations, not seconds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure()

from evomerge.evaluate.candidate import CandidateScorer  # noqa: E402
from evomerge.evaluate.config import parse_evaluator  # noqa: E402
from evomerge.export import located_recipe  # noqa: E402
from evomerge.merge.ondisk import merge_to_disk  # noqa: E402
from evomerge.objectives import Objective  # noqa: E402
from evomerge.recipe import parse_recipe  # noqa: E402
from evomerge.search.paths import PathSpace  # noqa: E402
from evomerge.search.space import Genome, load_space, make_genome  # noqa: E402
from evomerge.search.study import Search  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from quality import EVALUATOR, EXPERTS, NAMES  # noqa: E402  (the same problem as the quality benchmark)


def scorers(models: dict[str, str], base: str, resident: str) -> dict[str, CandidateScorer]:
    evaluator = parse_evaluator(EVALUATOR, REPO / "evaluators" / "inline.yaml")
    return {s: CandidateScorer(models, base, evaluator, split=s, resident=resident) for s in ("search", "report")}


def values(scorer: CandidateScorer, recipe) -> list[float] | None:
    s = scorer.score(recipe)
    return [s.values[n] for n in NAMES] if s.status == "done" else None


def run(
    genome, seeds: list[list[float]], scorer: dict, budget: int, seed: int, start: str = "middle"
) -> tuple[object, list[float]]:
    """CMA-ES for ``budget`` evaluations (seeds included); the pick's recipe and its report scores."""
    with tempfile.TemporaryDirectory() as tmp:
        objectives = [Objective(name="mean", direction="maximize")]
        search = Search(genome, "cma", objectives, seed, tmp, {"start": start})
        for point in seeds:
            search.enqueue(point)
        while len(search.trials) < budget:
            trial = search.ask()
            v = values(scorer["search"], trial.recipe)
            search.report(trial.id, None if v is None else [statistics.fmean(v)])
        searched = [t for t in search.finished[len(seeds) :] if t.values]
        pick = max(searched, key=lambda t: t.values[0])
        print(f"  pick: trial {pick.id}, search mean {pick.values[0]:.3f}", flush=True)
        return pick.recipe, values(scorer["report"], pick.recipe)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=60, help="evaluations per run (PS+DFS: half each)")
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--start", default="middle,best_seed", help="CMA-ES starts compared for the DFS searches")
    args = parser.parse_args()
    started = time.perf_counter()
    zoo = args.zoo
    print(f"machine: {platform.machine()}; zoo {zoo.name}; seeds 0-{args.seeds - 1}; {args.budget} evaluations per run")
    ps_scorer = scorers({"base": str(zoo / "base"), **{e: str(zoo / e) for e in EXPERTS}}, "base", resident="merge")
    path_scorer = scorers({e: str(zoo / e) for e in EXPERTS}, EXPERTS[0], resident="path")
    layers = int(ps_scorer["search"].model.config.num_hidden_layers)
    ps_genome = lambda seed: Genome(  # noqa: E731
        load_space(REPO / "search_spaces" / "three_experts_ties_groups.yaml"), layers, seed=seed
    )

    def dfs_genome(models: list[str], seed: int):
        space = PathSpace.model_validate(
            {
                "models": models,
                "layers": {"granularity": "path", "repeats": args.repeats, "max_layers": 3 * layers},
            }
        )
        return make_genome(space, dict.fromkeys(models, layers), seed)

    starts = args.start.split(",")
    rows: dict[str, list[float]] = {}
    for e in EXPERTS:
        alone = parse_recipe({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}}]})
        rows[f"{e} alone"] = [statistics.fmean(values(ps_scorer["report"], alone))]
    for seed in range(args.seeds):
        g = ps_genome(seed)
        _, report = run(g, [g.uniform_average(), *(g.expert_alone(e) for e in EXPERTS)], ps_scorer, args.budget, seed)
        rows.setdefault("PS", []).append(statistics.fmean(report))
        for start in starts:
            g = dfs_genome(EXPERTS, seed)
            recipe, report = run(g, [g.expert_alone(e) for e in EXPERTS], path_scorer, args.budget, seed, start)
            rows.setdefault(f"DFS (start {start})", []).append(statistics.fmean(report))
            print(
                f"seed {seed}: DFS ({start}) pick {len(recipe.path())} layers: {[(m, i) for m, i, _ in recipe.path()]}"
            )
        # PS+DFS: half the budget each; the DFS half over [PS merge, the expert of its weakest skill]
        g = ps_genome(seed)
        half = args.budget // 2
        ps_recipe, _ = run(g, [g.uniform_average(), *(g.expert_alone(e) for e in EXPERTS)], ps_scorer, half, seed)
        with tempfile.TemporaryDirectory() as tmp:
            merged = Path(tmp) / "ps-merge"
            models = {"base": str(zoo / "base"), **{e: str(zoo / e) for e in EXPERTS}}
            merge_to_disk(located_recipe(ps_recipe, models), merged, progress=False)
            ps_alone = parse_recipe(
                {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}}]}
            )
            ps_values = values(scorers({"base": str(merged)}, "base", resident="merge")["search"], ps_alone)
            weakest = EXPERTS[min(range(3), key=lambda i: ps_values[i])]
            pair = {"ps-merge": str(merged), weakest: str(zoo / weakest)}
            scorer = scorers(pair, "ps-merge", resident="path")
            for start in starts:
                g = dfs_genome(list(pair), seed)
                recipe, report = run(g, [g.expert_alone(m) for m in pair], scorer, args.budget - half, seed, start)
                rows.setdefault(f"PS+DFS (start {start})", []).append(statistics.fmean(report))
                print(
                    f"seed {seed}: PS+DFS ({start}) over [ps-merge, {weakest}] (PS merge search scores "
                    f"{', '.join(f'{v:.2f}' for v in ps_values)}); pick {[(m, i) for m, i, _ in recipe.path()]}"
                )
    print("\n| candidate | mean report score (median) | per seed |\n|---|---|---|")
    for label, scores in rows.items():
        print(f"| {label} | {statistics.median(scores):.3f} | {', '.join(f'{v:.3f}' for v in scores)} |")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
