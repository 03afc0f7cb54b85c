"""lm-eval's own built-in gsm8k and mbpp, offline: the data evomerge writes into a Hugging Face home
(``evomerge zoo builtin``), lm-eval's unchanged task definitions reading it through ``datasets``' and
``evaluate``'s offline cache paths, code execution behind ``confirm_run_unsafe_code``, and the
shipped experiment (``make demo-builtin``) from campaign to export.

Everything that reads the Hugging Face home runs in a subprocess: ``datasets`` and ``evaluate`` fix
their cache folders when first imported."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO
from test_campaign import cli

from evomerge.zoo.builtin import GSM8K_SPLITS, MBPP_SPLITS, gsm8k_rows, mbpp_rows, write_builtin_data


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf")
    write_builtin_data(home)
    return home


def offline_env(home, **extra):
    env = {k: v for k, v in os.environ.items() if k != "HF_ALLOW_CODE_EVAL"}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def test_generated_rows_have_the_real_datasets_formats():
    gsm8k, mbpp = gsm8k_rows(), mbpp_rows()
    assert {s: len(r) for s, r in gsm8k.items()} == GSM8K_SPLITS
    assert {s: len(r) for s, r in mbpp.items()} == MBPP_SPLITS
    questions = [r["question"] for rows in gsm8k.values() for r in rows]
    assert len(set(questions)) == len(questions)  # no few-shot example is also a test question
    for row in [r for rows in gsm8k.values() for r in rows]:
        steps = re.findall(r"<<([0-9+\-* ]+)=(-?\d+)>>", row["answer"])
        assert steps and all(eval(expr) == int(value) for expr, value in steps)  # noqa: S307 -- our own digits
        assert row["answer"].endswith(f"\n#### {steps[-1][1]}")
    names = set()
    for row in [r for rows in mbpp.values() for r in rows]:
        assert len(row["test_list"]) == 3 and row["code"].startswith("def ")
        scope = {}
        exec(row["code"], scope)  # noqa: S102 -- the reference solutions we generate
        for test in row["test_list"]:
            exec(test, scope)  # noqa: S102 -- passes
        names.add(row["code"].split("(")[0])
    assert len(names) == sum(MBPP_SPLITS.values())
    assert gsm8k_rows() == gsm8k and mbpp_rows(seed=1) != mbpp  # deterministic, from the seed


#: Run in a subprocess with the Hugging Face home: lm-eval's own gsm8k and mbpp through evomerge's
#: TaskSuite, answered by a model that writes each document's reference answer, then one that writes
#: wrong ones; the code metric's limits and its refusal; an unconfirmed code task.
SCRIPT = r"""
import json, os
from lm_eval.api.model import LM
from evomerge.evaluate.lmeval import TaskError, TaskSuite

class Answers(LM):
    def __init__(self, right):
        super().__init__()
        self.right = right
    def loglikelihood(self, requests): raise NotImplementedError
    def loglikelihood_rolling(self, requests): raise NotImplementedError
    def generate_until(self, requests):
        out = []
        for r in requests:
            if "code" in r.doc:
                out.append(r.doc["code"] if self.right else "def nothing():\n  return 0")
            else:
                out.append(" " + r.doc["answer"] if self.right else " 7.5 apples")
        return out

found = {}
try:
    TaskSuite(["mbpp"])
except TaskError as e:
    found["unconfirmed"] = str(e)
found["allowed_before"] = os.environ.get("HF_ALLOW_CODE_EVAL")
suite = TaskSuite(["gsm8k", "mbpp"], limit=12, subset_seed=0, confirm_run_unsafe_code={"mbpp"})
found["allowed_after"] = os.environ.get("HF_ALLOW_CODE_EVAL")
found["metrics"] = {k: sorted(v) for k, v in suite.metrics().items()}
for right in (True, False):
    results = suite.evaluate(Answers(right))["results"]
    found[str(right)] = {
        t: {k: float(v) for k, v in r.items() if "," in k and "stderr" not in k} for t, r in results.items()
    }
import evaluate
metric = evaluate.load("code_eval")
loop = metric.compute(predictions=[["while True: pass"]], references=["assert True"], k=[1], timeout=1.0)
found["loop"] = loop[1][0][0][1]["result"]
five = [["x = 1"] * 3 + ["x = 2"] * 2]
found["estimate"] = metric.compute(predictions=five, references=["assert x == 1"], k=[1, 2])[0]
del os.environ["HF_ALLOW_CODE_EVAL"]
try:
    metric.compute(predictions=[["x = 1"]], references=["assert x == 1"], k=[1])
except ValueError as e:
    found["refused"] = str(e)
print("RESULT " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def scored(hf_home):
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=offline_env(hf_home), capture_output=True, text=True, timeout=300
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_lm_eval_scores_its_own_gsm8k_and_mbpp_on_the_generated_data(scored):
    assert scored["metrics"] == {
        "gsm8k": ["exact_match,flexible-extract", "exact_match,strict-match"],
        "mbpp": ["pass_at_1,none"],
    }
    right, wrong = scored["True"], scored["False"]
    assert right == {
        "gsm8k": {"exact_match,strict-match": 1.0, "exact_match,flexible-extract": 1.0},
        "mbpp": {"pass_at_1,none": 1.0},  # every reference program passes its three tests, run
    }
    assert wrong == {
        "gsm8k": {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.0},
        "mbpp": {"pass_at_1,none": 0.0},
    }


def test_code_runs_only_when_confirmed_and_within_limits(scored):
    assert scored["unconfirmed"].startswith("task mbpp runs the programs the model writes (unsafe_code in the")
    assert scored["allowed_before"] is None and scored["allowed_after"] == "1"
    assert scored["loop"] == "timed out"
    assert scored["estimate"] == {"pass@1": pytest.approx(0.6), "pass@2": pytest.approx(1 - 1 / 10)}  # C(2,2)/C(5,2)
    assert scored["refused"].startswith("code_eval runs programs written by a model; set HF_ALLOW_CODE_EVAL=1")


def builtin_experiment(tmp_path, zoo, **changes):
    """The shipped experiment over the test zoo, with a smaller budget and one worker."""
    data = yaml.safe_load((REPO / "experiments" / "builtin_tasks.yaml").read_text())
    data["models"] = {name: str(zoo / name) for name in data["models"]}
    data["search_space"] = str(REPO / "search_spaces" / "two_experts_layer_groups.yaml")
    data["evaluator"] = str(REPO / "evaluators" / "builtin_gsm8k_mbpp.yaml")
    data.update(budget={"max_evaluations": 4}, workers={"count": 1}, output_dir=str(tmp_path / "campaign"), **changes)
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_builtin_campaign_runs_offline_and_exports_disjoint_documents(zoo, tmp_path, hf_home):
    env = offline_env(hf_home)
    run = cli("run", builtin_experiment(tmp_path, zoo), cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    campaign = tmp_path / "campaign"
    export = cli("export", campaign, "--best", "--out", tmp_path / "export", "--quiet", cwd=tmp_path, env=env)
    assert export.returncode == 0, export.stderr[-3000:]
    record = json.loads((tmp_path / "export" / "evomerge.json").read_text())
    docs = record["documents"]
    for task, (search, report) in {"gsm8k": (40, 40), "mbpp": (20, 20)}.items():
        assert (len(docs[task]["search"]), len(docs[task]["report"])) == (search, report)
        assert not set(docs[task]["search"]) & set(docs[task]["report"])
    assert set(record["report_scores"]) == {"gsm8k", "mbpp", "add"}
    assert all(0.0 <= v <= 1.0 for v in record["report_scores"].values())
    # what the search added, on the report documents: here against the better expert alone (the space
    # expresses each exactly; no hand baselines in this experiment), paired on the same documents
    comparison = record["report_comparison"]
    assert comparison["export"]["mean"] == pytest.approx(sum(record["report_scores"].values()) / 3)
    expert = comparison["best_expert"]
    assert expert["label"] in ("expert-add alone", "expert-sort alone") and "best_baseline" not in comparison
    assert expert["difference"] == pytest.approx(comparison["export"]["mean"] - expert["mean"])
    assert export.stdout.strip().splitlines()[-1].startswith("report split, mean over 3 objectives ± standard error:")
    assert json.loads((campaign / "campaign.json").read_text())["documents"]["gsm8k"] == docs["gsm8k"]


def test_a_code_task_without_confirmation_is_refused_before_anything_runs(zoo, tmp_path):
    evaluator = yaml.safe_load((REPO / "evaluators" / "builtin_gsm8k_mbpp.yaml").read_text())
    del evaluator["objectives"][1]["confirm_run_unsafe_code"]
    evaluator["objectives"][2]["task"] = str(REPO / "evaluators" / "zoo" / "zoo_add_{split}.yaml")
    path = tmp_path / "ev.yaml"
    path.write_text(yaml.safe_dump(evaluator))
    run = cli("run", builtin_experiment(tmp_path, zoo, evaluator=str(path)), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"evomerge: error: {tmp_path / 'builtin.yaml'}: evaluator: {path}: objectives[1].confirm_run_unsafe_code: "
        "task mbpp runs the programs the model writes (unsafe_code in its definition); set "
        "confirm_run_unsafe_code: true on the objective to score it"
    ]
    assert not (tmp_path / "campaign").exists()
