"""An objective kind added from a module of its own (tests/objective_kind_parameter.py), registered,
read from an evaluator and scored on real candidates by the real CandidateScorer, on the zoo."""

import pytest
from conftest import REPO
from objective_kind_parameter import ParameterMeanKind
from safetensors.torch import load_file

from evomerge.evaluate import kinds
from evomerge.evaluate.candidate import CandidateScorer
from evomerge.evaluate.config import EvaluatorError, parse_evaluator
from evomerge.recipe import parse_recipe

PARAMETER = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def parameter_kind(monkeypatch):
    """The toy kind registered for one test: the registry is a copy, restored after it."""
    monkeypatch.setattr(kinds, "_KINDS", dict(kinds.registered()))
    return kinds.register(ParameterMeanKind)


def task_arithmetic(add: float, sort: float):
    return parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [
                {"model": "expert-add", "parameters": {"weight": add}},
                {"model": "expert-sort", "parameters": {"weight": sort}},
            ],
        }
    )


def hand_mean_abs(zoo, add: float, sort: float) -> float:
    """mean |base + add (expert-add - base) + sort (expert-sort - base)| of PARAMETER, from the files."""
    base, a, s = (
        load_file(zoo / m / "model.safetensors")[PARAMETER].double() for m in ("base", "expert-add", "expert-sort")
    )
    return float((base + add * (a - base) + sort * (s - base)).abs().mean())


def test_a_registered_kind_is_read_and_scored_by_the_candidate_scorer(zoo, parameter_kind):
    ev = parse_evaluator(
        {
            "limit": 5,
            "objectives": [
                {"name": "up", "parameter_mean": PARAMETER},
                {"name": "sort", "task": "zoo/zoo_sort_{split}.yaml"},
            ],
        },
        REPO / "evaluators" / "inline.yaml",
    )
    assert kinds.kind_of(ev.objectives[0]) is ParameterMeanKind and ev.objectives[0].direction == "minimize"
    scorer = CandidateScorer({m: str(zoo / m) for m in ("base", "expert-add", "expert-sort")}, "base", ev)
    for add, sort in ((0.5, 0.3), (1.0, -0.4)):
        score = scorer.score(task_arithmetic(add, sort))
        assert score.status == "done" and list(score.values) == ["up", "sort"]
        assert score.values["up"] == pytest.approx(hand_mean_abs(zoo, add, sort), rel=1e-6)
        assert 0 <= score.values["sort"] <= 1 and score.timings["documents"] == 5
    assert hand_mean_abs(zoo, 0.5, 0.3) != pytest.approx(hand_mean_abs(zoo, 1.0, -0.4), rel=1e-3)  # two candidates
    # the evaluator's own messages name the new kind
    with pytest.raises(EvaluatorError, match="give exactly one of 'task', 'perplexity' or 'parameter_mean'"):
        parse_evaluator({"objectives": [{"name": "a"}]}, "ev.yaml")
    with pytest.raises(EvaluatorError, match="'metric' applies to tasks, not to parameter means"):
        parse_evaluator({"objectives": [{"name": "a", "parameter_mean": PARAMETER, "metric": "acc"}]}, "ev.yaml")


def test_the_package_kinds_come_first_and_the_toy_kind_is_gone_after_its_test():
    assert list(kinds.registered())[:2] == ["task", "perplexity"] and "parameter_mean" not in kinds.registered()


@pytest.mark.parametrize(
    "objective, kind, direction",
    [
        ({"name": "a", "task": "x", "unit": "line"}, "TaskObjective", "maximize"),  # unit: ignored on a task
        ({"name": "a", "task": "x", "direction": None}, "TaskObjective", "maximize"),  # null: the default
        ({"name": "a", "perplexity": "p.txt", "direction": None}, "PerplexityObjective", "minimize"),
        ({"name": "a", "perplexity": "p.txt", "metric": ""}, "PerplexityObjective", "minimize"),
        ({"name": "a", "perplexity": "p.txt", "num_fewshot": None}, "PerplexityObjective", "minimize"),
    ],
)
def test_evaluator_files_read_as_before_kinds_were_modules(objective, kind, direction):
    read = parse_evaluator({"objectives": [objective]}).objectives[0]
    assert (type(read).__name__, read.direction) == (kind, direction)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"metric": "acc"}, "'metric' applies to tasks, not to perplexity"),
        ({"num_fewshot": 0}, "'num_fewshot' applies to tasks, not to perplexity"),
        ({"metric": "acc", "search_docs": 10}, "'metric' and 'search_docs' apply to tasks, not to perplexity"),
    ],
)
def test_a_task_key_on_a_perplexity_objective_is_refused(extra, message):
    with pytest.raises(EvaluatorError, match=message):
        parse_evaluator({"objectives": [{"name": "a", "perplexity": "p.txt", **extra}]})
