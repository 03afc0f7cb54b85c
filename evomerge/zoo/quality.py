"""Does the zoo demonstrate merging? Score every model, and task-arithmetic merges of expert pairs.

The two properties the product is demonstrated on:
1. each expert beats the base on its own skill by at least ``margin``;
2. a task-arithmetic merge (lambda = 1) of two experts scores above each of the two experts on the
   mean of the two skills: required of at least one pair; every pair is scored and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from evomerge.evaluate.lmeval import TaskSuite, wrap_model
from evomerge.merge.apply import ResidentMerge
from evomerge.recipe import parse_recipe
from evomerge.zoo.build import load_manifest
from evomerge.zoo.skills import SKILLS
from evomerge.zoo.tasks import task_name


@dataclass
class ZooReport:
    skills: list[str]
    #: model or merge name -> skill -> score on the split (0..1).
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: Expert pairs whose merge beats both experts on the mean of the two skills.
    winning_pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        width = max(len(n) for n in self.scores) + 2
        head = "model".ljust(width) + "".join(s.rjust(8) for s in self.skills)
        rows = [head, "-" * len(head)]
        for name, row in self.scores.items():
            rows.append(name.ljust(width) + "".join(f"{row[s]:8.3f}" for s in self.skills))
        return "\n".join(rows)


def _mean(row: dict[str, float], keys: tuple[str, ...]) -> float:
    return sum(row[k] for k in keys) / len(keys)


def evaluate_zoo(
    zoo_dir: str | Path,
    tasks_dir: str | Path,
    split: str = "search",
    limit: int | None = None,
    merge_weight: float = 1.0,
    batch_size: int = 64,
) -> ZooReport:
    """Score base, experts and every expert pair's task-arithmetic merge on ``split``."""
    zoo_dir, tasks_dir = Path(zoo_dir), Path(tasks_dir)
    manifest = load_manifest(zoo_dir)
    if manifest is None:
        raise FileNotFoundError(f"{zoo_dir}: no zoo manifest (build it with `evomerge zoo build`)")
    experts = {m["skill"]: m for m in manifest["models"] if m["role"] == "expert"}
    skill_names = list(experts)
    suite = TaskSuite([tasks_dir / f"{task_name(s, split)}.yaml" for s in skill_names], limit=limit)
    model, lm, states = _load_zoo(zoo_dir, experts, batch_size)
    report = ZooReport(skills=skill_names)

    def score(name: str) -> None:
        by_task = suite.scores(lm)
        report.scores[name] = {s: by_task[task_name(s, split)] for s in skill_names}

    _score_models(model, states, skill_names, merge_weight, score)
    _judge(report)
    return report


def _load_zoo(zoo_dir: Path, experts: dict[str, dict], batch_size: int):
    """The base model (eval mode), lm-eval's wrapper around it (``batch_size`` requests a batch), and
    the state dicts to score: ``"base"`` (a copy of the model's) and each expert's by skill
    (``experts``: skill -> manifest entry)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = zoo_dir / "base"
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, use_safetensors=True).eval()
    lm = wrap_model(model, tokenizer, batch_size=batch_size)
    states = {"base": {k: v.clone() for k, v in model.state_dict().items()}}
    for skill, entry in experts.items():
        states[skill] = load_file(zoo_dir / entry["path"] / "model.safetensors")
    return model, lm, states


def _score_models(model, states: dict, skill_names: list[str], merge_weight: float, score) -> None:
    """``score(name)`` with ``model`` holding the base, each expert, then each pair's task-arithmetic
    merge (``merge_weight`` per expert); the model holds the base again at the end."""
    model.load_state_dict(states["base"])
    score("base")
    for skill in skill_names:
        model.load_state_dict(states[skill], strict=False)
        score(f"expert-{skill}")
    resident = ResidentMerge(model, states["base"], {s: states[s] for s in skill_names})
    for a, b in combinations(skill_names, 2):
        resident.materialize(
            parse_recipe(
                {
                    "merge_method": "task_arithmetic",
                    "base_model": "base",
                    "models": [{"model": s, "parameters": {"weight": merge_weight}} for s in (a, b)],
                }
            )
        )
        score(f"merge({a}+{b})")
    resident.restore_base()


def _judge(report: ZooReport) -> None:
    """Record in ``report`` the experts that do not beat the base by their skill's ``min_gain``, the
    pairs whose merge beats both experts on the mean of their skills, and a failure if none does."""
    skill_names = report.skills
    base_row = report.scores["base"]
    for skill in skill_names:
        gain = report.scores[f"expert-{skill}"][skill] - base_row[skill]
        if gain < SKILLS[skill].min_gain:
            report.failures.append(f"expert-{skill} beats the base on {skill} by only {gain:+.3f}")
    for a, b in combinations(skill_names, 2):
        merged = _mean(report.scores[f"merge({a}+{b})"], (a, b))
        if all(merged > _mean(report.scores[f"expert-{e}"], (a, b)) for e in (a, b)):
            report.winning_pairs.append((a, b))
    if len(skill_names) > 1 and not report.winning_pairs:
        report.failures.append("no pair of experts merges into a model that beats both on their mean")
