"""Does the search beat the recipes a user writes by hand, and does multi-fidelity pay?

    .venv/bin/python benchmarks/quality.py [--problem three|select] [--seeds 5] [--budget 60] [--zoo .cache/zoo ...]
        [--optimizers random,nsga2,cma] [--rungs 11,33] [--promote 0.33] [--tell-stopped rung|failed] [--threads N]

RESULTS.md's run used two zoos: the default one and one of another architecture and seed, built
first with ``.venv/bin/python -m evomerge zoo build --out .cache/zoo-qwen2-s1 --architecture qwen2
--seed 1``.

The zoo's three-expert problem: base + expert-add, expert-rev, expert-sort; objectives add, rev and
sort (lm-eval, 100 documents per task, seeded subsets; search split), all maximized, hypervolume from
(0, 0, 0). Search space: search_spaces/three_experts_ties_groups.yaml (TIES, weight and density per
expert per group of two layers: 12 genes). Every run starts with the campaign's default seeds (the
uniform average and each expert alone, scored in full) and stops once it has scored the same number
of documents: ``--budget`` full evaluations' worth (300 documents each). Compared:

- the hand baselines (``seeds.baselines``: task arithmetic at lambda 0.5/0.7/1.0, TIES at density
  0.5/0.8, DARE-TIES at 0.5, the uniform average) and each expert alone;
- random search, NSGA-II (population 12) and CMA-ES (the mean of the three scores), each with full
  evaluations and with multi-fidelity (rungs of 11 and 33 documents per task, promote 1/3).

Reported per configuration, median over seeds (and the runs): the mean report score of the searched
merge a user would export with equal weights (the front member, seeds excluded, with the best mean
on the search split: the search split picks, the report split judges), the final
hypervolume on the search split, documents scored until 95% of the run's own final hypervolume, and
for multi-fidelity the documents until it reached the median final hypervolume of the same optimizer
with full evaluations. One candidate at a time, in-process (the campaign's Search and CandidateScorer,
no Ray or MLflow: the figures count documents, not seconds).

``--tell-stopped failed`` (a what-if, not an option of the product): with multi-fidelity, a candidate
stopped at a lower rung is told to the optimizer as a failure instead of its rung result.
``--threads 1`` lets two runs (e.g. different ``--optimizers``) share two cores.

``--problem select``: the default demo's problem, which experts to merge. The zoo's five experts (add,
rev, sort, sub, mul), objectives add, rev, sort and sub (400 documents per full evaluation; the
multiplication expert barely learns its skill and is there to be left out), space
search_spaces/five_experts_select.yaml (2-3 experts per candidate, TIES | PCB | Consensus-TIES, a
weight and a density per expert: 16 genes); the hand baselines merge all five.
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
from evomerge.objectives import Objective  # noqa: E402
from evomerge.recipe import parse_recipe  # noqa: E402
from evomerge.search.fidelity import Fidelity  # noqa: E402
from evomerge.search.pareto import hypervolume  # noqa: E402
from evomerge.search.space import Genome, load_space  # noqa: E402
from evomerge.search.study import Search  # noqa: E402

LIMIT = 100


@dataclass(frozen=True)
class Problem:
    """Experts merged, one objective per skill in ``skills`` (lm-eval, ``LIMIT`` documents per task),
    a search space."""

    experts: tuple[str, ...]
    skills: tuple[tuple[str, str], ...]  # (skill, metric)
    space: str

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.skills]

    @property
    def evaluator(self) -> dict:
        objectives = [{"name": n, "task": f"zoo/zoo_{n}_{{split}}.yaml", "metric": m} for n, m in self.skills]
        return {"limit": LIMIT, "seed": 0, "batch_size": 100, "objectives": objectives}

    @property
    def full_documents(self) -> int:
        return LIMIT * len(self.skills)


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
PROBLEM = PROBLEMS["three"]
TELL_STOPPED = "rung"


class StoppedToldAsFailed(Search):
    """What-if (``--tell-stopped failed``, not an option of the product): a candidate stopped at a
    lower rung is told to the optimizer as a failure (CMA-ES: worse than anything seen; Optuna: a
    failed trial) instead of its rung's noisy result; the journal and the front are unchanged."""

    def _apply_tell(self, trial_id, values, info):
        trial = self.trials[trial_id]
        stopped = values is not None and trial.rung is not None and trial.rung < self.fidelity.top
        if not stopped or trial.unit is None:
            return super()._apply_tell(trial_id, values, info)
        unit, trial.unit = trial.unit, None  # told below instead
        try:
            out = super()._apply_tell(trial_id, values, info)
        finally:
            trial.unit = unit
        self.optimizer.tell(unit, None)
        return out


FIDELITY = Fidelity((11, 33), 1 / 3)
KEY = "best_report_mean"
OPTIMIZERS = {
    "random": ("random", {}),
    "nsga2": ("nsga2", {"sampler_options": {"population_size": 12}}),
    "cma": ("cma", {}),
}


class Zoo:
    """The resident scorers of one zoo, one per split (loaded once, reused by every run)."""

    def __init__(self, path: Path):
        self.path = path
        models = {"base": str(path / "base"), **{e: str(path / e) for e in PROBLEM.experts}}
        evaluator = parse_evaluator(PROBLEM.evaluator, REPO / "evaluators" / "inline.yaml")
        self.scorers = {s: CandidateScorer(models, "base", evaluator, split=s) for s in ("search", "report")}
        self._report = {}
        self.layers = int(self.scorers["search"].model.config.num_hidden_layers)

    def score(self, recipe, split="search", documents=None):
        s = self.scorers[split].score(recipe, documents=documents)
        values = [s.values[n] for n in PROBLEM.names] if s.status == "done" else None
        return values, int(s.timings.get("documents", 0))

    def report_mean(self, recipe) -> float:
        key = recipe.model_dump_json()
        if key not in self._report:
            values, _ = self.score(recipe, "report")
            self._report[key] = statistics.fmean(values)
        return self._report[key]


def search_run(zoo: Zoo, optimizer: str, multi: bool, seed: int, budget_docs: int) -> dict:
    name, options = OPTIMIZERS[optimizer]
    genome = Genome(load_space(REPO / "search_spaces" / PROBLEM.space), zoo.layers, seed=seed)
    objectives = [Objective(name=n) for n in PROBLEM.names]
    m, k = len(PROBLEM.names), len(PROBLEM.experts)
    with tempfile.TemporaryDirectory() as tmp:
        kind = StoppedToldAsFailed if multi and TELL_STOPPED == "failed" else Search
        search = kind(genome, name, objectives, seed, tmp, options, fidelity=FIDELITY if multi else None)
        for point in [genome.uniform_average(), *(genome.expert_alone(e) for e in PROBLEM.experts)]:
            search.enqueue(point)
        curve = []  # (documents scored, hypervolume of the full-fidelity front)
        while search.documents < budget_docs:
            trial = search.ask()
            values, docs = zoo.score(trial.recipe, documents=search.documents_for(trial))
            search.report(trial.id, values, {"documents": docs})
            curve.append(
                (search.documents, hypervolume([t.values for t in search.finished], ["maximize"] * m, [0.0] * m))
            )
        # the searched front member a user exports with equal weights: the best mean on the search
        # split (seeds excluded: those are the experts and their average), judged on the report split
        searched = [t for t in search.front() if t.id >= 1 + k] or search.finished[1 + k :]
        pick = max(searched, key=lambda t: statistics.fmean(t.values))
        best = zoo.report_mean(pick.recipe)
        return {
            "best_report_mean": best,
            "hypervolume": curve[-1][1],
            "curve": curve,
            "candidates": len(search.trials),
            "full": len(search.finished),
        }


def documents_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((d for d, hv in curve if hv >= target - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=60, help="full evaluations' worth of documents per run")
    parser.add_argument("--zoo", type=Path, nargs="+", default=[REPO / ".cache" / "zoo"])
    parser.add_argument("--rungs", default="11,33", help="multi-fidelity rungs, documents per task")
    parser.add_argument("--promote", type=float, default=1 / 3)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--problem", choices=PROBLEMS, default="three")
    parser.add_argument(
        "--tell-stopped",
        choices=["rung", "failed"],
        default="rung",
        help="multi-fidelity: tell the optimizer a stopped candidate's rung result (the product) or a failure",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default torch's; 1 to run several at once)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    global FIDELITY, PROBLEM, TELL_STOPPED
    PROBLEM, TELL_STOPPED = PROBLEMS[args.problem], args.tell_stopped
    FIDELITY = Fidelity(tuple(int(r) for r in args.rungs.split(",")), args.promote)
    chosen = args.optimizers.split(",")
    budget_docs = args.budget * PROBLEM.full_documents
    print(
        f"machine: {platform.machine()}; problem {args.problem} ({', '.join(PROBLEM.experts)}; {PROBLEM.space}); "
        f"seeds 0-{args.seeds - 1}; budget {budget_docs} documents per run; "
        f"rungs {FIDELITY.rungs}, promote {FIDELITY.promote:.2f}, stopped candidates told as {TELL_STOPPED}"
    )
    for path in args.zoo:
        started = time.perf_counter()
        zoo = Zoo(path)
        print(f"\n## {path.name} ({zoo.scorers['search'].model.config.model_type}, {zoo.layers} layers)")
        experts = {
            e: zoo.report_mean(
                parse_recipe({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}}]})
            )
            for e in PROBLEM.experts
        }
        baselines = {label: zoo.report_mean(r) for label, r in baseline_recipes("base", list(PROBLEM.experts), 0)}
        print("| recipe | mean report score |\n|---|---|")
        for label, v in {**experts, **baselines}.items():
            print(f"| {label} | {v:.3f} |")
        best_expert, best_baseline = max(experts.values()), max(baselines.values())
        results = {}
        for optimizer in chosen:
            for multi in (False, True):
                results[optimizer, multi] = [
                    search_run(zoo, optimizer, multi, s, budget_docs) for s in range(args.seeds)
                ]
        print(
            "\n| search | best mean report score | final hypervolume | documents to 95% of own final | "
            "documents to the full-evaluation median | candidates (full) |\n|---|---|---|---|---|---|"
        )
        for (optimizer, multi), runs in results.items():
            med = lambda key, runs=runs: statistics.median(r[key] for r in runs)  # noqa: E731
            own = [documents_to(r["curve"], 0.95 * r["hypervolume"]) for r in runs]
            target = statistics.median(r["hypervolume"] for r in results[optimizer, False])
            reach = [documents_to(r["curve"], target) for r in runs]
            reach_s = statistics.median(d if d is not None else float("inf") for d in reach)
            reach_text = (
                f"{reach_s:.0f} ({reach_s / budget_docs:.2f} of budget)" if reach_s != float("inf") else "not reached"
            )
            print(
                f"| {optimizer}{' + multi-fidelity' if multi else ''} | {med('best_report_mean'):.3f} "
                f"({', '.join(f'{r[KEY]:.3f}' for r in runs)}) | {med('hypervolume'):.4f} | "
                f"{statistics.median(own):.0f} | {reach_text if multi else '-'} | "
                f"{med('candidates'):.0f} ({med('full'):.0f}) |"
            )
        best_search = max(statistics.median(r["best_report_mean"] for r in runs) for runs in results.values())
        verdict = "beats both" if best_search > max(best_expert, best_baseline) else "does NOT beat both"
        print(
            f"\nbest expert {best_expert:.3f}, best hand baseline {best_baseline:.3f}, best search (median) "
            f"{best_search:.3f}: {verdict}"
        )
        print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
