"""A campaign whose experts are LoRA adapters of the zoo's base: checked before compute (one line,
exit 2, nothing written), run on Ray workers (factors resident, the base shared), exported as a
full model."""

import json
import shutil
from pathlib import Path

import pytest
from test_campaign import cli, experiment, tells

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(zoo, tmp_path_factory):
    """Two adapters of the zoo's base (random factors, small scaling): every linear module, and
    attention only with rsLoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    configs = {
        "lora-all": LoraConfig(r=4, lora_alpha=0.05, target_modules="all-linear", init_lora_weights=False),
        "lora-attn": LoraConfig(r=2, lora_alpha=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "lora-mlp": LoraConfig(r=2, lora_alpha=0.05, target_modules=["up_proj", "down_proj"], init_lora_weights=False),
    }
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(zoo / "base"), config)
        if name == "lora-attn":  # default init leaves B zero: give it a delta
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.5)
        model.save_pretrained(root / name)
    return root


def test_a_campaign_over_lora_experts_runs_and_exports_a_full_model(zoo, adapters, tmp_path):
    models = {
        "base": str(zoo / "base"),
        "expert-add": str(adapters / "lora-all"),
        "expert-sort": str(zoo / "expert-sort"),
    }
    path = experiment(tmp_path, zoo, models=models, budget={"max_evaluations": 6})
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(tells(tmp_path / "campaign")) >= 6
    failed = [
        e
        for e in map(json.loads, (tmp_path / "campaign" / "journal.jsonl").read_text().splitlines())
        if e["event"] == "tell" and e.get("status") == "failed"
    ]
    assert not failed, failed[0]
    out = tmp_path / "export"
    result = cli("export", tmp_path / "campaign", "--best", "--out", out, "--no-eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    recipe = (out / "mergekit_config.yml").read_text()
    assert str(adapters / "lora-all") in recipe  # the adapter, as the experiment named it

    # --as-adapter: a pick that merges a full checkpoint is refused in one line, nothing written
    refused = cli("export", tmp_path / "campaign", "--best", "--out", tmp_path / "x", "--as-adapter", cwd=tmp_path)
    assert refused.returncode == 2 and "is a full checkpoint" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()
    # a task-arithmetic recipe over the LoRA expert: the full model and, beside it, the same merge as
    # one adapter that peft loads onto the base
    import copy

    from transformers import AutoModelForCausalLM

    from evomerge.campaign import open_campaign
    from evomerge.export import export
    from evomerge.recipe import parse_recipe

    loaded = open_campaign(tmp_path / "campaign", check=False)
    trial = copy.copy(loaded.search().finished[0])
    trial.recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "expert-add", "parameters": {"weight": 0.7}}],
        }
    )
    record = export(loaded, trial, tmp_path / "ta", evaluate=False, progress=False, as_adapter=True)
    loaded.release()
    assert record["adapter"] == "adapter" and json.loads((tmp_path / "ta" / "evomerge.json").read_text())["adapter"]
    merged = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(zoo / "base"), tmp_path / "ta" / "adapter"
    )
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "ta").state_dict()
    for name, value in merged.merge_and_unload().state_dict().items():
        assert (value - expected[name]).abs().max() <= 1e-5, name


BAD = {
    "another base": ({"base_model_name_or_path": "other-org/other-base"}, None, "an adapter of another base"),
    "missing module": (None, ("layers.1.mlp.up_proj", "layers.1.mlp.upper_proj"), "target module 'model.layers.1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_adapter_fails_the_campaign_in_one_line_before_any_compute(zoo, adapters, tmp_path, case):
    from test_lora import edited_adapter

    config, rename, message = BAD[case]
    bad = edited_adapter(adapters / "lora-all", tmp_path / "bad", config, rename)
    models = {"base": str(zoo / "base"), "expert-add": str(bad), "expert-sort": str(zoo / "expert-sort")}
    path = experiment(tmp_path, zoo, models=models)
    result = cli("run", path, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"evomerge: error: {path}: models.expert-add: "), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "campaign").exists()
    shutil.rmtree(bad)


def test_the_shipped_lora_experiment_is_valid(zoo, adapters):
    """experiments/lora_experts.yaml, its zoo adapters (``zoo build --lora``) replaced by this test's."""
    from conftest import REPO

    from evomerge.experiment import check_experiment, load_experiment

    path = REPO / "experiments" / "lora_experts.yaml"
    exp = load_experiment(path)
    mine = dict(zip(("lora-add", "lora-rev", "lora-sort"), ("lora-all", "lora-attn", "lora-mlp")))
    models = {n: str(adapters / mine[Path(r).name]) if Path(r).name in mine else r for n, r in exp.models.items()}
    models["base"] = str(zoo / "base")
    checked = check_experiment(exp.model_copy(update={"models": models}), path, check_tracking=False)
    assert checked.num_layers == 4 and checked.layer_counts["expert-add"] == 4
