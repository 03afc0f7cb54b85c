"""LoRA (PEFT) adapters as experts: a merge over adapters equals the same merge over the adapters
merged into full checkpoints by peft's own ``merge_and_unload``, in memory and on disk, for every
kind of method; what cannot be an expert is refused in one line before compute."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge.apply import ResidentMerge
from evomerge.merge.lowrank import LowRankDelta, load_factors
from evomerge.merge.memory import MemoryPolicy
from evomerge.merge.ondisk import merge_to_disk
from evomerge.merge.registry import MergeError
from evomerge.models.lora import AdapterError, check_adapter
from evomerge.models.tensors import tensor_specs
from evomerge.recipe import parse_recipe

peft = pytest.importorskip("peft")

#: float32 everywhere: a full expert's task vector is (W + BA s) - W, exact to float32 rounding of W
ATOL = 2e-6

#: (name, LoraConfig fields): every module, rsLoRA with a rank pattern, two modules with an alpha pattern
ADAPTERS = {
    "all": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "qv": {
        "r": 3,
        "lora_alpha": 5,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
        "rank_pattern": {"v_proj": 2},
    },
    "mlp": {"r": 2, "lora_alpha": 4, "target_modules": ["up_proj", "down_proj"], "alpha_pattern": {"down_proj": 16}},
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).float()


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    """A random tiny Llama base, three random adapters of it (nonzero B), and each adapter merged into
    a full checkpoint by peft's ``merge_and_unload``."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    tiny_llama().save_pretrained(root / "base")
    for i, (name, fields) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        model = AutoModelForCausalLM.from_pretrained(root / "base")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **fields))
        peft_model.save_pretrained(root / f"lora-{name}")
        base = AutoModelForCausalLM.from_pretrained(root / "base")
        merged = PeftModel.from_pretrained(base, root / f"lora-{name}").merge_and_unload()
        merged.save_pretrained(root / f"full-{name}")
    return root


def recipe(method: str, root: Path, kind: str, parameters: dict, per_model: dict, names=("all", "qv", "mlp")):
    return parse_recipe(
        {
            "merge_method": method,
            "base_model": str(root / "base"),
            "models": [{"model": str(root / f"{kind}-{n}"), "parameters": per_model} for n in names],
            "parameters": parameters,
            "dtype": "float32",
        }
    )


CASES = [
    ("task_arithmetic", {"lambda": 0.9}, {"weight": 0.7}),
    ("ties", {}, {"weight": 0.6, "density": 0.5}),
    ("dare_ties", {}, {"weight": 0.5, "density": 0.6}),
    ("della", {}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
    ("breadcrumbs_ties", {}, {"weight": 0.5, "density": 0.6, "gamma": 0.05}),
    ("pcb", {}, {"weight": 1.0, "density": 0.4}),
    ("consensus_ties", {}, {"weight": 0.8, "density": 0.7}),
    ("linear", {}, {"weight": 0.4}),
    ("model_stock", {}, {}),
    ("slerp", {"t": 0.6}, {}),  # one model: the adapter with a zero delta in most tensors
]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_close(got: dict, want: dict, atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name].float() - want[name].float()).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol}"


def resident(root: Path, kind: str, cache: str) -> ResidentMerge:
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate.candidate import _lora_factors, _Tensors
    from evomerge.merge.io import ModelSource

    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    params = dict(model.named_parameters())
    experts = {}
    for name in ADAPTERS:
        folder = root / f"{kind}-{name}"
        if kind == "lora":
            experts[str(folder)] = _lora_factors(folder, params, str(root / "base"), False)
        else:
            experts[str(folder)] = _Tensors(ModelSource(folder), list(params))
    base = {n: p.detach() for n, p in params.items()}
    policy = MemoryPolicy(cache=cache, task_vector_dtype="float32")
    return ResidentMerge(model, base, experts, base_name=str(root / "base"), memory=policy)


@pytest.mark.parametrize("method,shared,per_model", CASES, ids=[c[0] for c in CASES])
def test_a_merge_over_adapters_equals_it_over_peft_merged_checkpoints(lora_models, tmp_path, method, shared, per_model):
    """On disk and in memory (every statistic cached, or none: the same bits)."""
    names = ("qv",) if method == "slerp" else ("all", "qv", "mlp")
    merge_to_disk(recipe(method, lora_models, "full", shared, per_model, names), tmp_path / "full", progress=False)
    want = weights(tmp_path / "full")
    lora = recipe(method, lora_models, "lora", shared, per_model, names)
    merge_to_disk(lora, tmp_path / "lora", progress=False)
    assert_close(weights(tmp_path / "lora"), want)
    base = weights(lora_models / "base")
    assert any((want[n] - base[n]).abs().max() > 1e-3 for n in base), "the merge moved nothing: the test proves nothing"
    merged = {}
    for cache in ("none", "all"):
        r = resident(lora_models, "lora", cache)
        assert r.materialize(lora).ok
        r.materialize(lora)  # a second candidate reads the statistics the first one kept
        merged[cache] = {n: p.detach().clone() for n, p in r.model.named_parameters()}
        assert_close(merged[cache], want)
    for name, t in merged["none"].items():  # chunked factors and whole-tensor statistics: the same values
        assert torch.equal(t, merged["all"][name]), name


def test_resident_bytes_are_the_factors(lora_models):
    lora, full = resident(lora_models, "lora", "none"), resident(lora_models, "full", "none")
    specs = tensor_specs(str(lora_models / "lora-all"), True)
    factor_bytes = sum(4 * torch.Size(shape).numel() for shape, _ in specs.values())
    assert lora.expert_bytes()[str(lora_models / "lora-all")] == factor_bytes
    dense = full.expert_bytes()[str(lora_models / "full-all")]
    assert dense == 4 * sum(p.numel() for p in full.params.values())
    assert lora.resident_bytes()["task_vectors"] == sum(lora.expert_bytes().values()) < dense


def test_chunks_equal_dense_and_peft_delta(lora_models):
    """Any flat range of a LowRankDelta is the same bits as its dense form, which is peft's delta."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = lora_models / "lora-qv"
    base_model = AutoModelForCausalLM.from_pretrained(lora_models / "base")
    specs = {n: (tuple(p.shape), "F32") for n, p in base_model.named_parameters()}
    adapter = check_adapter(folder, specs, str(lora_models / "base"), lora_models / "base")
    factors = load_factors(adapter, {n: s for n, (s, _) in specs.items()})
    name = "model.layers.1.self_attn.v_proj.weight"
    delta = LowRankDelta(factors[name].a, factors[name].b, factors[name].scaling, factors[name].shape, torch.bfloat16)
    dense = delta.dense()
    out = torch.empty(dense.numel())
    for a, b in [(0, 7), (5, 200), (31, dense.numel())]:
        assert torch.equal(delta.chunk(a, b, out[: b - a]), dense.reshape(-1)[a:b].float())
    peft_model = PeftModel.from_pretrained(base_model, folder)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    want = layer.get_delta_weight("default")
    assert adapter.targets[name].scaling == pytest.approx(5 / 2**0.5)  # rsLoRA, rank 2 from rank_pattern
    assert torch.allclose(factors[name].to("cpu").dense(), want, atol=1e-7)


# --- refused before compute -----------------------------------------------------------------------


def edited_adapter(src: Path, dst: Path, config: dict | None = None, rename: tuple[str, str] | None = None) -> Path:
    shutil.copytree(src, dst)
    if config:
        data = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**data, **config}))
    if rename:
        tensors = load_file(dst / "adapter_model.safetensors")
        save_file({k.replace(*rename): v for k, v in tensors.items()}, dst / "adapter_model.safetensors")
    return dst


REFUSALS = [
    ({"base_model_name_or_path": "some-org/another-base"}, None, "an adapter of another base"),
    (None, ("layers.1.mlp.up_proj", "layers.1.mlp.upper_proj"), "target module 'model.layers.1.mlp.upper_proj'"),
    ({"use_dora": True}, None, "use_dora is set: not supported (DoRA"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save is set: not supported"),
    ({"r": 3}, None, "rank 3 (r / rank_pattern)"),
]


@pytest.mark.parametrize("config,rename,message", REFUSALS, ids=["other-base", "missing-module", "dora", "mts", "rank"])
def test_bad_adapter_is_one_line_exit_2_before_anything_is_written(lora_models, tmp_path, config, rename, message):
    bad = edited_adapter(lora_models / "lora-mlp", tmp_path / "bad", config, rename)
    data = {
        "merge_method": "ties",
        "base_model": str(lora_models / "base"),
        "models": [{"model": str(bad), "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(data))
    with pytest.raises(MergeError, match="adapter|module|not supported|rank"):
        merge_to_disk(parse_recipe(data), tmp_path / "out", progress=False)
    if "another base" not in message and "target module" not in message:
        return  # the command line's exit and line: for the two the issue names
    cli = [sys.executable, "-m", "evomerge", "merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out")]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_relative_base_path_and_hub_id_name_the_base(lora_models, tmp_path):
    """A declared base written relative to the adapter's folder, or as the hub id the base was given
    as, is the base; any other is refused."""
    specs = {n: (s, d) for n, (s, d) in tensor_specs(str(lora_models / "base"), True).items()}
    folder = edited_adapter(lora_models / "lora-all", lora_models / "rel", {"base_model_name_or_path": "../base"})
    assert check_adapter(folder, specs, str(lora_models / "base"), lora_models / "base").targets
    hub = edited_adapter(lora_models / "lora-all", tmp_path / "hub", {"base_model_name_or_path": "org/base"})
    assert check_adapter(hub, specs, "org/base", lora_models / "base").targets
    with pytest.raises(AdapterError, match="another base"):
        check_adapter(hub, specs, str(lora_models / "base"), lora_models / "base")


# --- a merge of LoRA experts written as a LoRA adapter ---------------------------------------------


@pytest.mark.parametrize(
    "method,shared,per_model",
    [("task_arithmetic", {"lambda": 0.8}, {"weight": [0.3, 1.0]}), ("linear", {}, {"weight": 0.5})],
    ids=["task_arithmetic", "linear"],
)
def test_adapter_export_loads_in_peft_and_equals_the_full_merge(lora_models, tmp_path, method, shared, per_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from evomerge.merge.adapter import write_adapter

    lora = recipe(method, lora_models, "lora", shared, per_model)
    merge_to_disk(lora, tmp_path / "full", progress=False)
    write_adapter(lora, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 3  # the ranks concatenated: q_proj's, from "all" and "qv"
    assert set(config["rank_pattern"].values()) == {4, 4 + 2}  # k, o, gate: "all" alone; v, up, down: two
    base = AutoModelForCausalLM.from_pretrained(lora_models / "base")
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    got = {n: p.detach() for n, p in merged.state_dict().items()}
    assert_close(got, weights(tmp_path / "full"), atol=1e-5)


def test_adapter_export_refuses_a_merge_that_is_not_low_rank(lora_models, tmp_path):
    from evomerge.merge.adapter import write_adapter

    ties = recipe("ties", lora_models, "lora", {}, {"weight": 0.5, "density": 0.5})
    with pytest.raises(MergeError, match="ties is not low rank"):
        write_adapter(ties, tmp_path / "adapter")
    mixed = recipe("task_arithmetic", lora_models, "lora", {}, {"weight": 0.5}, names=("all",))
    mixed.models.append(recipe("task_arithmetic", lora_models, "full", {}, {"weight": 0.5}, names=("qv",)).models[0])
    with pytest.raises(MergeError, match="is a full checkpoint"):
        write_adapter(mixed, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_chunks_across_row_blocks_are_the_dense_delta_bit_for_bit():
    """A tensor of several row blocks (about ``chunks.BLOCK`` entries each): ranges that cross a
    block's end read the same bits as the whole tensor, which is B @ A * scaling rounded once."""
    from evomerge.merge.chunks import BLOCK

    gen = torch.Generator().manual_seed(1)
    rows, cols = 2 * BLOCK // 1000 + 7, 1000  # three blocks of 1048 rows, the last one short
    a, b = torch.randn(3, cols, generator=gen), torch.randn(rows, 3, generator=gen)
    delta = LowRankDelta(a, b, 0.5, (rows, cols), torch.bfloat16)
    dense = delta.dense()
    assert torch.allclose(dense.float(), b @ a * 0.5, rtol=2**-8, atol=1e-6)  # bfloat16 rounding
    flat, span = dense.reshape(-1).float(), (BLOCK // cols) * cols
    for lo, hi in [(0, 10), (span - 5, span + 5), (span - 1, 2 * span + 3), (2 * span, rows * cols)]:
        assert torch.equal(delta.chunk(lo, hi, torch.empty(hi - lo)), flat[lo:hi]), (lo, hi)


def test_fan_in_fan_out_adapters_of_a_conv1d_model(tmp_path):
    """GPT-2 stores its linear weights transposed (Conv1D, ``fan_in_fan_out``): the delta is (B A)^T."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "base"
    )
    config = LoraConfig(
        r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config).save_pretrained(tmp_path / "lora-a")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    PeftModel.from_pretrained(base, tmp_path / "lora-a").merge_and_unload().save_pretrained(tmp_path / "full-a")
    for kind in ("lora", "full"):
        data = {
            "merge_method": "task_arithmetic",
            "base_model": str(tmp_path / "base"),
            "models": [{"model": str(tmp_path / f"{kind}-a"), "parameters": {"weight": 0.8}}],
            "dtype": "float32",
        }
        merge_to_disk(parse_recipe(data), tmp_path / f"out-{kind}", progress=False)
    got, want = weights(tmp_path / "out-lora"), weights(tmp_path / "out-full")
    assert_close(got, want)
    name = "transformer.h.1.attn.c_attn.weight"
    assert (got[name] - weights(tmp_path / "base")[name]).abs().max() > 1e-3


def test_an_adapter_named_by_hub_id_is_read_from_the_local_hub_cache(lora_models, tmp_path):
    """The base and an adapter as hub ids, found offline in a Hugging Face cache laid out as
    huggingface_hub writes it; the adapter names its base by hub id. The merge equals the one over
    the local directories."""
    import os

    from test_hub_cache import add_to_cache

    home = tmp_path / "hf-home"
    add_to_cache(home / "hub", "org/tiny-base", lora_models / "base", "1" * 40)
    adapter = edited_adapter(
        lora_models / "lora-qv", tmp_path / "adapter", {"base_model_name_or_path": "org/tiny-base"}
    )
    add_to_cache(home / "hub", "org/tiny-lora", adapter, "2" * 40)
    data = {
        "merge_method": "ties",
        "base_model": "org/tiny-base",
        "models": [{"model": "org/tiny-lora", "parameters": {"weight": 0.9, "density": 0.6}}],
        "dtype": "float32",
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    cli = [sys.executable, "-m", "evomerge", "--offline", "merge", str(tmp_path / "recipe.yaml")]
    result = subprocess.run(
        [*cli, "--out", str(tmp_path / "hub")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HF_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    local = {
        **data,
        "base_model": str(lora_models / "base"),
        "models": [{**data["models"][0], "model": str(lora_models / "lora-qv")}],
    }
    merge_to_disk(parse_recipe(local), tmp_path / "local", progress=False)
    for name, t in weights(tmp_path / "local").items():
        assert torch.equal(weights(tmp_path / "hub")[name], t), name


def test_zoo_build_lora_adds_adapters_and_leaves_the_zoo_as_it_was(tmp_path):
    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.spec import PRESETS

    zoo = tmp_path / "zoo"
    manifest = build_zoo(zoo, PRESETS["micro"])
    before = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file()}
    cli = [sys.executable, "-m", "evomerge", "zoo", "build", "--out", str(zoo), "--preset", "micro", "--lora"]
    result = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = {p.relative_to(zoo): p.read_bytes() for p in zoo.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before  # base, experts, manifest: untouched
    specs = tensor_specs(str(zoo / "base"), True)
    for skill in manifest["spec"]["experts"]:
        adapter = check_adapter(zoo / f"lora-{skill}", specs, str(zoo / "base"), zoo / "base")
        assert len(adapter.targets) == 7 * 2  # every linear module of both layers, the head left out


def test_kinship_of_lora_experts_is_that_of_their_merged_checkpoints(lora_models):
    from evomerge.models.kinship import kinship_of, stream_models

    tables = {}
    for kind in ("lora", "full"):
        dirs = [lora_models / f"{kind}-{n}" for n in ADAPTERS]
        layers, tensors = stream_models(lora_models / "base", dirs)
        tables[kind] = kinship_of(list(ADAPTERS), layers, tensors)
    for got, want in zip(tables["lora"].pairs, tables["full"].pairs):
        assert (got["a"], got["b"]) == (want["a"], want["b"])
        for metric in ("cosine", "pearson", "euclidean"):
            assert got[metric] == pytest.approx(want[metric], rel=1e-4, abs=1e-6), metric
        assert got["sign_conflict"] == pytest.approx(want["sign_conflict"], abs=1e-3)  # signs of float noise
    assert any(abs(p["cosine"]) > 1e-3 for p in tables["lora"].pairs)  # the adapters overlap: not all zero


def test_start_up_memory_plan_counts_a_lora_expert_as_its_factors(lora_models):
    """``plan_bytes`` (the workers' memory check, from headers) predicts what a worker then holds."""
    from evomerge.evaluate.candidate import _lora_factors, _Tensors
    from evomerge.merge.io import ModelSource
    from evomerge.merge.shared import Inputs, plan_bytes

    models = {"base": str(lora_models / "base"), "a": str(lora_models / "lora-all"), "b": str(lora_models / "full-qv")}
    sizes = plan_bytes(Inputs(models, "base", None, MemoryPolicy()))
    r = resident(lora_models, "lora", "none")  # for its model; the experts below are these two
    params = r.params
    experts = {
        "a": _lora_factors(lora_models / "lora-all", params, models["base"], False),
        "b": _Tensors(ModelSource(lora_models / "full-qv"), list(params)),
    }
    merge = ResidentMerge(r.model, {n: p.detach() for n, p in params.items()}, experts, memory=MemoryPolicy())
    held = merge.expert_bytes()
    assert held["a"] < held["b"] / 5
    assert sizes["experts"] == held["a"] + held["b"]
