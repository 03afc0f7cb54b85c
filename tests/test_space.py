import random

import pytest
from conftest import REPO

from evomerge.merge.plan import RecipePlan
from evomerge.recipe import parse_recipe
from evomerge.search.space import Genome, SearchSpace, SpaceError, load_space

SPACES = REPO / "search_spaces"
TENSORS = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{t}"
    for i in range(4)
    for t in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")
]


def space(**kw):
    data = {
        "base": "base",
        "models": ["a", "b"],
        "method": "ties",
        "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.2, "high": 1.0}},
    }
    data.update(kw)
    return SearchSpace.model_validate(data)


@pytest.mark.parametrize(
    "layers,tied,expected",
    [
        ({"granularity": "model"}, [], 4),
        ({"granularity": "group", "group_size": 2}, [], 2 * 2 * 2),
        ({"granularity": "group", "group_size": 3}, [], 2 * 2 * 2),  # 4 layers -> groups of 3 and 1
        ({"granularity": "layer"}, [], 2 * 2 * 4),
        ({"granularity": "smooth", "control_points": 3}, [], 2 * 2 * 3),
        ({"granularity": "model", "split": ["self_attn", "mlp"]}, [], 2 * 2 * 3),
        ({"granularity": "layer"}, ["weight"], 4 + 2 * 4),
    ],
)
def test_dimensions(layers, tied, expected):
    assert Genome(space(layers=layers, tied=tied), num_layers=4).dimension == expected


def test_shipped_spaces_load_and_have_the_documented_dimensions():
    assert Genome(load_space(SPACES / "two_experts_layer_groups.yaml"), 4).dimension == 4
    assert Genome(load_space(SPACES / "three_experts_ties_dare.yaml"), 4).dimension == 57
    assert Genome(load_space(SPACES / "per_layer_linear.yaml"), 4).dimension == 8


@pytest.mark.parametrize(
    "layers",
    [
        {"granularity": "model"},
        {"granularity": "group", "group_size": 3},
        {"granularity": "layer", "split": ["self_attn"]},
        {"granularity": "smooth", "control_points": 4, "split": ["self_attn", "mlp"]},
    ],
)
def test_encode_inverts_decode_exactly_on_the_box(layers):
    genome = Genome(space(layers=layers, lines={"alpha": {"low": 0.5, "high": 1.0}}), num_layers=4, seed=5)
    rng = random.Random(0)
    lo, hi = genome.bounds
    for _ in range(20):
        x = [rng.uniform(a, b) for a, b in zip(lo, hi)]
        recipe = genome.decode(x)
        assert genome.encode(recipe) == x
        assert parse_recipe(recipe.model_dump(mode="json")) == recipe  # a plain, valid recipe
        assert recipe.evomerge.seed == 5


def test_categorical_method_gene():
    genome = Genome(load_space(SPACES / "three_experts_ties_dare.yaml"), num_layers=4)
    lo, hi = genome.bounds
    assert genome.genes[0].name == "method" and (lo[0], hi[0]) == (0.0, 2.0)
    rng = random.Random(1)
    x = [rng.uniform(a, b) for a, b in zip(lo, hi)]
    for value, method in ((0.2, "ties"), (1.7, "dare_ties"), (2.0, "dare_ties")):
        x[0] = value
        recipe = genome.decode(x)
        assert recipe.merge_method == method
        assert genome.decode(genome.encode(recipe)) == recipe


def test_decoded_values_reach_the_right_tensors():
    """Checked through the merge engine's own resolution: gene -> layer group -> tensor."""
    genome = Genome(space(layers={"granularity": "group", "group_size": 2, "split": ["self_attn"]}), num_layers=4)
    x = [g.low + (i + 1) * (g.high - g.low) / (genome.dimension + 2) for i, g in enumerate(genome.genes)]
    value = {g.name: v for g, v in zip(genome.genes, x)}
    plan = RecipePlan(genome.decode(x), num_layers=4)
    for name in TENSORS:
        params = plan.resolve(name)
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        part = "self_attn" if "self_attn" in name else "*"
        for model, got in zip(["a", "b"], params.per_model):
            assert got["weight"] == pytest.approx(value[f"weight[{model}].{part}@{layer // 2}"]), name
            assert got["density"] == pytest.approx(value[f"density[{model}].{part}@{layer // 2}"]), name


def test_seeds_and_hand_recipes():
    genome = Genome(space(), num_layers=4)
    avg = genome.decode(genome.uniform_average())
    assert [m.parameters["weight"] for m in avg.models[1:]] == [0.5, 0.5]
    alone = genome.decode(genome.expert_alone("b"))
    assert [m.parameters["weight"] for m in alone.models[1:]] == [0.0, 1.0]
    hand = parse_recipe(
        {
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "a", "parameters": {"weight": 0.3, "density": 0.4}},
                {"model": "b", "parameters": {"weight": [0.1, 0.9]}},
            ],
        }
    )
    assert [g.name for g in genome.genes] == ["weight[a]", "weight[b]", "density[a]", "density[b]"]
    x = genome.encode(hand)
    assert x[0] == 0.3 and x[2] == 0.4
    assert x[1] == pytest.approx(0.1)  # a gradient read at the gene's layer (model granularity: layer 0)
    assert x[3] == pytest.approx(0.6)  # missing density -> middle of its box
    with pytest.raises(SpaceError, match="not a model"):
        genome.expert_alone("zzz")


def test_out_of_box_values_are_clipped():
    genome = Genome(space(), num_layers=4)
    recipe = genome.decode([5.0, 0.5, -1.0, 0.5])
    assert recipe.models[1].parameters == {"weight": 1.0, "density": 0.2}


@pytest.mark.parametrize(
    "text,message",
    [
        ("base: b\nmodels: [x]\nmethod: tie\n", "method: unknown merge method 'tie'"),
        (
            "base: b\nmodels: [x]\nmethod: ties\nparameters: {gamma: {low: 0, high: 1}}\n",
            "parameters.gamma: not a parameter of ties",
        ),
        ("base: b\nmodels: [x]\nmethod: ties\nparameters: {normalize: {low: 0, high: 1}}\n", "can only be fixed"),
        (
            "base: b\nmodels: [x]\nmethod: ties\nparameters: {density: {low: 0.5, high: 1.5}}\n",
            "leave the method's range",
        ),
        ("base: b\nmodels: [x]\nmethod: ties\nparameters: {weight: {low: 1, high: 0}}\n", "low < high"),
        ("base: b\nmodels: [x]\nmethod: ties\nlayer: {}\n", "unsupported key 'layer'"),
        ("base: b\nmodels: [b]\nmethod: ties\n", "without the base"),
    ],
)
def test_invalid_spaces_name_file_and_field(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as e:
        load_space(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_decoded_demo_recipe_materializes_on_the_zoo(zoo):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evomerge.merge.apply import ResidentMerge

    genome = Genome(load_space(SPACES / "two_experts_layer_groups.yaml"), num_layers=4)
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True).eval()
    experts = {m: load_file(zoo / m / "model.safetensors") for m in genome.space.models}
    resident = ResidentMerge(model, load_file(zoo / "base" / "model.safetensors"), experts)
    result = resident.materialize(genome.decode(genome.uniform_average()))
    assert result.ok
    base = load_file(zoo / "base" / "model.safetensors")
    name = "model.layers.3.mlp.down_proj.weight"
    expected = (
        base[name]
        + 0.5 * (experts["expert-add"][name] - base[name])
        + 0.5 * (experts["expert-sort"][name] - base[name])
    )
    assert (dict(model.named_parameters())[name].detach() - expected).abs().max() < 1e-6


def test_space_show_cli(zoo):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge",
            "space",
            "show",
            str(SPACES / "three_experts_ties_dare.yaml"),
            "--model",
            str(zoo / "base"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "57 genes for a 4-layer model" in out.stdout and "density[expert-rev].mlp@2" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "evomerge", "space", "show", str(SPACES / "nope.yaml"), "--layers", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr


def test_linear_spaces_average_the_experts_only():
    genome = Genome(load_space(SPACES / "per_layer_linear.yaml"), num_layers=4)
    x = [0.1 * (i + 1) for i in range(genome.dimension)]
    recipe = genome.decode(x)
    assert recipe.base_model == "base" and [m.model for m in recipe.models] == ["expert-add", "expert-rev"]
    assert recipe.models[0].parameters["weight"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert RecipePlan(recipe, num_layers=4).inputs == ["expert-add", "expert-rev"]
    assert genome.encode(recipe) == x
