"""`evomerge merge` on the zoo: against mergekit-yaml, against the in-memory path, and its failures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evomerge.merge.apply import ResidentMerge
from evomerge.merge.checkpoint import RECIPE_FILE
from evomerge.merge.ondisk import merge_to_disk
from evomerge.merge.registry import MergeError
from evomerge.recipe import parse_recipe

MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ties_recipe(zoo, **extra):
    return {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [
            {
                "model": str(zoo / "expert-add"),
                "parameters": {
                    "weight": [0.2, 0.8, 1.0],
                    "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}],
                },
            },
            {"model": str(zoo / "expert-sort"), "parameters": {"weight": 0.6, "density": 0.5}},
        ],
        "parameters": {"lambda": 1.2},
        "dtype": "float32",
        **extra,
    }


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, timeout=300)


def run_mergekit(config: Path, out: Path):
    result = subprocess.run([str(MERGEKIT_YAML), str(config), str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


needs_mergekit = pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="mergekit (test extra) not installed")


@needs_mergekit
def test_ties_with_gradients_and_filters_is_bit_identical_to_mergekit_both_ways(zoo, tmp_path):
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(ties_recipe(zoo)))
    result = run_cli("merge", str(config), "--out", str(tmp_path / "ours"), "--quiet")
    assert result.returncode == 0, result.stderr
    run_mergekit(config, tmp_path / "theirs")
    ours, theirs = weights(tmp_path / "ours"), weights(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # The recipe we wrote next to the weights runs unchanged with mergekit and gives the same model.
    run_mergekit(tmp_path / "ours" / RECIPE_FILE, tmp_path / "again")
    again = weights(tmp_path / "again")
    for name in ours:
        assert torch.equal(ours[name], again[name]), name


@needs_mergekit
def test_slices_with_per_slice_parameters_match_mergekit(zoo, tmp_path):
    def src(model, lo, hi, **params):
        entry = {"model": str(zoo / model), "layer_range": [lo, hi]}
        if params:
            entry["parameters"] = params
        return entry

    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    src("base", 0, 2),
                    src("expert-add", 0, 2, weight=[0.3, 0.9]),
                    src("expert-rev", 0, 2, weight=0.5),
                ]
            },
            {
                "sources": [
                    src("base", 2, 4),
                    src("expert-add", 2, 4, weight=0.2),
                    src("expert-rev", 2, 4, weight=[1.0, 0.0]),
                ]
            },
        ],
    }
    path = tmp_path / "slices.yml"
    path.write_text(yaml.safe_dump(config))
    merge_to_disk(parse_recipe(config), tmp_path / "ours", progress=False)
    run_mergekit(path, tmp_path / "theirs")
    ours, theirs = weights(tmp_path / "ours"), weights(tmp_path / "theirs")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)


RESIDENT_CASES = {
    "linear": lambda z: {
        "merge_method": "linear",
        "models": [
            {"model": "base", "parameters": {"weight": 0.2}},
            {"model": "expert-add", "parameters": {"weight": 0.5}},
            {"model": "expert-rev", "parameters": {"weight": 0.3}},
        ],
    },
    "ties": lambda z: {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "expert-add", "parameters": {"weight": [0.2, 1.0], "density": 0.4}},
            {"model": "expert-sort", "parameters": {"weight": 0.7, "density": [0.9, 0.2]}},
        ],
    },
    "dare_ties": lambda z: {
        "merge_method": "dare_ties",
        "base_model": "base",
        "evomerge": {"seed": 11},
        "models": [
            {"model": "expert-add", "parameters": {"weight": 0.9, "density": 0.5}},
            {"model": "expert-sort", "parameters": {"weight": 0.7, "density": 0.6}},
        ],
    },
    "della": lambda z: {
        "merge_method": "della",
        "base_model": "base",
        "evomerge": {"seed": 3},
        "models": [
            {"model": "expert-add", "parameters": {"weight": 0.9, "density": 0.5}},
            {"model": "expert-rev", "parameters": {"weight": 0.7, "density": 0.6, "epsilon": 0.1}},
        ],
    },
    "breadcrumbs_ties": lambda z: {
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "models": [
            {"model": "expert-add", "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}},
            {"model": "expert-rev", "parameters": {"weight": 1.0, "density": 0.7}},
        ],
    },
    "slerp+lines": lambda z: {
        "merge_method": "slerp",
        "base_model": "base",
        "parameters": {"t": [0.1, 0.9]},
        "models": [{"model": "expert-sort"}],
        "evomerge": {"lines": {"alpha": 0.5, "beta": 1.0}},
    },
}


def _on_disk(recipe_data: dict, zoo: Path) -> dict:
    """The same recipe with model names turned into zoo paths."""

    def path(name):
        return str(zoo / name)

    data = json.loads(json.dumps(recipe_data))
    if "base_model" in data:
        data["base_model"] = path(data["base_model"])
    for m in data["models"]:
        m["model"] = path(m["model"])
    return data


@pytest.fixture(scope="module")
def resident(zoo):
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True).eval()
    base = weights(zoo / "base")
    experts = {name: weights(zoo / name) for name in ("expert-add", "expert-rev", "expert-sort")}
    return ResidentMerge(model, base, experts, base_name="base")


@pytest.mark.parametrize("case", sorted(RESIDENT_CASES))
def test_in_memory_materialization_equals_the_disk_merge_bit_for_bit(case, zoo, resident, tmp_path):
    data = RESIDENT_CASES[case](zoo)
    result = resident.materialize(parse_recipe(data))
    assert result.ok and result.seconds > 0
    merge_to_disk(parse_recipe(_on_disk(data, zoo)), tmp_path / "m", progress=False)
    on_disk = weights(tmp_path / "m")
    for name, param in resident.model.named_parameters():
        assert torch.equal(param.detach(), on_disk[name]), f"{case}: {name}"


def test_random_methods_reproduce_by_seed_on_disk(zoo, tmp_path):
    data = _on_disk(RESIDENT_CASES["dare_ties"](zoo), zoo)
    merge_to_disk(parse_recipe(data), tmp_path / "a", progress=False)
    merge_to_disk(parse_recipe(data), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    data["evomerge"]["seed"] = 12
    merge_to_disk(parse_recipe(data), tmp_path / "c", progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_sharded_output_loads_and_equals_the_single_file(zoo, tmp_path):
    recipe = parse_recipe(ties_recipe(zoo))
    merge_to_disk(recipe, tmp_path / "one", progress=False)
    merge_to_disk(recipe, tmp_path / "many", progress=False, shard_bytes=100_000)
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one", use_safetensors=True).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "many", use_safetensors=True).eval()
    ids = torch.tensor([[19, 22, 22, 17, 8, 9, 6, 10, 11, 18]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    card = (tmp_path / "one" / "README.md").read_text()
    assert "ties" in card and "arXiv:2306.01708" in card and "mergekit-yaml" in card
    for f in ("config.json", "tokenizer.json", RECIPE_FILE, "generation_config.json"):
        assert (tmp_path / "one" / f).is_file(), f


def test_bfloat16_output(zoo, tmp_path):
    merge_to_disk(parse_recipe({**ties_recipe(zoo), "dtype": "bfloat16"}), tmp_path / "bf", progress=False)
    w = weights(tmp_path / "bf")
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert (
        json.loads((tmp_path / "bf" / "config.json").read_text()).get(
            "dtype", json.loads((tmp_path / "bf" / "config.json").read_text()).get("torch_dtype")
        )
        == "bfloat16"
    )


def _copy_model(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_nan_in_a_merged_tensor_aborts_and_leaves_nothing(zoo, tmp_path):
    def poison(state):
        state["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")

    bad = _copy_model(zoo / "expert-add", tmp_path / "bad", poison)
    data = ties_recipe(zoo)
    data["models"][0]["model"] = str(bad)
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump(data))
    result = run_cli("merge", str(config), "--out", str(tmp_path / "out" / "merged"), "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.layers.2.mlp.up_proj.weight" in result.stderr and "NaN" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []  # no target, no partial directory


def test_in_memory_nan_is_reported_not_raised(zoo, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True).eval()
    expert = weights(zoo / "expert-add")
    expert["model.norm.weight"][3] = float("inf")
    resident = ResidentMerge(model, weights(zoo / "base"), {"e": expert})
    result = resident.materialize(
        parse_recipe(
            {
                "merge_method": "task_arithmetic",
                "base_model": "base",
                "models": [{"model": "e", "parameters": {"weight": 1.0}}],
            }
        )
    )
    assert not result.ok and result.nonfinite == ["model.norm.weight"]


def test_shape_mismatch_is_named_before_any_compute(zoo, tmp_path):
    def shrink(state):
        state["model.layers.1.self_attn.k_proj.weight"] = state["model.layers.1.self_attn.k_proj.weight"][:8].clone()

    odd = _copy_model(zoo / "expert-rev", tmp_path / "odd", shrink)
    data = ties_recipe(zoo)
    data["models"][1]["model"] = str(odd)
    with pytest.raises(
        MergeError,
        match=r"tensor 'model.layers.1.self_attn.k_proj.weight' has shape \[8, 64\], the base has \[64, 64\]",
    ):
        merge_to_disk(parse_recipe(data), tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_pickled_inputs_need_the_flag(zoo, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(zoo / "expert-add", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    data = ties_recipe(zoo)
    data["models"][0]["model"] = str(pickled)
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump(data))
    refused = run_cli("merge", str(config), "--out", str(tmp_path / "x"), "--quiet")
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr and not (tmp_path / "x").exists()
    allowed = run_cli("merge", str(config), "--out", str(tmp_path / "y"), "--quiet", "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    reference = tmp_path / "ref"
    merge_to_disk(parse_recipe(ties_recipe(zoo)), reference, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "y").values(), weights(reference).values()))


def test_existing_output_needs_force(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump(ties_recipe(zoo)))
    result = run_cli("merge", str(config), "--out", str(out), "--quiet")
    assert result.returncode == 2 and "--force" in result.stderr and (out / "keep.txt").exists()
    assert run_cli("merge", str(config), "--out", str(out), "--quiet", "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_merge_force_sweeps_what_a_killed_replace_left(zoo, tmp_path):
    """Killed as the old output was moved aside (``.out.old-PID``) or while merging
    (``.out.partial-PID``): the next merge restores the old output (so it is still refused without
    --force) and removes dead processes' leftovers; with --force nothing stays beside the output."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump(ties_recipe(zoo)))
    out = tmp_path / "out"
    (tmp_path / f".out.old-{dead.pid}").mkdir()  # killed between the two renames: no ``out``
    (tmp_path / f".out.old-{dead.pid}" / "keep.txt").write_text("precious")
    (tmp_path / f".out.partial-{dead.pid}").mkdir()
    result = run_cli("merge", str(config), "--out", str(out), "--quiet")
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]
    shutil.copytree(out, tmp_path / f".out.old-{dead.pid}")  # killed while removing the old copy
    assert run_cli("merge", str(config), "--out", str(out), "--quiet", "--force").returncode == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(merge_method="tiess"), "unknown merge method 'tiess'; valid:"),
        (lambda d: d.update(modules={}), "unsupported key 'modules'"),
        (lambda d: d["models"][0]["parameters"].update(density=2.0), "'density' = 2.0 is outside [0.0, 1.0]"),
        (lambda d: d["models"][0].update(model="/nonexistent/model"), "model directory not found: /nonexistent/model"),
        (
            lambda d: d["models"][0].update(model="some-org/some-model"),
            "some-org/some-model: not a local directory and cannot be fetched",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(zoo, tmp_path, edit, message):
    data = ties_recipe(zoo)
    edit(data)
    config = tmp_path / "r.yml"
    config.write_text(yaml.safe_dump(data))
    result = run_cli("merge", str(config), "--out", str(tmp_path / "o"), "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(config) in lines[0]
    assert not (tmp_path / "o").exists()


def _with_card(zoo, tmp_path, name, license):
    import shutil

    model = tmp_path / name
    shutil.copytree(zoo / name, model)
    if license is not None:
        (model / "README.md").write_text(f"---\nlicense: {license}\nlanguage: [en]\n---\n\n# {name}\n")
    return model


@pytest.mark.parametrize(
    "licenses, front_matter, warned",
    [
        (("apache-2.0", "apache-2.0", "apache-2.0"), "license: apache-2.0", False),
        (("apache-2.0", "mit", "apache-2.0"), None, True),
        (("apache-2.0", None, "apache-2.0"), None, True),
    ],
)
def test_the_card_carries_the_inputs_licenses(zoo, tmp_path, licenses, front_matter, warned):
    names = ("base", "expert-add", "expert-sort")
    dirs = [_with_card(zoo, tmp_path, n, lic) for n, lic in zip(names, licenses)]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(dirs[0]),
        "models": [{"model": str(d), "parameters": {"weight": 0.5}} for d in dirs[1:]],
    }
    merge_to_disk(parse_recipe(recipe), tmp_path / "m", progress=False)
    card = (tmp_path / "m" / "README.md").read_text()
    meta = card.split("---")[1]
    assert [line for line in meta.splitlines() if line.startswith("license:")] == (
        [front_matter] if front_matter else []
    )
    for d, lic in zip(dirs, licenses):
        assert f"| `{d}` | {lic or 'not stated'} |  |" in card  # local: no link
    assert ("check each input's terms" in card) == warned
    assert "https://github.com/" not in card


def test_the_card_links_hub_models_to_their_pages(zoo):
    from evomerge.merge.checkpoint import model_card

    recipe = parse_recipe(
        {"merge_method": "task_arithmetic", "base_model": "org/base", "models": [{"model": "org/expert"}]}
    )
    card = model_card(recipe, inputs={"org/base": zoo / "base"})  # no card there: not stated
    assert "| `org/base` | not stated | [org/base](https://huggingface.co/org/base) |" in card
    assert "| `org/expert` | not stated | [org/expert](https://huggingface.co/org/expert) |" in card
