import json
import random

import pytest
import yaml
from conftest import TASKS_DIR

from evomerge.zoo import skills
from evomerge.zoo.tasks import task_name, write_task_files


def test_committed_task_files_are_exactly_what_the_generator_writes(tmp_path):
    written = write_task_files(tmp_path)
    assert written
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            committed = TASKS_DIR / path.relative_to(tmp_path)
            assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run `make tasks`"


def test_search_and_report_splits_are_disjoint_and_sized():
    for skill in skills.SKILLS:
        search = [e.prompt for e in skills.eval_examples(skill, "search")]
        report = [e.prompt for e in skills.eval_examples(skill, "report")]
        assert len(search) == len(set(search)) == skills.SPLIT_SIZES["search"]
        assert len(report) == skills.SPLIT_SIZES["report"]
        assert not set(search) & set(report)


def test_training_never_emits_a_held_out_prompt():
    mixture = {s: 1.0 for s in skills.SKILLS} | {f"{s}_easy": 1.0 for s in skills.SKILLS}
    held = set().union(*(skills.heldout_prompts(s) for s in skills.SKILLS))
    drawn = skills.training_examples(random.Random(3), mixture, 20000)
    assert not {e.prompt for e in drawn} & held


def test_answers_are_correct():
    for ex in skills.eval_examples("add", "search")[:50]:
        a, b = ex.prompt[4:-1].split("+")
        assert int(ex.answer) == int(a) + int(b)
    for ex in skills.eval_examples("rev", "search")[:50]:
        assert ex.answer == ex.prompt[4:-1][::-1]
    for ex in skills.eval_examples("sort", "search")[:50]:
        assert ex.answer == "".join(sorted(ex.prompt[5:-1]))


def test_both_lm_eval_styles_are_present_and_multiple_choice_labels_point_at_the_answer():
    styles = set()
    for path in TASKS_DIR.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        styles.add(config["output_type"])
        rows = [json.loads(line) for line in (path.parent / config["dataset_kwargs"]["data_files"]["test"]).open()]
        if config["output_type"] == "multiple_choice":
            for row in rows:
                assert row["choices"][row["label"]] == row["answer"]
                assert len(set(row["choices"])) == len(row["choices"]) == 4
    assert styles == {"generate_until", "multiple_choice"}


def test_unknown_split_or_component_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        skills.eval_examples("add", "train")
    with pytest.raises(ValueError, match="unknown corpus component"):
        skills.training_examples(random.Random(0), {"poetry": 1.0}, 1)


def test_task_names():
    assert task_name("add", "search") == "zoo_add_search"
    assert (TASKS_DIR / "zoo_add_report.yaml").is_file()
