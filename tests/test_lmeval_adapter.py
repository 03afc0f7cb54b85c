"""The lm-eval adapter against numbers computed by hand from the model's own forward passes."""

import json
import shutil
import socket

import pytest
import torch
import yaml
from conftest import TASKS_DIR, OutboundConnection

from evomerge.evaluate.lmeval import TaskError, TaskSuite, wrap_model
from evomerge.models.loading import load_causal_lm

LIMIT = 40


@pytest.fixture(scope="module")
def expert(zoo):
    return load_causal_lm(zoo / "expert-sort")


def _rows(task):
    config = yaml.safe_load((TASKS_DIR / f"{task}.yaml").read_text())
    path = TASKS_DIR / config["dataset_kwargs"]["data_files"]["test"]
    return [json.loads(line) for line in path.open()][:LIMIT]


@torch.no_grad()
def _greedy_exact_match(model, tok, rows):
    hits = 0
    for row in rows:
        ids = torch.tensor([tok(row["prompt"])["input_ids"]])
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        hits += text == row["answer"]
    return hits / len(rows)


@torch.no_grad()
def _choice_accuracy(model, tok, rows):
    hits = 0
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            ids = prompt + tok(choice)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids))))
        hits += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return hits / len(rows)


def test_scores_equal_hand_computed_references(expert):
    model, tok = expert
    suite = TaskSuite([TASKS_DIR / "zoo_add_search.yaml", TASKS_DIR / "zoo_sort_search.yaml"], limit=LIMIT)
    scores = suite.scores(wrap_model(model, tok, batch_size=16))
    assert scores["zoo_add_search"] == pytest.approx(_greedy_exact_match(model, tok, _rows("zoo_add_search")))
    assert scores["zoo_sort_search"] == pytest.approx(_choice_accuracy(model, tok, _rows("zoo_sort_search")))
    assert scores["zoo_sort_search"] > 0.5  # the sort expert is far above chance (0.25)


def test_weights_rewritten_in_place_are_seen_by_the_next_evaluation(expert, zoo):
    model, tok = expert
    suite = TaskSuite([TASKS_DIR / "zoo_sort_search.yaml"], limit=LIMIT)
    lm = wrap_model(model, tok, batch_size=16)
    before = suite.scores(lm)["zoo_sort_search"]
    base, _ = load_causal_lm(zoo / "base")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(base.state_dict())
    try:
        assert suite.scores(lm)["zoo_sort_search"] == pytest.approx(
            _choice_accuracy(base, tok, _rows("zoo_sort_search"))
        )
    finally:
        model.load_state_dict(original)
    assert suite.scores(lm)["zoo_sort_search"] == before


def test_global_rng_is_neither_reseeded_nor_consumed(expert):
    """simple_evaluate resets python/numpy/torch RNGs to 0/1234/1234; pycma et al. would repeat."""
    import random

    import numpy as np

    model, tok = expert
    suite = TaskSuite([TASKS_DIR / "zoo_sort_search.yaml", TASKS_DIR / "zoo_add_search.yaml"], limit=8)
    lm = wrap_model(model, tok, batch_size=8)

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    suite.scores(lm)
    after = draws()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert after == draws()


def test_task_file_works_from_any_folder(tmp_path, expert, monkeypatch):
    model, tok = expert
    copy = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR, copy)
    monkeypatch.chdir(tmp_path.parent)  # data paths must resolve against the YAML, not the cwd
    suite = TaskSuite([copy / "zoo_rev_search.yaml"], limit=5)
    assert 0.0 <= suite.scores(wrap_model(model, tok))["zoo_rev_search"] <= 1.0


def test_bad_task_references_fail_clearly(tmp_path):
    with pytest.raises(TaskError, match="task file not found"):
        TaskSuite([tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(TaskError, match="no 'task' field"):
        TaskSuite([bad])
    config = yaml.safe_load((TASKS_DIR / "zoo_add_search.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = "data/nope.jsonl"
    moved = tmp_path / "moved.yaml"
    moved.write_text(yaml.safe_dump(config))
    with pytest.raises(TaskError, match="data file not found"):
        TaskSuite([moved])


def test_the_network_guard_is_active():
    with pytest.raises(OutboundConnection):
        socket.create_connection(("198.51.100.7", 443), timeout=1)


def test_templates_compile_once_and_tokenizations_are_remembered(zoo):
    from lm_eval import utils

    TaskSuite([TASKS_DIR / "zoo_sort_search.yaml"], limit=2)
    assert utils.apply_template("{{a}}+{{b}}=", {"a": 1, "b": 2}) == "1+2="
    assert utils.env.from_string("{{a}}") is utils.env.from_string("{{a}}")  # compiled once
    assert utils.apply_template("{{ x | regex_replace('a', 'b') }}", {"x": "aa"}) == "bb"  # filters kept
    model, tok = load_causal_lm(zoo / "base")
    lm = wrap_model(model, tok)
    first = lm.tok_encode("sort:cba=")
    assert first == tok.encode("sort:cba=") and lm.tok_encode("sort:cba=") == first
    first.append(-1)  # a caller's list is its own
    assert lm.tok_encode("sort:cba=") == tok.encode("sort:cba=")
