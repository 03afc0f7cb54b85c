"""Merge operators against mergekit's merge_state_dicts and hand-computed values."""

import pytest
import torch

from evomerge.merge.apply import compute_tensor
from evomerge.merge.plan import RecipePlan
from evomerge.merge.registry import METHODS, MergeError
from evomerge.recipe import parse_recipe

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")

NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
]
SHAPES = [(40, 16), (16, 16), (32, 16), (16,)]


def _states(n_experts=3, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in zip(NAMES, SHAPES)}
    experts = {
        f"e{i}": {n: t + scale * torch.randn(t.shape, generator=g) for n, t in base.items()} for i in range(n_experts)
    }
    return base, experts


def _ours(method, base, experts, params_global, params_model, seed=0):
    models = [{"model": "base"}] + [{"model": m, "parameters": params_model.get(m, {})} for m in experts]
    if not METHODS[method].base_is_origin:
        models[0]["parameters"] = params_model.get("base", {})
    recipe = parse_recipe(
        {
            "merge_method": method,
            "base_model": "base",
            "models": models,
            "parameters": params_global,
            "evomerge": {"seed": seed},
        }
    )
    plan = RecipePlan(recipe, num_layers=2)
    out = {}
    for name in NAMES:
        inputs = [experts[m][name] for m in plan.inputs if m != "base"]
        if not METHODS[method].base_is_origin:
            inputs = [base[name] if m == "base" else experts[m][name] for m in plan.inputs]
        out[name] = compute_tensor(plan, name, base[name], inputs=inputs)
    return out


def _theirs(method, base, experts, params_global, params_model):
    models = {"base": base, **experts}
    params = dict(params_global)
    for key in {k for p in params_model.values() for k in p}:
        default = METHODS[method].param(key).default
        params[key] = {m: params_model.get(m, {}).get(key, default) for m in experts}
        if "base" in params_model:
            params[key]["base"] = params_model["base"][key]
    return mergekit_api.merge_state_dicts(models, method, parameters=params, base="base")


DETERMINISTIC = [
    ("linear", {}, {"base": {"weight": 0.2}, "e0": {"weight": 0.5}, "e1": {"weight": 0.3}, "e2": {"weight": 1.0}}),
    (
        "linear",
        {"normalize": False},
        {"base": {"weight": 0.2}, "e0": {"weight": 0.5}, "e1": {"weight": 0.3}, "e2": {"weight": 0.1}},
    ),
    ("task_arithmetic", {"lambda": 0.8}, {"e0": {"weight": 0.5}, "e1": {"weight": -0.3}, "e2": {"weight": 1.2}}),
    ("task_arithmetic", {"normalize": True}, {"e0": {"weight": 0.5}, "e1": {"weight": 0.3}, "e2": {"weight": 1.2}}),
    (
        "ties",
        {},
        {
            "e0": {"weight": 0.5, "density": 0.3},
            "e1": {"weight": 0.7, "density": 0.6},
            "e2": {"weight": 1.0, "density": 0.9},
        },
    ),
    (
        "ties",
        {"normalize": False, "rescale": True, "lambda": 1.3},
        {
            "e0": {"weight": 0.5, "density": 0.3},
            "e1": {"weight": 0.7, "density": 0.5},
            "e2": {"weight": 1.0, "density": 0.05},
        },
    ),
    (
        "breadcrumbs",
        {},
        {
            "e0": {"weight": 0.5, "density": 0.7, "gamma": 0.05},
            "e1": {"weight": 0.7, "density": 0.8, "gamma": 0.1},
            "e2": {"weight": 0.4, "density": 0.95, "gamma": 0.2},
        },
    ),
    (
        "breadcrumbs_ties",
        {"rescale": True},
        {
            "e0": {"weight": 0.5, "density": 0.7, "gamma": 0.05},
            "e1": {"weight": 0.7, "density": 0.8, "gamma": 0.01},
            "e2": {"weight": 0.4, "density": 0.5},
        },
    ),
    ("model_stock", {}, {}),
    ("model_stock", {"filter_wise": True}, {}),
]


@pytest.mark.parametrize("method,global_params,model_params", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(method, global_params, model_params):
    base, experts = _states()
    ours = _ours(method, base, experts, global_params, model_params)
    theirs = _theirs(method, base, experts, global_params, model_params)
    for name in NAMES:
        torch.testing.assert_close(ours[name], theirs[name].float(), rtol=1e-5, atol=1e-6, msg=f"{method} {name}")


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_mergekit(t):
    base, experts = _states(n_experts=1, scale=0.5)
    ours = _ours("slerp", base, experts, {"t": t}, {})
    theirs = _theirs("slerp", base, experts, {"t": t}, {})
    for name in NAMES:
        torch.testing.assert_close(ours[name], theirs[name].float(), rtol=1e-5, atol=1e-6)


def test_slerp_parallel_inputs_fall_back_to_linear_and_hand_values():
    base = {n: torch.ones(s) for n, s in zip(NAMES, SHAPES)}
    experts = {"e0": {n: 3 * t for n, t in base.items()}}  # parallel to the base
    ours = _ours("slerp", base, experts, {"t": 0.25}, {})
    assert torch.allclose(ours[NAMES[0]], torch.full(SHAPES[0], 1.5))  # 0.75*1 + 0.25*3
    # Orthogonal unit vectors: slerp at t=0.5 is (a + b) / sqrt(2).
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    from evomerge.merge.kernel import merge_tensor
    from evomerge.merge.stats import DeltaStats

    slerped = merge_tensor(METHODS["slerp"], a, [DeltaStats(b - a, 0)], {"t": 0.5}, [{}])
    assert torch.allclose(slerped, torch.tensor([1.0, 1.0]) / 2**0.5)


def test_ties_by_hand():
    """Two experts, density 0.5, weights 1: trim, elect signs by sum, mean over agreeing entries."""
    base = {n: torch.zeros(s) for n, s in zip(NAMES, SHAPES)}
    d0 = torch.tensor([4.0, -1.0, 0.5, -3.0] * 4)
    d1 = torch.tensor([-2.0, 3.0, 0.1, -4.0] * 4)
    experts = {
        "e0": {n: torch.zeros(s) for n, s in zip(NAMES, SHAPES)},
        "e1": {n: torch.zeros(s) for n, s in zip(NAMES, SHAPES)},
    }
    experts["e0"]["model.norm.weight"], experts["e1"]["model.norm.weight"] = d0, d1
    out = _ours(
        "ties", base, experts, {}, {"e0": {"weight": 1.0, "density": 0.5}, "e1": {"weight": 1.0, "density": 0.5}}
    )
    # Top half by magnitude: e0 keeps 4, -3 (x4); e1 keeps 3, -4 (and -2 ties below). Signs: +, +, -, -.
    expected = torch.tensor([4.0, 3.0, 0.0, -3.5] * 4)
    assert torch.allclose(out["model.norm.weight"], expected)


RANDOM = [
    (
        "dare_linear",
        {},
        {
            "e0": {"weight": 0.6, "density": 0.4},
            "e1": {"weight": 0.5, "density": 0.7},
            "e2": {"weight": 0.3, "density": 0.9},
        },
    ),
    (
        "dare_ties",
        {},
        {
            "e0": {"weight": 0.6, "density": 0.5},
            "e1": {"weight": 0.5, "density": 0.7},
            "e2": {"weight": 0.3, "density": 0.9},
        },
    ),
    (
        "della",
        {},
        {
            "e0": {"weight": 0.6, "density": 0.5, "epsilon": 0.2},
            "e1": {"weight": 0.5, "density": 0.7},
            "e2": {"weight": 0.3, "density": 0.6, "epsilon": 0.05},
        },
    ),
    (
        "della_linear",
        {},
        {
            "e0": {"weight": 0.6, "density": 0.5, "epsilon": 0.2},
            "e1": {"weight": 0.5, "density": 0.7},
            "e2": {"weight": 0.3, "density": 0.6},
        },
    ),
]


@pytest.mark.parametrize("method,global_params,model_params", RANDOM)
def test_random_methods_match_mergekit_in_expectation_and_reproduce_by_seed(method, global_params, model_params):
    base, experts = _states()
    draws = 150
    ours = [_ours(method, base, experts, global_params, model_params, seed=s) for s in range(draws)]
    torch.manual_seed(1234)
    theirs = [_theirs(method, base, experts, global_params, model_params) for _ in range(draws)]
    for name in NAMES:
        ours_d = torch.stack([o[name] for o in ours]).double().flatten(1)
        theirs_d = torch.stack([t[name].float() for t in theirs]).double().flatten(1)
        # Per-entry z-scores of the difference of means; for a true match, sum z^2 ~ chi^2(k).
        se = (ours_d.var(0) / draws + theirs_d.var(0) / draws).sqrt()
        live = se > 1e-12
        z2 = ((ours_d.mean(0) - theirs_d.mean(0))[live] / se[live]) ** 2
        k = int(live.sum())
        assert k > 0
        assert z2.sum() < k + 4 * (2 * k) ** 0.5, f"{method} {name}: chi2 {z2.sum():.1f} over {k} entries"
    again = _ours(method, base, experts, global_params, model_params, seed=7)
    for name in NAMES:
        assert torch.equal(again[name], ours[7][name])  # bit-for-bit with the same seed
    assert not torch.equal(ours[0][NAMES[1]], ours[1][NAMES[1]])  # and the seed matters


def test_dare_keeps_about_density_and_restores_the_l1_norm():
    base = {n: torch.zeros(s) for n, s in zip(NAMES, SHAPES)}
    experts = {"e0": {n: torch.ones(s) for n, s in zip(NAMES, SHAPES)}}
    out = _ours("dare_linear", base, experts, {}, {"e0": {"weight": 1.0, "density": 0.25}}, seed=3)
    t = out["model.embed_tokens.weight"]
    kept = t != 0
    assert torch.allclose(t[kept], torch.full_like(t[kept], t.numel() / kept.sum().item()))  # L1 restored (~1/density)
    assert abs(kept.float().mean().item() - 0.25) < 0.06


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_selection_without_a_sort_is_exact(dtype, monkeypatch):
    """The k-th largest magnitude by bit-pattern histograms (any device) and by numpy's introselect
    (CPU float32) equal a full sort's, with zeros, ties and signs; a 16-bit row rank by numpy's radix
    sort equals torch's stable sort."""
    from evomerge.merge import chunks, stats

    monkeypatch.setattr(chunks, "BLOCK", 1000)  # several blocks
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(5003, generator=g) * 0.01).to(dtype)
    t[:50] = 0
    t[50:100] = t[100:150]
    t[200] = -t[201]
    desc = t.float().abs().sort(descending=True).values
    for k in (1, 2, 50, 149, 2500, 4953, 4954, 5003):
        assert stats.kth_largest_magnitude(t, k) == float(desc[k - 1]), k
        assert stats.DeltaStats(t, 0).kth_largest(k) == float(desc[k - 1]), k
    rows = t[:5000].reshape(50, 100)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(100).expand_as(order)).float() / 99
    assert torch.equal(stats.della_rank(rows), ranks)


def test_lines_scales_the_merged_delta_linearly_with_depth():
    base = {n: torch.zeros(s) for n, s in zip(NAMES, SHAPES)}
    experts = {"e0": {n: torch.ones(s) for n, s in zip(NAMES, SHAPES)}}
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [{"model": "e0", "parameters": {"weight": 1.0}}],
            "evomerge": {"lines": {"alpha": 0.2, "beta": 0.6}},
        }
    )
    plan = RecipePlan(recipe, num_layers=2)
    got = {n: compute_tensor(plan, n, base[n], inputs=[experts["e0"][n]]).flatten()[0].item() for n in NAMES}
    assert got == pytest.approx({NAMES[0]: 0.2, NAMES[1]: 0.2, NAMES[2]: 0.8, NAMES[3]: 0.8})


def test_parameter_validation_errors():
    def plan(data, layers=2):
        return RecipePlan(parse_recipe(data), layers)

    with pytest.raises(MergeError, match="unknown merge method 'tie'; valid: .*ties"):
        plan({"merge_method": "tie", "base_model": "b", "models": [{"model": "a"}]})
    with pytest.raises(MergeError, match="unknown parameter 'densty' for ties; valid: density"):
        plan({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"densty": 0.5}}]})
    p = plan(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a", "parameters": {"density": 1.5, "weight": 1}}],
        }
    )
    with pytest.raises(MergeError, match=r"'density' = 1.5 is outside \[0.0, 1.0\]"):
        p.resolve(NAMES[1])
    p = plan({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"density": 0.5}}]})
    with pytest.raises(MergeError, match="missing required parameter 'weight'"):
        p.resolve(NAMES[1])
    with pytest.raises(MergeError, match="slerp takes 1 to 1 models"):
        plan(
            {
                "merge_method": "slerp",
                "base_model": "b",
                "models": [{"model": "a"}, {"model": "c"}],
                "parameters": {"t": 0.5},
            }
        )
    with pytest.raises(MergeError, match="needs a base_model"):
        plan({"merge_method": "ties", "models": [{"model": "a"}]})
