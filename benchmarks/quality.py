"""Does the search beat the recipes a user writes by hand, at what cost in documents, and how well do
anchor estimates and racing stand in for full evaluations?

    .venv/bin/python benchmarks/quality.py [--problem three|select] [--seeds 5] [--budget 40]
        [--zoo .cache/zoo ...] [--modes full,raced,raced_mean,raced_hv,multi] [--optimizers nsga2,random,cma]
        [--limit N] [--anchors 0.1] [--check 0.125] [--z 2] [--estimate neighbours|strata] [--gain 0.05]
        [--rungs 100,333] [--promote 0.33] [--threads N]

RESULTS.md's run used two zoos: the default one and one of another architecture and seed, built
first with ``.venv/bin/python -m evomerge zoo build --out .cache/zoo-qwen2-s1 --architecture qwen2
--seed 1``.

The zoo's three-expert problem: base + expert-add, expert-rev, expert-sort; objectives add, rev and
sort (lm-eval; search split: the whole pool of 1,000 documents per task unless ``--limit``), all
maximized, hypervolume from (0, 0, 0). Search space: search_spaces/three_experts_ties_groups.yaml
(TIES, weight and density per expert per group of two layers: 12 genes). Every run starts with the
uniform average and each expert alone as seeds (scored in full) and stops once it has scored
``--budget`` full evaluations' worth of documents. A candidate whose recipe was scored already is
told that result and costs nothing (the campaign's recipe cache). Modes, one optimizer each:

- ``full``: every candidate scored on the whole search pool;
- ``raced``: the product's racing (``evomerge.search.racing``, the campaign's defaults: anchors 1/10
  of each pool, check share 1/8, z 2, first fit after 8 results in full, refit every 8) with
  ``rule: dominance`` and the per-document records in a temporary campaign directory: a new
  candidate is scored on its anchors first and on the rest of the pools only when its interval
  leaves it possibly undominated; its estimate ``--estimate`` (default the campaign's,
  ``neighbours``);
- ``raced_mean``: the same with ``rule: mean``: a candidate stops on its anchors when its estimated
  mean over the objectives, plus its interval, stays behind the best mean scored in full;
- ``raced_hv``: the same with ``rule: hypervolume`` (the campaign's default): a candidate stops on its anchors when its
  interval's optimistic corner would add less than ``--gain`` of the hypervolume of the results in
  full (from (0, 0, 0), the reference of the printed hypervolumes);
- ``multi``: multi-fidelity (``--rungs`` documents per task, promote ``--promote``).

Printed per zoo: each expert alone and each hand baseline (``seeds.baselines``: task arithmetic at
lambda 0.5/0.7/1.0, TIES at density 0.5/0.8, DARE-TIES at 0.5, the uniform average) on the report
split (the whole pool of 500 documents per task), mean over objectives with its standard error; and
per mode, medians over the seeds (each run in brackets where it matters): the pick's mean report
score (the searched front member, seeds excluded, with the best mean on the search split), its
smallest paired margin over every hand baseline and every expert in standard errors
(``evomerge.report.paired``: the same documents, so the SE of the difference), documents per
candidate, candidates (scored in full), repeats, the final hypervolume on the search split, the
documents until the run reached the median final hypervolume of ``full`` (and the share of
``full``'s budget), and for ``raced`` the estimate's error on its check sample (candidates raced and
also scored in full, never used to fit before their estimate): MAE and Spearman per objective,
averaged. After ``full``'s rows, what any rule that puts only results in full on the front needs on
``full``'s own candidates (repeats left out): how many of them are on the front, and the least
share of the documents that scoring the front members in full (all of them for the whole
hypervolume; as few as a greedy pick by hypervolume gain finds for 99% of it) and every other
candidate on its anchors costs. One candidate at a time, in-process (the campaign's Search, Racer
and CandidateScorer, no Ray or MLflow): the figures count documents, not seconds.

``--problem select``: the default demo's problem, which experts to merge. The zoo's five experts (add,
rev, sort, sub, mul), objectives add, rev, sort and sub, space search_spaces/five_experts_select.yaml
(2-3 experts per candidate, TIES | PCB | Consensus-TIES, a weight and a density per expert: 16 genes);
the hand baselines merge all five.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure()

from evomerge.campaign import baseline_recipes  # noqa: E402
from evomerge.evaluate.candidate import CandidateScorer  # noqa: E402
from evomerge.evaluate.config import parse_evaluator  # noqa: E402
from evomerge.experiment import RacingConfig  # noqa: E402
from evomerge.objectives import Objective  # noqa: E402
from evomerge.recipe import parse_recipe  # noqa: E402
from evomerge.report import paired, summary  # noqa: E402
from evomerge.search.fidelity import Fidelity  # noqa: E402
from evomerge.search.pareto import hypervolume  # noqa: E402
from evomerge.search.racing import GAIN, Racer, Racing, settle  # noqa: E402
from evomerge.search.records import DocumentRecords  # noqa: E402
from evomerge.search.space import Genome, load_space  # noqa: E402
from evomerge.search.study import Search  # noqa: E402


@dataclass(frozen=True)
class Problem:
    """Experts merged, one objective per skill in ``skills`` (lm-eval), a search space."""

    experts: tuple[str, ...]
    skills: tuple[tuple[str, str], ...]  # (skill, metric)
    space: str

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.skills]

    def evaluator(self, limit: int | None) -> dict:
        objectives = [{"name": n, "task": f"zoo/zoo_{n}_{{split}}.yaml", "metric": m} for n, m in self.skills]
        out = {"seed": 0, "batch_size": 100, "report_limit": "all", "objectives": objectives}
        return {**out, "limit": limit} if limit else out


PROBLEMS = {
    # where task arithmetic at lambda 1 loses the reversal skill
    "three": Problem(
        ("expert-add", "expert-rev", "expert-sort"),
        (("add", "exact_match"), ("rev", "exact_match"), ("sort", "acc")),
        "three_experts_ties_groups.yaml",
    ),
    # the default demo's problem: which of five experts to merge (2-3 per candidate), judged on four
    # skills (the multiplication expert barely learns its own: there to be left out)
    "select": Problem(
        ("expert-add", "expert-rev", "expert-sort", "expert-sub", "expert-mul"),
        (("add", "exact_match"), ("rev", "exact_match"), ("sort", "acc"), ("sub", "acc")),
        "five_experts_select.yaml",
    ),
}
OPTIMIZERS = {
    "random": ("random", {}),
    "nsga2": ("nsga2", {"sampler_options": {"population_size": 12}}),
    "cma": ("cma", {}),
}


@dataclass
class Settings:
    problem: Problem
    budget_docs: int
    fidelity: Fidelity
    racing: RacingConfig
    gain: float = GAIN


class Zoo:
    """The resident scorers of one zoo, one per split (loaded once, reused by every run)."""

    def __init__(self, path: Path, problem: Problem, limit: int | None):
        self.path, self.problem = path, problem
        models = {"base": str(path / "base"), **{e: str(path / e) for e in problem.experts}}
        evaluator = parse_evaluator(problem.evaluator(limit), REPO / "evaluators" / "inline.yaml")
        self.scorers = {s: CandidateScorer(models, "base", evaluator, split=s) for s in ("search", "report")}
        self.pools = {t: s["search"] for t, s in self.scorers["search"].documents().items() if "search" in s}
        self._report = {}
        self.layers = int(self.scorers["search"].model.config.num_hidden_layers)

    @property
    def full_documents(self) -> int:
        return sum(len(ids) for ids in self.pools.values())

    def score(self, recipe, documents=None):
        s = self.scorers["search"].score(recipe, documents=documents)
        values = {n: s.values[n] for n in self.problem.names} if s.status == "done" else None
        return values, int(s.timings.get("documents", 0)), s.per_document

    def report(self, recipe) -> dict:
        """The recipe's per-document report scores (cached by recipe)."""
        key = recipe.model_dump_json()
        if key not in self._report:
            s = self.scorers["report"].score(recipe)
            if s.status != "done":
                raise RuntimeError(f"report scoring failed: {s.reason}")
            self._report[key] = s.per_document
        return self._report[key]


def search_run(zoo: Zoo, settings: Settings, optimizer: str, mode: str, seed: int) -> dict:
    problem = settings.problem
    name, options = OPTIMIZERS[optimizer]
    genome = Genome(load_space(REPO / "search_spaces" / problem.space), zoo.layers, seed=seed)
    objectives = [Objective(name=n) for n in problem.names]
    m, seeds = len(problem.names), 1 + len(problem.experts)
    r = settings.racing
    rule = {"raced": "dominance", "raced_mean": "mean", "raced_hv": "hypervolume"}.get(mode)
    racing = None
    if rule:
        racing = Racing(r.anchors, r.check, r.z, r.min_full, r.refit, seed, rule, r.estimate, settings.gain)
    with tempfile.TemporaryDirectory() as tmp:
        fidelity = settings.fidelity if mode == "multi" else None
        search = Search(genome, name, objectives, seed, tmp, options, fidelity=fidelity, racing=racing)
        records = DocumentRecords(tmp, zoo.pools)
        racer = Racer(search, records, zoo.pools, first_fit=seeds, reference=[0.0] * m) if racing else None
        for point in [genome.uniform_average(), *(genome.expert_alone(e) for e in problem.experts)]:
            search.enqueue(point)
        curve = []  # (documents scored, hypervolume of the full-fidelity front)
        while search.documents < settings.budget_docs:
            if racer is not None:
                racer.maybe_fit()
            trial = search.ask()
            original = search.repeat_of(trial)
            if original is not None:
                search.tell_repeat(trial, original)
                continue
            step(zoo, search, racer, records, trial)
            curve.append(
                (search.documents, hypervolume([t.values for t in search.finished], ["maximize"] * m, [0.0] * m))
            )
        # the searched front member a user exports with equal weights: the best mean on the search
        # split (seeds excluded: those are the experts and their average), judged on the report split
        searched = [t for t in search.front() if t.id >= seeds] or search.finished[seeds:]
        pick = max(searched, key=lambda t: statistics.fmean(t.values))
        errors = racer.errors() if racer else []
        counts = Racing(r.anchors, r.check, r.z, r.min_full, r.refit, seed).count
        share = sum(counts(len(p)) for p in zoo.pools.values()) / zoo.full_documents  # anchors' documents
        return {
            "pick": zoo.report(pick.recipe),
            "hypervolume": curve[-1][1],
            "curve": curve,
            "candidates": len(search.trials),
            "full": len(search.finished),
            "repeats": len(search.repeats),
            "documents_per_candidate": search.documents / max(1, len(search.trials)),
            "mae": statistics.fmean(e["mae"] for e in errors) if errors and errors[0] else None,
            "spearman": statistics.fmean(e["spearman"] for e in errors) if errors and "spearman" in errors[0] else None,
            "checked": sum(t.full and racer.checked(t) for t in search.raced) if racer else 0,
            "least": least_documents([t.values for t in search.finished if "repeat_of" not in t.info], m, share),
        }


def least_documents(values: list[list[float]], m: int, anchors: float) -> dict:
    """What any racing rule that puts only results in full on the front needs, on this run's own
    candidates (``values``, all scored in full): the front's members (all of them for the whole
    hypervolume; for 99% of it, as few as a greedy pick by hypervolume gain finds), and the share of
    the run's documents that scoring those in full and every other candidate on ``anchors`` of its
    pools costs."""
    ref, whole = [0.0] * m, hypervolume(values, ["maximize"] * m, [0.0] * m)
    points = [list(v) for v in dict.fromkeys(map(tuple, values))]  # candidates of equal scores: one point
    front = [v for v in points if not any(all(a >= b for a, b in zip(u, v)) and u != v for u in points)]
    chosen: list[list[float]] = []
    while hypervolume(chosen, ["maximize"] * m, ref) < 0.99 * whole - 1e-12:
        rest = [v for v in front if v not in chosen]
        chosen.append(max(rest, key=lambda v: hypervolume([*chosen, v], ["maximize"] * m, ref)))
    n = len(values)
    share = lambda k: (k + (n - k) * anchors) / n  # noqa: E731
    k = len(chosen)
    return {"front": len(front), "n": n, "for_99": k, "docs_99": share(k), "docs_all": share(len(front))}


def step(zoo: Zoo, search: Search, racer, records, trial) -> None:
    """One evaluation of ``trial``, recorded and told as the campaign's controller does."""
    values, docs, per_document = zoo.score(trial.recipe, documents=(racer or search).documents_for(trial))
    settle(search, racer, records, trial, values, per_document, {"documents": docs})


def documents_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((d for d, hv in curve if hv >= target - 1e-12), None)


def hand_recipes(problem: Problem) -> dict:
    experts = {
        e: parse_recipe({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}}]})
        for e in problem.experts
    }
    return {**experts, **dict(baseline_recipes("base", list(problem.experts), 0))}


def print_zoo(zoo: Zoo, settings: Settings, optimizer: str, modes: list[str], n_seeds: int) -> None:
    names = settings.problem.names
    hands = {label: zoo.report(r) for label, r in hand_recipes(settings.problem).items()}
    print("| recipe | mean report score ± SE |\n|---|---|")
    for label, scores in hands.items():
        s = summary(scores, names)
        print(f"| {label} | {s['mean']:.4f} ± {s['se']:.4f} |")
    results = {mode: [search_run(zoo, settings, optimizer, mode, s) for s in range(n_seeds)] for mode in modes}
    print(
        "\n| mode | pick's mean report score | smallest margin over every hand recipe (SE) | documents a "
        "candidate | candidates (full) | repeats | final hv | documents to full's median hv | estimate MAE | "
        "estimate Spearman |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    target = statistics.median(r["hypervolume"] for r in results.get("full", [])) if "full" in results else None
    budget = settings.budget_docs
    for mode, runs in results.items():
        picks = [summary(r["pick"], names)["mean"] for r in runs]
        margins = []
        for r in runs:
            each = {label: paired(r["pick"], scores, names)["margin_se"] for label, scores in hands.items()}
            margins.append(min(each.items(), key=lambda kv: kv[1]))
        med = lambda key, runs=runs: statistics.median(r[key] for r in runs)  # noqa: E731
        reach = [documents_to(r["curve"], target) if target is not None else None for r in runs]
        reach_s = statistics.median(d if d is not None else float("inf") for d in reach)
        reach_text = f"{reach_s:.0f} ({reach_s / budget:.2f})" if reach_s != float("inf") else "not reached"
        reach_text += " [" + ", ".join(f"{d / budget:.2f}" if d is not None else "-" for d in reach) + "]"
        est = [r for r in runs if r["mae"] is not None]
        mae = f"{statistics.median(r['mae'] for r in est):.4f}" if est else "-"
        rho = f"{statistics.median(r['spearman'] for r in est if r['spearman'] is not None):.3f}" if est else "-"
        print(
            f"| {optimizer} {mode} | {statistics.median(picks):.4f} ({', '.join(f'{p:.3f}' for p in picks)}) | "
            f"{statistics.median(m for _, m in margins):+.1f} ({', '.join(f'{m:+.1f} {lab}' for lab, m in margins)})"
            f" | {med('documents_per_candidate'):.0f} | {med('candidates'):.0f} ({med('full'):.0f}) | "
            f"{med('repeats'):.0f} | {med('hypervolume'):.4f} | {reach_text} | {mae} | {rho} |"
        )
    if "full" in results:
        least = lambda key: statistics.median(r["least"][key] for r in results["full"])  # noqa: E731
        print(
            f"\nfull's runs (medians): {least('front'):.0f} of {least('n'):.0f} candidates on the front; a rule that "
            f"scores front members in full and the rest on their anchors needs at least {least('docs_all'):.2f} "
            f"of the documents for the whole hypervolume ({least('for_99'):.0f} members, {least('docs_99'):.2f} of "
            "the documents, for 99% of it: greedy by hypervolume gain), on the same candidates"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=40, help="full evaluations' worth of documents per run")
    parser.add_argument("--zoo", type=Path, nargs="+", default=[REPO / ".cache" / "zoo"])
    parser.add_argument("--modes", default="full,raced,raced_mean", help="of full, raced, raced_mean, raced_hv, multi")
    parser.add_argument("--optimizers", default="nsga2")
    parser.add_argument("--problem", choices=PROBLEMS, default="three")
    parser.add_argument("--limit", type=int, help="search documents per task (default: the whole pool)")
    parser.add_argument("--anchors", type=float, default=RacingConfig().anchors)
    parser.add_argument("--check", type=float, default=RacingConfig().check)
    parser.add_argument("--z", type=float, default=RacingConfig().z)
    parser.add_argument("--estimate", choices=("neighbours", "strata"), default=RacingConfig().estimate)
    parser.add_argument("--gain", type=float, default=GAIN, help="raced_hv: the hypervolume rule's least share")
    parser.add_argument("--rungs", default="100,333", help="multi-fidelity rungs, documents per task")
    parser.add_argument("--promote", type=float, default=1 / 3)
    parser.add_argument("--threads", type=int, help="torch threads (default torch's; 1 to run several at once)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    problem = PROBLEMS[args.problem]
    racing = RacingConfig(anchors=args.anchors, check=args.check, z=args.z, estimate=args.estimate)
    fidelity = Fidelity(tuple(int(r) for r in args.rungs.split(",")), args.promote)
    modes = args.modes.split(",")
    print(
        f"machine: {platform.machine()}; problem {args.problem} ({', '.join(problem.experts)}; {problem.space}); "
        f"seeds 0-{args.seeds - 1}; budget {args.budget} full evaluations' worth of documents per run; "
        f"modes {modes}; racing {racing.model_dump()}; rungs {fidelity.rungs}, promote {fidelity.promote:.2f}"
    )
    for path in args.zoo:
        started = time.perf_counter()
        zoo = Zoo(path, problem, args.limit)
        settings = Settings(problem, args.budget * zoo.full_documents, fidelity, racing, args.gain)
        pools = ", ".join(f"{t} {len(ids)}" for t, ids in zoo.pools.items())
        print(f"\n## {path.name} ({zoo.scorers['search'].model.config.model_type}, {zoo.layers} layers; {pools})")
        for optimizer in args.optimizers.split(","):
            print_zoo(zoo, settings, optimizer, modes, args.seeds)
        print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
