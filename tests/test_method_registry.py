"""A merge method is one module that registers itself, and merges on disk and in memory like the
built-in methods (that the registry is read without torch: tests/test_architecture.py)."""

import median_merge  # noqa: F401  (registers median_tv)
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.merge.apply import ResidentMerge
from evomerge.merge.ondisk import merge_to_disk
from evomerge.merge.registry import METHODS, MergeError, Method, register
from evomerge.recipe import parse_recipe

EXPERTS = ("expert-add", "expert-rev", "expert-sort")


def test_every_built_in_family_module_registers_its_methods():
    built_in = {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
        "della", "della_linear", "consensus_ta", "consensus_ties", "darex", "pcb", "slerp", "model_stock",
    }  # fmt: skip
    assert set(METHODS) == built_in | {"median_tv"}


def test_a_method_of_its_own_module_merges_on_disk_and_in_memory(zoo, tmp_path):
    recipe = {
        "merge_method": "median_tv",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / e)} for e in EXPERTS],
        "parameters": {"lambda": 0.75},
    }
    merge_to_disk(parse_recipe(recipe), tmp_path / "m", progress=False)
    got = load_file(tmp_path / "m" / "model.safetensors")
    base = load_file(zoo / "base" / "model.safetensors")
    experts = [load_file(zoo / e / "model.safetensors") for e in EXPERTS]
    for name, b in base.items():  # by hand: the median of three is the middle value
        deltas = torch.stack([e[name].float() - b.float() for e in experts])
        expected = b.float() + 0.75 * deltas.sort(dim=0).values[1]
        torch.testing.assert_close(got[name].float(), expected, rtol=0, atol=1e-6)

    model = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True).eval()
    resident = ResidentMerge(model, base, dict(zip(EXPERTS, experts)), base_name="base")
    in_memory = {**recipe, "base_model": "base", "models": [{"model": e} for e in EXPERTS]}
    assert resident.materialize(parse_recipe(in_memory)).ok
    for name, param in resident.model.named_parameters():
        assert torch.equal(param.detach(), got[name]), name


def test_a_second_method_of_the_same_name_is_refused():
    known = METHODS["median_tv"]
    with pytest.raises(MergeError, match="'median_tv' is registered twice"):
        register(Method("median_tv", (), "another", known.kernel, min_models=3))
    assert METHODS["median_tv"] is known
