"""Evaluator files, the in-memory candidate scorer and the perplexity objective, on the real zoo."""

import math
import random

import pytest
import torch
from conftest import REPO

from evomerge.evaluate.candidate import CandidateScorer
from evomerge.evaluate.config import SPLITS, EvaluatorError, load_evaluator, parse_evaluator
from evomerge.evaluate.lmeval import HeldOut, TaskSuite, wrap_model
from evomerge.evaluate.perplexity import PerplexityScorer
from evomerge.models.loading import load_causal_lm
from evomerge.recipe import parse_recipe

EVALUATORS = REPO / "evaluators"


def evaluator(tmp_path, objectives, **extra):
    return parse_evaluator({"objectives": objectives, **extra}, EVALUATORS / "inline.yaml")


def models(zoo, names=("expert-add", "expert-sort")):
    return {"base": str(zoo / "base"), **{n: str(zoo / n) for n in names}}


def alone(expert, others=("expert-add", "expert-sort")):
    """A linear recipe equal to one expert exactly (the others at weight 0)."""
    return parse_recipe(
        {
            "merge_method": "linear",
            "base_model": "base",
            "models": [{"model": m, "parameters": {"weight": 1.0 if m == expert else 0.0}} for m in others],
        }
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({}, "missing required field 'objectives'"),
        ({"objectives": [{"name": "a"}]}, "objectives[0]: give exactly one of 'task' or 'perplexity'"),
        ({"objectives": [{"name": "a", "task": "x"}, {"name": "a", "task": "y"}]}, "repeated: a"),
        ({"objectives": [{"name": "a", "task": "x"}], "limit": 0}, "limit: Input should be greater than 0"),
        (
            {"objectives": [{"name": "a", "perplexity": "t.txt", "metric": "acc"}]},
            "'metric' applies to tasks, not to perplexity",
        ),
        ({"objectives": [{"name": "a", "task": "x", "weigth": 2}]}, "unsupported key 'objectives[0].weigth'"),
    ],
)
def test_bad_evaluator_files_name_file_and_field(tmp_path, data, message):
    import yaml

    path = tmp_path / "ev.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvaluatorError) as e:
        load_evaluator(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_split_placeholder_and_missing_files(tmp_path):
    ev = load_evaluator(EVALUATORS / "zoo_three_skills.yaml", check_split="report")
    assert ev.resolve(ev.objectives[0].task, "report") == str(EVALUATORS / "zoo" / "zoo_add_report.yaml")
    assert ev.objectives[3].direction == "minimize" and ev.objectives[0].direction == "maximize"
    assert ev.resolve("hellaswag", "search") == "hellaswag"  # a built-in lm-eval task name stays a name
    (tmp_path / "ev.yaml").write_text("objectives: [{name: a, task: 'gone_{split}.yaml'}]\n")
    with pytest.raises(EvaluatorError, match=r"ev.yaml: objectives\[0\].task: file not found: .*gone_search.yaml"):
        load_evaluator(tmp_path / "ev.yaml", check_split="search")


def test_seeded_subset_is_fixed_and_scores_only_those_documents(zoo):
    task = EVALUATORS / "zoo" / "zoo_sort_search.yaml"
    a = TaskSuite([task], limit=30, subset_seed=5)
    assert a.samples == {"zoo_sort_search": sorted(random.Random("5:zoo_sort_search").sample(range(1000), 30))}
    assert TaskSuite([task], limit=30, subset_seed=5).samples == a.samples
    assert TaskSuite([task], limit=30, subset_seed=6).samples != a.samples
    model, tok = load_causal_lm(zoo / "expert-sort")
    out = a.evaluate(wrap_model(model, tok), log_samples=True)
    records = out["samples"]["zoo_sort_search"]
    assert sorted(r["doc_id"] for r in records) == a.samples["zoo_sort_search"]
    assert out["results"]["zoo_sort_search"]["acc,none"] == pytest.approx(sum(r["acc"] for r in records) / 30)


def test_few_shot_examples_are_set_per_task(zoo):
    suite = TaskSuite(
        [EVALUATORS / "zoo" / "zoo_rev_search.yaml"], limit=3, subset_seed=0, num_fewshot={"zoo_rev_search": 2}
    )
    model, tok = load_causal_lm(zoo / "base")
    records = suite.evaluate(wrap_model(model, tok), log_samples=True)["samples"]["zoo_rev_search"]
    prompt = records[0]["arguments"][0][0]
    assert prompt.count("rev:") == 3 and prompt.count("\n\n") == 2  # two solved examples, then the question


def test_scorer_equals_scoring_the_expert_loaded_from_disk(zoo):
    ev = parse_evaluator(
        {
            "limit": 40,
            "seed": 3,
            "objectives": [
                {"name": "add", "task": "zoo/zoo_add_{split}.yaml", "metric": "exact_match"},
                {"name": "sort", "task": "zoo/zoo_sort_{split}.yaml"},
                {"name": "sort_again", "task": "zoo/zoo_sort_{split}.yaml", "metric": "acc"},
            ],
        },
        EVALUATORS / "inline.yaml",
    )
    scorer = CandidateScorer(models(zoo), "base", ev)
    assert len(scorer.suite.names) == 2  # one task read for two objectives
    suite = TaskSuite([EVALUATORS / "zoo" / f"zoo_{s}_search.yaml" for s in ("add", "sort")], limit=40, subset_seed=3)
    for expert in ("expert-add", "expert-sort"):
        model, tok = load_causal_lm(zoo / expert)
        results = suite.evaluate(wrap_model(model, tok))["results"]
        score = scorer.score(alone(expert))
        assert score.status == "done" and list(score.values) == ["add", "sort", "sort_again"]
        assert score.values == {
            "add": results["zoo_add_search"]["exact_match,none"],
            "sort": results["zoo_sort_search"]["acc,none"],
            "sort_again": results["zoo_sort_search"]["acc,none"],
        }
        assert set(score.timings) == {"materialize", "evaluate", "forward", "total", "documents"}
        assert score.timings["documents"] == 2 * 40  # two tasks, 40 documents each
        assert 0 < score.timings["forward"] < score.timings["evaluate"]
    # the report split is a different, held-out set of documents
    report = CandidateScorer(models(zoo), "base", ev, split="report")
    assert report.suite.names == ["zoo_add_report", "zoo_sort_report"]


def hand_perplexity(model, sequences):
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("unit", ["line", "block"])
def test_perplexity_equals_the_hand_computed_value(zoo, tmp_path, unit):
    model, tok = load_causal_lm(zoo / "base")
    text = tmp_path / "t.txt"
    text.write_text("copy:12=12\nnext:3=4 5\nab cd\n\nsort:cba=abc\n")
    lines = [
        tok(line, add_special_tokens=False)["input_ids"]
        for line in text.read_text().splitlines(keepends=True)
        if line.strip()
    ]
    if unit == "line":
        expected = hand_perplexity(model, lines)
    else:
        flat = [t for line in lines for t in line]
        expected = hand_perplexity(model, [flat[i : i + 8] for i in range(0, len(flat) - 7, 8)])
    scorer = PerplexityScorer(text, tok, block_size=8, unit=unit, batch_size=2)
    assert scorer.score(model) == pytest.approx(expected, rel=1e-5)
    some = PerplexityScorer(text, tok, block_size=8, unit=unit, limit=2, seed=1)
    assert len(some.ids) == 2


def test_broken_candidates_fail_with_a_reason_and_the_scorer_goes_on(zoo):
    ev = parse_evaluator(
        {
            "limit": 10,
            "objectives": [
                {"name": "sort", "task": "zoo/zoo_sort_{split}.yaml"},
                {"name": "ppl", "perplexity": "zoo/data/general_{split}.txt", "unit": "line"},
            ],
        },
        EVALUATORS / "inline.yaml",
    )
    scorer = CandidateScorer(models(zoo), "base", ev)
    huge = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [
                {"model": "expert-add", "parameters": {"weight": 1e38}},
                {"model": "expert-sort", "parameters": {"weight": 1e38}},
            ],
        }
    )
    failed = scorer.score(huge)
    assert failed.status == "failed" and failed.values is None
    assert failed.reason.startswith(("non-finite weights", "non-finite logits"))
    unknown = parse_recipe({"merge_method": "linear", "models": [{"model": "expert-rev", "parameters": {"weight": 1}}]})
    assert scorer.score(unknown).reason.startswith(
        "merge failed: MergeError: recipe model 'expert-rev' is not resident"
    )
    good = scorer.score(alone("expert-sort"))
    assert good.status == "done" and good.values["ppl"] > 1 and 0 <= good.values["sort"] <= 1
    # an evaluation that raises (here: a metric the task does not report) fails only that candidate
    bad = CandidateScorer(
        models(zoo),
        "base",
        parse_evaluator(
            {"limit": 5, "objectives": [{"name": "s", "task": "zoo/zoo_sort_{split}.yaml", "metric": "bleu"}]},
            EVALUATORS / "inline.yaml",
        ),
    )
    result = bad.score(alone("expert-sort"))
    assert result.status == "failed" and "evaluation raised TaskError" in result.reason and "'bleu'" in result.reason


def test_per_sample_records_on_request(zoo):
    ev = parse_evaluator(
        {"limit": 6, "objectives": [{"name": "add", "task": "zoo/zoo_add_{split}.yaml"}]}, EVALUATORS / "inline.yaml"
    )
    scorer = CandidateScorer(models(zoo), "base", ev)
    assert scorer.score(alone("expert-add")).samples is None
    score = scorer.score(alone("expert-add"), log_samples=True)
    records = score.samples["zoo_add_search"]
    assert len(records) == 6 and set(records[0]) >= {"doc_id", "target", "response", "exact_match"}
    assert sum(r["exact_match"] for r in records) / 6 == score.values["add"]


TWO_FILTERS = """task: add_two_filters
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: '{{{{prompt}}}}'
doc_to_target: '{{{{answer}}}}'
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: whole
    filter:
      - function: take_first
  - name: first-digit
    filter:
      - function: regex
        regex_pattern: "(\\\\d)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_metrics_are_named_as_lm_eval_names_them_with_their_filter(zoo, tmp_path):
    """A metric reported under two filters: its bare name is refused before compute with the two
    keys to choose from; each key scores as lm-eval's own results say."""
    task = tmp_path / "add_two_filters.yaml"
    task.write_text(TWO_FILTERS.format(data=EVALUATORS / "zoo" / "data" / "add_search.jsonl"))
    bare = evaluator(tmp_path, [{"name": "add", "task": str(task), "metric": "exact_match"}], limit=12)
    with pytest.raises(EvaluatorError, match="'exact_match' under several filters; name one: "):
        bare.check_sources("search")
    both = evaluator(
        tmp_path,
        [
            {"name": "whole", "task": str(task), "metric": "exact_match,whole"},
            {"name": "digit", "task": str(task), "metric": "exact_match,first-digit"},
        ],
        limit=12,
    )
    both.check_sources("search")
    scored = CandidateScorer({"expert-add": str(zoo / "expert-add")}, "expert-add", both).score(
        parse_recipe({"merge_method": "linear", "models": [{"model": "expert-add", "parameters": {"weight": 1.0}}]})
    )
    assert scored.status == "done", scored.reason
    model, tokenizer = load_causal_lm(zoo / "expert-add")
    # the scorer's documents: one file for both splits, so the search's held-out share
    held = {"add_two_filters": HeldOut(12, 12)}
    suite = TaskSuite([str(task)], limit=12, subset_seed=both.seed, fewshot_seed=both.seed, held_out=held)
    reference = suite.evaluate(wrap_model(model, tokenizer))["results"]["add_two_filters"]
    assert scored.values == {"whole": reference["exact_match,whole"], "digit": reference["exact_match,first-digit"]}
    assert reference["exact_match,whole"] != reference["exact_match,first-digit"]  # the filters differ here


def test_a_task_without_a_report_file_holds_its_report_documents_out(zoo, tmp_path):
    """One task file for both splits: search and report score disjoint seeded subsets of its
    documents, of the sizes asked for; sizes beyond the task are refused before compute."""
    task = str(EVALUATORS / "zoo" / "zoo_add_search.yaml")  # 1,000 documents, no {split}
    objectives = [{"name": "add", "task": task, "search_docs": 20, "report_docs": 0.15}]
    ev = evaluator(tmp_path, objectives, limit=50)
    ev.check_sources("search")
    scorers = {s: CandidateScorer(models(zoo), "base", ev, split=s) for s in ("search", "report")}
    docs = {s: scorer.documents()["zoo_add_search"] for s, scorer in scorers.items()}
    assert docs["search"] == docs["report"]  # each scorer knows both splits, the same way
    search, report = docs["search"]["search"], docs["search"]["report"]
    assert (len(search), len(report)) == (20, 150) and not set(search) & set(report)
    for s, scorer in scorers.items():  # and scores its own
        assert scorer.kinds["task"].suite.subset(None)["zoo_add_search"] == docs[s][s]
        assert scorer.score(alone("expert-add")).timings["documents"] == len(docs[s][s])
    again = CandidateScorer(models(zoo), "base", evaluator(tmp_path, objectives, limit=50, seed=ev.seed))
    assert again.documents()["zoo_add_search"] == docs["search"]  # seeded: the same split every time

    too_many = evaluator(tmp_path, [{**objectives[0], "search_docs": 600, "report_docs": 500}])
    with pytest.raises(
        EvaluatorError, match=r"task zoo_add_search has 1000 documents: search_docs \(600\) and report_docs \(500\)"
    ):
        too_many.check_sources("search")


def test_generation_batches_are_sized_at_the_requests_length_not_the_context(zoo):
    """batch_size auto for a generating task probes batches as long as its longest prompt plus the
    tokens it may generate, not the model's whole context (64 tokens for the zoo)."""
    model, tokenizer = load_causal_lm(zoo / "expert-add")
    lm = wrap_model(model, tokenizer, batch_size="auto", max_batch_size=4)
    probes = []
    call = lm._model_call
    lm._model_call = lambda inps, *a, **kw: (probes.append(tuple(inps.shape)), call(inps, *a, **kw))[1]
    suite = TaskSuite([str(EVALUATORS / "zoo" / "zoo_add_search.yaml")], limit=6, subset_seed=0)
    suite.evaluate(lm)
    prompts = [doc["prompt"] for doc in suite.task_dict["zoo_add_search"].eval_docs]
    longest = max(len(lm.tok_encode(p)) for p in prompts[:200])
    assert lm.detections == 1 and lm.generation_length <= longest + 8  # max_gen_toks: 8
    assert probes[0] == (4, lm.generation_length) and lm.generation_length < lm.max_length == 64


def test_an_out_of_memory_error_halves_the_batch_and_the_candidate_is_scored(zoo, tmp_path):
    """Out-of-memory errors injected for batches over 2 rows: the batch goes 8 -> 4 -> 2, recorded,
    and the candidate scores as one scored at batch 2 from the start."""
    objectives = [{"name": "add", "task": "zoo/zoo_add_{split}.yaml"}]
    scorer = CandidateScorer(models(zoo), "base", evaluator(tmp_path, objectives, limit=8, batch_size=8))
    forward = scorer.model.forward

    def tight(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(*args, **kwargs)

    scorer.model.forward = tight
    halved = scorer.score(alone("expert-add"))
    assert halved.status == "done", halved.reason
    assert halved.timings["batch_halvings"] == 2 and scorer.kinds["task"].lm.batch_size == 2
    assert "batch_halvings" not in scorer.score(alone("expert-add")).timings  # kept for later candidates
    reference = CandidateScorer(models(zoo), "base", evaluator(tmp_path, objectives, limit=8, batch_size=2))
    assert halved.values == reference.score(alone("expert-add")).values


def test_report_limit_sets_the_report_splits_documents(zoo, tmp_path):
    """``report_limit`` scores that many documents per task on the report split (``all``: every one),
    the search split keeps ``limit``; bad values are refused naming the field."""
    objectives = [{"name": "add", "task": "zoo/zoo_add_{split}.yaml", "limit": 7}]
    ev = evaluator(tmp_path, objectives, limit=10, report_limit=25)
    assert (ev.limit_for("search"), ev.limit_for("report")) == (10, 25)
    assert evaluator(tmp_path, objectives, limit=10, report_limit="all").limit_for("report") is None
    assert evaluator(tmp_path, objectives, limit=10).limit_for("report") == 10  # default: as on the search split
    scored = {
        split: CandidateScorer(models(zoo), "base", ev, split=split).score(alone("expert-add")) for split in SPLITS
    }
    # the objective's own limit holds on the search split; report_limit replaces it on the report split
    assert {s: r.timings["documents"] for s, r in scored.items()} == {"search": 7, "report": 25}
    assert len(scored["report"].per_document["add"]["zoo_add_report"][0]) == 25
    for bad in (0, 2.5, "some"):
        with pytest.raises(EvaluatorError, match="report_limit"):
            evaluator(tmp_path, objectives, report_limit=bad)
