"""lm-eval's model and prompt options in evaluator files (``lm_eval:``), on the zoo, whose tokenizer
has a chat template: batch size auto, max_length, chat template, multi-turn few-shot, system
instruction, generation overrides, and ``limit`` as a fraction."""

import math
import random
import shutil

import pytest
import yaml
from conftest import REPO
from test_campaign import cli, experiment

from evomerge.evaluate.candidate import CandidateScorer
from evomerge.evaluate.config import EvaluatorError, load_evaluator, parse_evaluator
from evomerge.evaluate.lmeval import TaskSuite, wrap_model
from evomerge.evaluate.perplexity import PerplexityScorer
from evomerge.models.loading import load_causal_lm
from evomerge.recipe import parse_recipe
from evomerge.zoo.tokenizer import CHAT_TEMPLATE

TASKS = REPO / "evaluators" / "zoo"
ADD, REV, SORT = (f"zoo/zoo_{s}_{{split}}.yaml" for s in ("add", "rev", "sort"))


def scorer(zoo, lm_eval=None, shots=None, **extra):
    objectives = [
        {"name": "rev", "task": REV, "metric": "exact_match", **({"num_fewshot": shots} if shots else {})},
        {"name": "sort", "task": SORT, "metric": "acc"},
    ]
    ev = parse_evaluator(
        {"limit": 8, "seed": 1, "objectives": objectives, "lm_eval": lm_eval or {}, **extra},
        REPO / "evaluators" / "inline.yaml",
    )
    return CandidateScorer({"base": str(zoo / "base"), "expert-rev": str(zoo / "expert-rev")}, "base", ev)


REV_ALONE = parse_recipe(
    {"merge_method": "linear", "base_model": "base", "models": [{"model": "expert-rev", "parameters": {"weight": 1}}]}
)


def prompts(s, task="zoo_rev_search"):
    """lm-eval's full per-sample records (prompt, generation settings, response) of the scorer's own
    suite and model wrapper, with the expert merged in."""
    s.resident.materialize(REV_ALONE)
    return s.suite.evaluate(s.lm, log_samples=True)["samples"][task]


def test_few_shot_examples_are_the_same_for_every_candidate(zoo):
    """lm-eval's few-shot sampler moves on from call to call: without reseeding, each candidate
    would be scored with other solved examples in its prompts."""
    suite = TaskSuite([TASKS / "zoo_rev_search.yaml"], limit=4, subset_seed=0, num_fewshot={"zoo_rev_search": 2})
    model, tok = load_causal_lm(zoo / "base")
    lm = wrap_model(model, tok)
    first, second = (
        [r["arguments"][0][0] for r in suite.evaluate(lm, log_samples=True)["samples"]["zoo_rev_search"]]
        for _ in range(2)
    )
    assert first == second and all(p.count("rev:") == 3 for p in first)


def test_the_zoo_tokenizer_has_a_chat_template_and_a_zero_shot_prompt_renders_as_itself(zoo):
    _, tok = load_causal_lm(zoo / "base")
    assert tok.chat_template == CHAT_TEMPLATE
    turns = [{"role": r, "content": c} for r, c in (("system", "s"), ("user", "q"), ("assistant", "a"))]
    assert tok.apply_chat_template(turns, tokenize=False) == "s\nqa\n"
    plain, chat = scorer(zoo), scorer(zoo, {"apply_chat_template": True})
    assert [r["arguments"][0][0] for r in prompts(chat)] == [r["arguments"][0][0] for r in prompts(plain)]
    assert chat.score(REV_ALONE).values == plain.score(REV_ALONE).values


def test_system_instruction_with_and_without_the_chat_template(zoo):
    plain = [r["arguments"][0][0] for r in prompts(scorer(zoo))]
    with_template = scorer(zoo, {"apply_chat_template": True, "system_instruction": "x"})
    chat = [r["arguments"][0][0] for r in prompts(with_template)]
    bare = [r["arguments"][0][0] for r in prompts(scorer(zoo, {"system_instruction": "x"}))]
    assert chat == ["x\n" + p for p in plain]  # a system turn: the template's "text + newline"
    assert bare == ["x" + p for p in plain]  # lm-eval's plain prefix


def test_few_shot_as_multiturn_uses_the_templates_turns(zoo):
    single = [r["arguments"][0][0] for r in prompts(scorer(zoo, {"apply_chat_template": True}, shots=2))]
    turns = [
        r["arguments"][0][0]
        for r in prompts(scorer(zoo, {"apply_chat_template": True, "fewshot_as_multiturn": True}, shots=2))
    ]
    for one, many in zip(single, turns):
        # one user turn: examples joined by lm-eval's "\n\n"; turns: the template's newline after each answer
        assert one.count("\n\n") == 2 and "\n\n" not in many and many.count("\n") == 2
        assert one.split("\n\n")[-1] == many.split("\n")[-1]  # the same question last
        assert [e.replace("= ", "=") for e in one.split("\n\n")] == many.split("\n")  # the same examples


def test_generation_overrides_reach_generating_tasks_only(zoo):
    default = prompts(scorer(zoo))
    short = prompts(scorer(zoo, {"gen_kwargs": {"max_gen_toks": 1}}))
    assert default[0]["arguments"][0][1]["max_gen_toks"] == 8
    assert all(r["arguments"][0][1]["max_gen_toks"] == 1 for r in short)
    assert all(len(r["resps"][0][0]) <= 1 for r in short)  # one character-level token at most
    assert max(len(r["resps"][0][0]) for r in default) > 1
    assert scorer(zoo, {"gen_kwargs": {"max_gen_toks": 1}}).score(REV_ALONE).values["rev"] == 0.0


def test_batch_size_auto_is_detected_once_and_scores_the_same(zoo):
    fixed = scorer(zoo)
    auto = scorer(zoo, {"batch_size": "auto", "max_batch_size": 16})
    assert auto.lm.batch_size == "auto" and auto.lm.detections == 0  # detected on the first candidate
    assert auto.score(REV_ALONE).values == fixed.score(REV_ALONE).values
    first = auto.lm.detections
    assert first == 2  # generation (full context) and log-likelihood (the longest request): lm-eval's rules
    assert set(auto.lm.batch_found.values()) == {16}  # the ceiling: nothing runs out of memory on a CPU
    auto.score(REV_ALONE)
    assert auto.lm.detections == first  # not detected again for the next candidate


def test_max_length_is_passed_to_the_model_wrapper(zoo):
    assert scorer(zoo).lm.max_length == 64  # the zoo models' context
    assert scorer(zoo, {"max_length": 16}).lm.max_length == 16


def test_limit_as_a_fraction(zoo, tmp_path):
    task = TASKS / "zoo_sort_search.yaml"  # 1,000 documents
    suite = TaskSuite([task], limit=0.02, subset_seed=5)
    assert suite.samples == {"zoo_sort_search": sorted(random.Random("5:zoo_sort_search").sample(range(1000), 20))}
    assert TaskSuite([task], limit=0.001).subset() == {"zoo_sort_search": [0]}  # rounded up, at least one
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}\n" for i in range(30)))
    _, tok = load_causal_lm(zoo / "base")
    assert len(PerplexityScorer(text, tok, limit=0.25, unit="line").ids) == math.ceil(30 * 0.25)
    ev = parse_evaluator({"limit": 0.5, "objectives": [{"name": "a", "task": "x"}]}, "ev.yaml")
    assert ev.limit == 0.5 and parse_evaluator({"limit": 20.0, "objectives": [{"name": "a", "task": "x"}]}).limit == 20


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "lm_eval.batch_size: a number >= 1, or auto"),
        ({"batch_size": "max"}, "lm_eval.batch_size"),
        ({"fewshot_as_multiturn": True}, "fewshot_as_multiturn: needs apply_chat_template"),
        ({"gen_kwargs": {"max_new_tokns": 3}}, "unknown generation setting(s) max_new_tokns"),
        ({"chat_template": True}, "unsupported key 'lm_eval.chat_template'"),
    ],
)
def test_bad_lm_eval_options_name_the_field(tmp_path, options, message):
    path = tmp_path / "ev.yaml"
    path.write_text(yaml.safe_dump({"objectives": [{"name": "a", "task": "x"}], "lm_eval": options}))
    with pytest.raises(EvaluatorError) as e:
        load_evaluator(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_bad_limits_name_the_field(tmp_path):
    for limit in (0, 2.5, -1):
        with pytest.raises(EvaluatorError, match="limit"):
            parse_evaluator({"limit": limit, "objectives": [{"name": "a", "task": "x"}]}, "ev.yaml")


def write_evaluator(tmp_path, lm_eval, tasks=(("add", ADD, "exact_match"), ("sort", SORT, "acc"))):
    path = tmp_path / "lm-evaluator.yaml"  # not test_campaign's evaluator.yaml, which experiment() writes
    objectives = [{"name": n, "task": str(REPO / "evaluators" / t), "metric": m} for n, t, m in tasks]
    path.write_text(yaml.safe_dump({"limit": 8, "objectives": objectives, "lm_eval": lm_eval}))
    return path


def test_a_campaign_refuses_what_its_models_or_tasks_cannot_do(zoo, tmp_path):
    """Before anything runs: a chat template the tokenizer lacks, generation settings for tasks that
    do not generate. One line each, exit 2, no campaign directory."""
    base = tmp_path / "base-no-template"
    shutil.copytree(zoo / "base", base)
    (base / "chat_template.jinja").unlink()
    models = {"base": str(base), "expert-add": str(zoo / "expert-add"), "expert-sort": str(zoo / "expert-sort")}
    ev = write_evaluator(tmp_path, {"apply_chat_template": True})
    path = experiment(tmp_path, zoo, models=models, evaluator=str(ev))
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"evomerge: error: {path}: evaluator: {ev}: lm_eval.apply_chat_template: the tokenizer of {base} has no "
        "chat template"
    ]
    ev = write_evaluator(tmp_path, {"apply_chat_template": "tool_use"})
    result = cli("run", experiment(tmp_path, zoo, evaluator=str(ev)), cwd=tmp_path)
    assert result.returncode == 2 and "has no chat template 'tool_use'; it has: default" in result.stderr
    ev = write_evaluator(tmp_path, {"gen_kwargs": {"max_gen_toks": 4}}, tasks=(("sort", SORT, "acc"),))
    result = cli("run", experiment(tmp_path, zoo, evaluator=str(ev), reference_point=None), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "lm_eval.gen_kwargs: no task of the search split generates text (they are scored by likelihood, "
        "without generation settings)"
    )
    assert not (tmp_path / "campaign").exists()


def test_objectives_carry_their_own_lm_eval_settings(zoo):
    """An objective's settings override the evaluator's for its task: documents, generation settings
    and prompt settings; tasks whose prompt settings differ are scored by separate suites (lm-eval
    takes those per call), the others by one."""
    objectives = [
        {"name": "rev", "task": REV, "metric": "exact_match", "limit": 3, "system_instruction": "x"},
        {"name": "rev-long", "task": REV, "metric": "exact_match", "gen_kwargs": {"max_gen_toks": 1}},
        {"name": "sort", "task": SORT, "metric": "acc"},
        {"name": "add", "task": ADD, "metric": "exact_match"},
    ]
    ev = parse_evaluator(
        {"limit": 8, "seed": 1, "objectives": objectives, "lm_eval": {"gen_kwargs": {"max_gen_toks": 2}}},
        REPO / "evaluators" / "inline.yaml",
    )
    s = CandidateScorer({"base": str(zoo / "base"), "expert-rev": str(zoo / "expert-rev")}, "base", ev)
    kind = s.kinds["task"]
    assert [suite.names for suite, _ in kind.suites] == [["zoo_rev_search"], ["zoo_sort_search", "zoo_add_search"]]
    s.resident.materialize(REV_ALONE)
    rev = kind.suites[0][0].evaluate(s.lm, log_samples=True)["samples"]["zoo_rev_search"]
    rest = kind.suites[1][0].evaluate(s.lm, log_samples=True)["samples"]
    assert len(rev) == 3 and len(rest["zoo_sort_search"]) == 8 and len(rest["zoo_add_search"]) == 8
    assert all(r["arguments"][0][0].startswith("xrev:") for r in rev)  # its system instruction, no one else's
    assert all(r["arguments"][0][0].startswith("add:") for r in rest["zoo_add_search"])
    assert {r["arguments"][0][1]["max_gen_toks"] for r in rev} == {1}  # its own over the evaluator's
    assert {r["arguments"][0][1]["max_gen_toks"] for r in rest["zoo_add_search"]} == {2}  # the evaluator's
    score = s.score(REV_ALONE)
    assert score.values["rev"] == score.values["rev-long"] == 0.0  # one generated character cannot be a reversal
    assert score.timings["documents"] == 3 + 8 + 8


@pytest.mark.parametrize(
    "objectives, field, message",
    [
        (
            [{"name": "a", "task": REV, "num_fewshot": 1}, {"name": "b", "task": REV, "num_fewshot": 2}],
            "objectives[1].num_fewshot",
            "objectives[0] gives task zoo_rev_search another num_fewshot",
        ),
        (
            [{"name": "a", "task": SORT, "gen_kwargs": {"max_gen_toks": 2}}],
            "objectives[0].gen_kwargs",
            "does not generate",
        ),
        ([{"name": "a", "task": REV, "fewshot_as_multiturn": True}], "objectives[0].fewshot_as_multiturn", "needs"),
    ],
)
def test_objective_settings_that_cannot_hold_name_the_field(objectives, field, message):
    ev = parse_evaluator({"objectives": objectives}, REPO / "evaluators" / "inline.yaml")
    with pytest.raises(EvaluatorError) as e:
        ev.check_sources("search")
    assert str(e.value).startswith(f"{REPO / 'evaluators' / 'inline.yaml'}: {field}: ") and message in str(e.value)


def test_an_objectives_unknown_generation_setting_names_the_field():
    with pytest.raises(EvaluatorError) as e:
        parse_evaluator({"objectives": [{"name": "a", "task": REV, "gen_kwargs": {"max_new_tokns": 1}}]}, "ev.yaml")
    assert str(e.value).startswith("ev.yaml: objectives[0].gen_kwargs: unknown generation setting(s) max_new_tokns")
