"""Layer paths (the data-flow space): genome, in-memory path models, export without custom code."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_campaign import cli
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from evomerge.merge.checkpoint import RECIPE_FILE
from evomerge.merge.ondisk import merge_to_disk
from evomerge.merge.path import ResidentPath, write_path
from evomerge.merge.registry import MergeError
from evomerge.recipe import RecipeError, fold_scales, parse_recipe, path_recipe
from evomerge.search.paths import PathGenome, PathSpace
from evomerge.search.space import SpaceError

MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")
needs_mergekit = pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="mergekit (test extra) not installed")


def space(**layers) -> PathSpace:
    return PathSpace.model_validate({"models": ["a", "b"], "layers": {"granularity": "path", **layers}})


# -- the genome ------------------------------------------------------------------------------------


def test_slots_genes_and_decode_by_hand():
    g = PathGenome(space(repeats=2), {"a": 2, "b": 3})
    # (a0 a1 b0 b1 b2) x 2 = 10 slots; an inclusion and a scale gene each
    assert [(s.model, s.layer, s.repeat) for s in g.slots[:6]] == [
        ("a", 0, 0),
        ("a", 1, 0),
        ("b", 0, 0),
        ("b", 1, 0),
        ("b", 2, 0),
        ("a", 0, 1),
    ]
    assert g.dimension == 20 and g.genes[0].name == "include[a.0]@r0" and g.genes[10].name == "scale[a.0]@r0"
    x = [-1.0] * 10 + [1.0] * 10
    for k, scale in ((0, 0.7), (3, 1.2), (5, 1.5), (6, 2.0)):  # 2.0 is clipped to the box's 1.5
        x[k], x[10 + k] = 0.3, scale
    assert g.path(x) == [("a", 0, 0.7), ("b", 1, 1.2), ("a", 0, 1.5), ("a", 1, 1.5)]
    recipe = g.decode(x)
    assert [s.sources[0].layer_range for s in recipe.slices] == [(0, 1), (1, 2), (0, 2)]
    assert recipe.evomerge.scales == [0.7, 1.2, 1.5, 1.5]
    assert g.path(g.encode(recipe)) == g.path(x)  # encode inverts decode on the path


def test_empty_paths_caps_fixed_ends_and_transitions():
    g = PathGenome(space(repeats=1, scale={"fixed": 1.0}), {"a": 2, "b": 2})
    assert g.dimension == 4  # inclusion genes only
    assert g.path([-0.9, -0.2, -0.5, -1.0]) == [("a", 1, 1.0)]  # none included: the largest gene is kept
    capped = PathGenome(space(repeats=1, scale={"fixed": 1.0}, max_layers=2), {"a": 2, "b": 2})
    assert capped.path([0.1, 0.9, 0.5, 0.2]) == [("a", 1, 1.0), ("b", 0, 1.0)]  # the two largest, in order
    ends = PathGenome(space(repeats=2, fix_ends=True, scale={"fixed": 1.0}), {"a": 2, "b": 2})
    assert ends.dimension == 6 and ends.fixed == [0, 7]
    assert ends.path([-1.0] * 6) == [("a", 0, 1.0), ("b", 1, 1.0)]
    w = PathGenome(space(repeats=1, transitions=True), {"a": 1, "b": 1})
    names = [gene.name for gene in w.genes]
    assert names == ["include[a.0]@r0", "include[b.0]@r0", "w[embed>a.0]", "w[embed>b.0]", "w[a.0>a.0]"] + [
        "w[a.0>b.0]",
        "w[b.0>a.0]",
        "w[b.0>b.0]",
    ]
    x = [0.5, 0.5, 0.6, 0.7, 0.8, 1.1, 1.2, 1.3]
    assert w.path(x) == [("a", 0, 0.6), ("b", 0, 1.1)]  # embed -> a.0, then a.0 -> b.0
    assert w.path(w.encode(w.decode(x))) == w.path(x)


def test_seeds_and_encode_errors():
    g = PathGenome(space(repeats=2), {"a": 2, "b": 2})
    assert g.path(g.expert_alone("b")) == [("b", 0, 1.0), ("b", 1, 1.0)]
    assert g.uniform_average() is None
    three = path_recipe([("a", 1, 1.0), ("a", 1, 1.0), ("a", 1, 1.0)])
    with pytest.raises(SpaceError, match="layer 1 of 'a' at this point of the path has no slot left"):
        g.encode(three)  # a1 appears once per repeat: twice, not three times
    with pytest.raises(SpaceError, match="not a layer path"):
        g.encode(parse_recipe({"merge_method": "linear", "models": [{"model": "a"}]}))


# -- recipes ---------------------------------------------------------------------------------------


def test_path_recipes_runs_and_folded_scales_by_hand():
    r = path_recipe([("a", 0, 1.0), ("a", 1, 2.0), ("b", 1, 0.5), ("b", 2, 1.0)])
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in r.slices] == [("a", (0, 2)), ("b", (1, 3))]
    assert r.path() == [("a", 0, 1.0), ("a", 1, 2.0), ("b", 1, 0.5), ("b", 2, 1.0)] and r.layer_count() == 4
    # running products 1, 2, 1, 1: layer writes scaled by 1, 1/2, 1, 1
    f = fold_scales(r)
    assert f.evomerge.scales is None
    ranges = [(s.sources[0].model, s.sources[0].layer_range) for s in f.slices]
    assert ranges == [("a", (0, 1)), ("a", (1, 2)), ("b", (1, 3))]
    scale = f.slices[1].sources[0].parameters["scale"]
    assert [(e.filter, e.value) for e in scale] == [("o_proj", 0.5), ("down_proj", 0.5), (None, 1.0)]
    assert f.slices[0].sources[0].parameters is None and f.slices[2].sources[0].parameters is None
    assert fold_scales(path_recipe([("a", 0, 1.0)])).slices[0].sources[0].parameters is None
    bad = {
        "wrong length": ({"evomerge": {"scales": [1.0]}}, "1 values for a path of 4 layers"),
        "negative": ({"evomerge": {"scales": [1.0, -1.0, 1.0, 1.0]}}, "must be a finite number > 0"),
        "two sources": ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}] * 2}]}, "exactly one"),
    }
    base = r.model_dump(mode="json", exclude_none=True)
    for change, message in bad.values():
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**base, **change})
    with pytest.raises(RecipeError, match="only a passthrough layer path takes input scales"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a"}], "evomerge": {"scales": [1.0]}})


# -- the path model in memory, against its export ---------------------------------------------------


def _tiny(kind: str, seed: int, out: Path) -> Path:
    common = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=kind == "qwen2-tied",
    )
    if kind == "llama":
        config = LlamaConfig(**common)
    else:  # sliding-window layers from layer 1 on: the path must carry each layer's attention type
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1, so a scale or a wrong source layer shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen2-tied"])
def pair(request, tmp_path_factory):
    """Two random models of one family (tied: the head is the embedding, so a path's head is its
    first model's, as the saved model ties it)."""
    root = tmp_path_factory.mktemp(request.param)
    return request.param, {n: _tiny(request.param, seed, root / n) for n, seed in (("a", 1), ("b", 2))}


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()


#: a path that repeats a layer, changes model four times and scales the stream at five points
PATH = [("a", 0, 1.0), ("a", 1, 1.3), ("b", 1, 0.8), ("a", 1, 1.0), ("b", 2, 1.25), ("b", 1, 0.9), ("b", 2, 1.0)]
PROMPT = torch.tensor([[3, 17, 29, 4, 40, 11, 8]])


def _generate(model, **kw):
    with torch.no_grad():
        out = model.generate(
            PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences, torch.stack(out.logits)


def test_a_path_model_generates_as_its_export_and_copies_no_weight(pair, tmp_path):
    kind, dirs = pair
    models = {n: _load(d) for n, d in dirs.items()}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    resident = ResidentPath(models)
    recipe = path_recipe(PATH)
    resident.materialize(recipe)
    shell = resident.model
    assert shell.config.num_hidden_layers == len(PATH) and len(shell.model.layers) == len(PATH)
    if kind.startswith("qwen2"):  # each slot's attention type is its source layer's
        assert shell.config.layer_types == [models[m].config.layer_types[i] for m, i, _ in PATH]
        assert "sliding_attention" in shell.config.layer_types and "full_attention" in shell.config.layer_types
    owned = {p.data_ptr() for m in models.values() for p in m.parameters()}
    assert all(p.data_ptr() in owned for p in shell.parameters())  # references only, no copy

    cached, cached_logits = _generate(shell)
    with torch.no_grad():
        uncached = shell.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)  # every slot, repeated layers included, has its own cache entry

    located = path_recipe([(str(dirs[m]), i, s) for m, i, s in PATH])
    out = write_path(located, tmp_path / "export", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(PATH) and config["model_type"] == kind.split("-")[0]
    if kind == "qwen2-tied":  # no head written: it is the first model's embedding
        assert not any(k.startswith("lm_head") for k in load_file(out / "model.safetensors"))
        assert shell.lm_head.weight is models["a"].model.embed_tokens.weight
    exported = _load(out)
    sequences, logits = _generate(exported)
    assert torch.equal(sequences, cached)  # greedy generation of the path equals its export's
    # Scales folded into o_proj/down_proj: equal up to RMSNorm's eps and float32 rounding.
    assert torch.allclose(logits, cached_logits, rtol=1e-4, atol=1e-4), (logits - cached_logits).abs().max()
    with torch.no_grad():  # a unit-scale path exports bit for bit
        resident.materialize(path_recipe([(m, i, 1.0) for m, i, _ in PATH]))
        plain = write_path(
            path_recipe([(str(dirs[m]), i, 1.0) for m, i, _ in PATH]), tmp_path / "plain", progress=False
        )
        assert torch.equal(_load(plain)(PROMPT).logits, shell(PROMPT).logits)

    for n, m in models.items():  # the source models are untouched
        assert m.config.num_hidden_layers == 3 and len(m.model.layers) == 3
        assert all(torch.equal(v, before[n][k]) for k, v in m.state_dict().items())


def test_without_distinct_cache_slots_a_repeated_layer_corrupts_generation(pair):
    """The control for the test above: were the slots of a repeated layer to share its cache entry,
    cached generation would differ from uncached generation."""
    _, dirs = pair
    resident = ResidentPath({n: _load(d) for n, d in dirs.items()})
    resident.materialize(path_recipe(PATH))
    for k, (_, i, _) in enumerate(PATH):  # every slot back to its source layer's own index
        resident.model.model.layers[k].self_attn.layer_idx = i
    with torch.no_grad():
        uncached = resident.model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
        try:
            cached = resident.model.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)
        except RuntimeError as e:  # Qwen2: a sliding and a full layer in one entry no longer line up
            assert "size of tensor" in str(e)
            return
    assert not torch.equal(cached, uncached)


def test_paths_the_models_cannot_take_are_refused(pair, tmp_path):
    _, dirs = pair
    resident = ResidentPath({n: _load(d) for n, d in dirs.items()})
    with pytest.raises(MergeError, match=r"layer_range \[2, 4\] leaves 'b' \(3 layers\)"):
        resident.materialize(path_recipe([("a", 0, 1.0), ("b", 2, 1.0), ("b", 3, 1.0)]))
    with pytest.raises(MergeError, match="'c' is not one of a, b"):
        resident.materialize(path_recipe([("c", 0, 1.0)]))
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((dirs["b"] / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    (wide / "model.safetensors").write_bytes((dirs["b"] / "model.safetensors").read_bytes())
    with pytest.raises(MergeError, match="hidden_size is 64, .* has 32 .a layer path passes one hidden state"):
        write_path(path_recipe([(str(dirs["a"]), 0, 1.0), (str(wide), 1, 1.0)]), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# -- against mergekit --------------------------------------------------------------------------------


@needs_mergekit
def test_mergekit_reproduces_exported_paths_with_and_without_scales(zoo, tmp_path):
    for label, scales in (("plain", [1.0] * 6), ("scaled", [1.0, 1.4, 0.7, 1.0, 1.2, 0.9])):
        layers = [("expert-add", 0), ("expert-add", 1), ("expert-sort", 1), ("expert-add", 1), ("expert-sort", 2)]
        layers.append(("expert-sort", 3))
        recipe = path_recipe([(str(zoo / m), i, s) for (m, i), s in zip(layers, scales)])
        ours = merge_to_disk(recipe, tmp_path / f"ours-{label}", progress=False)
        written = yaml.safe_load((ours / RECIPE_FILE).read_text())
        assert ("scale" in json.dumps(written)) == (label == "scaled")  # folded into mergekit's own parameter
        result = subprocess.run(
            [str(MERGEKIT_YAML), str(ours / RECIPE_FILE), str(tmp_path / f"theirs-{label}")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        mine, theirs = load_file(ours / "model.safetensors"), {}
        for f in (tmp_path / f"theirs-{label}").glob("*.safetensors"):
            theirs.update(load_file(f))
        assert mine.keys() == theirs.keys() and len([k for k in mine if k.endswith("o_proj.weight")]) == 6
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), (label, name)
        their_config = json.loads((tmp_path / f"theirs-{label}" / "config.json").read_text())
        assert their_config["num_hidden_layers"] == 6
        # the o_proj of the third layer (product 1.4 * 0.7 = 0.98) carries 1 / 0.98 of its source
        source = load_file(zoo / "expert-sort" / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"]
        factor = 1.0 if label == "plain" else 1 / (1.4 * 0.7)
        expected = (source.float() * factor).to(source.dtype)
        assert torch.equal(mine["model.layers.2.self_attn.o_proj.weight"], expected)
        assert math.isclose(factor, 1.0204081632653061) or label == "plain"


# -- experiments and campaigns ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "evaluators" / "zoo"


def path_experiment(tmp_path, models: dict[str, str], space_extra=None, **overrides) -> Path:
    evaluator = tmp_path / "evaluator.yaml"
    objectives = [
        {"name": "add", "task": str(TASKS / "zoo_add_{split}.yaml"), "metric": "exact_match"},
        {"name": "sort", "task": str(TASKS / "zoo_sort_{split}.yaml"), "metric": "acc"},
    ]
    evaluator.write_text(yaml.safe_dump({"limit": 20, "seed": 0, "batch_size": 20, "objectives": objectives}))
    space = tmp_path / "space.yaml"
    layers = {"granularity": "path", "repeats": 2, "max_layers": 8}
    space.write_text(yaml.safe_dump({"models": list(models), "layers": layers, **(space_extra or {})}))
    data = {
        "name": "t-path",
        "seed": 2,
        "models": models,
        "search_space": str(space),
        "evaluator": str(evaluator),
        "optimizer": {"name": "cma"},
        "reference_point": {"add": 0.0, "sort": 0.0},
        "seeds": {"experts_alone": True},
        "budget": {"max_evaluations": 6},
        "workers": {"count": 1},
        "output_dir": str(tmp_path / "campaign"),
        "tracking": {"refresh_s": 0.5},
        **overrides,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _wide(zoo, tmp_path) -> Path:
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((zoo / "expert-sort" / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    (wide / "model.safetensors").write_bytes((zoo / "expert-sort" / "model.safetensors").read_bytes())
    return wide


BAD = {
    "hidden sizes": ("wide", "models: expert-sort: hidden_size is 128, 'expert-add' has 64 (a layer path passes"),
    "parameter genes": (
        "method",
        "search_space: {space}: method: a layer-path space (layers.granularity: path) has no parameter-space genes",
    ),
    "seed path beyond the model": ("seed", "seeds.recipes[0]: slices[1]: layer_range [2, 6] leaves 'expert-add' (4"),
    "hand baselines": ("baselines", "seeds.baselines: the hand baselines are parameter-space merges"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_path_experiments_are_refused_before_compute(zoo, tmp_path, case):
    from evomerge.experiment import ExperimentError, check_experiment, load_experiment

    kind, message = BAD[case]
    models = {"expert-add": str(zoo / "expert-add"), "expert-sort": str(zoo / "expert-sort")}
    space_extra, overrides = {}, {}
    if kind == "wide":
        models["expert-sort"] = str(_wide(zoo, tmp_path))
    elif kind == "method":
        space_extra = {"method": "ties"}
    elif kind == "seed":
        seed = path_recipe([("expert-sort", 0, 1.0), ("expert-add", 2, 1.0)]).model_dump(mode="json")
        seed["slices"][1]["sources"][0]["layer_range"] = [2, 6]
        (tmp_path / "seed.yaml").write_text(yaml.safe_dump(seed))
        overrides = {"seeds": {"experts_alone": True, "recipes": [str(tmp_path / "seed.yaml")]}}
    else:
        overrides = {"seeds": {"baselines": True}}
    path = path_experiment(tmp_path, models, space_extra, **overrides)
    with pytest.raises(ExperimentError) as e:
        check_experiment(load_experiment(path), path, check_tasks=False)
    assert str(e.value) == str(e.value).splitlines()[0]
    assert f"{path}: " + message.format(space=tmp_path / "space.yaml") in str(e.value)
    if kind == "wide":  # and from the command line: one line, exit 2, no campaign directory
        result = cli("run", path, cwd=tmp_path, timeout=120)
        assert result.returncode == 2 and result.stderr.strip() == f"evomerge: error: {e.value}", result.stderr
        assert not (tmp_path / "campaign").exists()


def test_ps_then_dfs_campaign_exports_a_checkpoint_without_custom_code(zoo, tmp_path):
    """PS first (here a task-arithmetic merge written by `evomerge merge`), then a layer-path campaign
    over [that merge, an expert]: real Ray, MLflow store and lm-eval; the pick exported and loaded."""
    ps = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / e), "parameters": {"weight": 0.7}} for e in ("expert-add", "expert-sort")],
    }
    (tmp_path / "ps.yaml").write_text(yaml.safe_dump(ps))
    made = cli("merge", tmp_path / "ps.yaml", "--out", tmp_path / "ps-merge", "--quiet", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    path = path_experiment(tmp_path, {"ps-merge": str(tmp_path / "ps-merge"), "expert-sort": str(zoo / "expert-sort")})
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from evomerge import campaign

    search = campaign.open_campaign(tmp_path / "campaign", check=False).search()
    assert len(search.finished) == 6 and all(t.recipe.is_path for t in search.trials)
    seeds = [t.recipe.path() for t in search.trials[:2]]  # each model's own layers first
    assert seeds == [[(m, i, 1.0) for i in range(4)] for m in ("ps-merge", "expert-sort")]

    out = tmp_path / "export"
    exported = cli("export", tmp_path / "campaign", "--best", "--out", out, "--quiet", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    record = json.loads((out / "evomerge.json").read_text())
    layers = search.trials[record["trial"]].recipe.path()
    model = _load(out)  # a standard checkpoint: trust_remote_code stays off
    assert model.config.num_hidden_layers == len(layers) and len(model.model.layers) == len(layers)
    assert set(record["report_scores"]) == {"add", "sort"}
    assert yaml.safe_load((out / RECIPE_FILE).read_text())["merge_method"] == "passthrough"
