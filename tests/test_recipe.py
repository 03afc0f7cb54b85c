import pytest

from evomerge.merge.plan import RecipePlan
from evomerge.models.layout import layer_index
from evomerge.recipe import FilterValue, RecipeError, load_recipe, parse_recipe, resolve_setting

BASIC = {
    "merge_method": "ties",
    "base_model": "b",
    "models": [
        {
            "model": "x",
            "parameters": {"weight": [0.1, 0.9], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]},
        },
        {"model": "y", "parameters": {"weight": 0.5, "density": 0.5}},
    ],
    "parameters": {"lambda": 1.1},
    "dtype": "float32",
    "evomerge": {"seed": 7, "lines": {"alpha": 0.5, "beta": 0.5}},
}


def test_yaml_round_trip(tmp_path):
    recipe = parse_recipe(BASIC)
    path = tmp_path / "r.yml"
    recipe.save(path)
    assert load_recipe(path) == recipe
    assert "evomerge:" in path.read_text() and "seed: 7" in path.read_text()
    plain = parse_recipe({k: v for k, v in BASIC.items() if k != "evomerge"})
    assert "evomerge" not in plain.to_yaml()  # default extensions are not written


@pytest.mark.parametrize(
    "data,message",
    [
        ({**BASIC, "modules": {}}, "unsupported key 'modules' (multi-module"),
        ({**BASIC, "tokenizer": {"source": "union"}}, "unsupported key 'tokenizer' (tokenizer surgery"),
        ({**BASIC, "frobnicate": 1}, "unsupported key 'frobnicate'"),
        ({"base_model": "b", "models": [{"model": "x"}]}, "missing required field 'merge_method'"),
        ({"merge_method": "ties", "base_model": "b"}, "exactly one of 'models' or 'slices'"),
        ({"merge_method": "ties", "models": [{"model": "x", "weight": 1}]}, "unsupported key 'models[0].weight'"),
        (
            {
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}], "residual_weight": 0.5}],
            },
            "unsupported key 'slices[0].residual_weight' (slice residual weights",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [{"model": "x", "layer_range": [0, 2]}]},
                    {"sources": [{"model": "x", "layer_range": [3, 4]}]},
                ],
            },
            "expected 2",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [{"sources": [{"model": "x", "layer_range": [0, 2]}, {"model": "y", "layer_range": [2, 4]}]}],
            },
            "share one layer_range",
        ),
        ({**BASIC, "tokenizer_source": "union"}, "tokenizer_source 'union' is not supported"),
    ],
)
def test_invalid_recipes_name_the_field(data, message):
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, "exp.yml")
    assert str(e.value).startswith("exp.yml: ") and message in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """YAML whose aliases stand for width ** levels values in a few hundred bytes ("billion laughs")."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmerge_method: *a{levels - 1}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (alias_bomb(), "its aliases (*name) expand it beyond 100,000 values (a YAML alias bomb?); refusing to read it"),
        ("merge_method: &a [*a]\n", "an alias (*name) refers to a node that holds it: the document never ends"),
        ("[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply"),
        (b"merge_method: \xff\xfe\n", "not UTF-8 text"),
    ],
)
def test_yaml_that_would_blow_up_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}: {message}"


def test_aliases_that_expand_a_little_are_read():
    from evomerge.configfile import parse_yaml

    assert parse_yaml(alias_bomb(levels=3), "f.yml", ValueError)["merge_method"] == [[["lol"] * 9] * 9] * 9


def test_gradients_and_filters_resolve_like_mergekit():
    assert resolve_setting(0.3, "x", 0.5) == 0.3
    assert resolve_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert resolve_setting([0.1, 0.5, 0.9], "x", 0.75) == pytest.approx(0.7)
    assert resolve_setting([0.1, 0.5, 0.9], "x", 1.0) == pytest.approx(0.9)
    assert resolve_setting(["a", "b", "c"], "x", 0.6) == "b"  # non-numeric lists select, int(t * (n-1))
    filters = [
        FilterValue(filter="self_attn", value=0.2),
        FilterValue(filter="mlp", value=[0.0, 1.0]),
        FilterValue(value=0.9),
    ]
    assert resolve_setting(filters, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.2
    assert resolve_setting(filters, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_setting(filters, "model.norm.weight", 0.5) == 0.9
    assert resolve_setting(filters[:2], "model.norm.weight", 0.5) is None


def test_tensor_positions_models_and_slices():
    assert layer_index("model.layers.12.mlp.down_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    plan = RecipePlan(parse_recipe(BASIC), num_layers=4)
    assert plan.position("model.layers.0.mlp.up_proj.weight") == (0, 0.0, 0.0)
    assert plan.position("model.layers.3.mlp.up_proj.weight") == (0, 1.0, 1.0)
    assert plan.position("model.embed_tokens.weight") == (0, 0.0, 0.0)
    assert plan.position("lm_head.weight") == (0, 0.0, 1.0)  # after the layers: t = 0 (as mergekit), depth 1
    sliced = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "slices": [
                {
                    "sources": [
                        {"model": "b", "layer_range": [0, 3]},
                        {"model": "x", "layer_range": [0, 3], "parameters": {"weight": [0.0, 1.0]}},
                    ]
                },
                {
                    "sources": [
                        {"model": "b", "layer_range": [3, 4]},
                        {"model": "x", "layer_range": [3, 4], "parameters": {"weight": 0.4}},
                    ]
                },
            ],
        }
    )
    plan = RecipePlan(sliced, num_layers=4)
    assert plan.position("model.layers.1.self_attn.o_proj.weight")[:2] == (0, 0.5)
    assert plan.position("model.layers.3.self_attn.o_proj.weight")[:2] == (1, 1.0)  # one-layer slice: t = 1
    assert plan.resolve("model.layers.1.self_attn.o_proj.weight").per_model[0]["weight"] == pytest.approx(0.5)
    assert plan.resolve("model.layers.3.self_attn.o_proj.weight").per_model[0]["weight"] == pytest.approx(0.4)
    assert plan.resolve("lm_head.weight").per_model[0]["weight"] == pytest.approx(0.4)  # last slice, t = 0
    assert plan.inputs == ["x"]
