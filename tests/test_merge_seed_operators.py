"""PCB-Merging, Consensus Merging (TALL masks) and DAREx-q: against hand-computed values, against a
whole-tensor transcription of the papers' equations, and against FusionBench's numbers."""

import pytest
import torch
import yaml

import evomerge.merge.chunks as chunks
import evomerge.merge.methods.pcb as pcb
import evomerge.merge.stats as merge_stats
from evomerge.merge.kernel import merge_tensor
from evomerge.merge.plan import RecipePlan
from evomerge.merge.registry import METHODS, MergeError
from evomerge.merge.stats import DeltaStats
from evomerge.recipe import parse_recipe


def merge(method, deltas, shared=None, per_model=None, base=None, seed=0):
    m = METHODS[method]
    shared = {p.name: p.default for p in m.shared_params} | (shared or {})
    per_model = per_model or [{} for _ in deltas]
    per_model = [{p.name: p.default for p in m.model_params} | q for q in per_model]
    base = torch.zeros_like(deltas[0]) if base is None else base
    stats = [DeltaStats(d.clone(), merge_stats.field_seed(seed, "t", i)) for i, d in enumerate(deltas)]
    return merge_tensor(m, base, stats, shared, per_model)


@pytest.fixture
def small_blocks(monkeypatch):
    """Chunks and selection blocks much smaller than the tensors: every chunked path crosses boundaries."""
    monkeypatch.setattr(chunks, "CHUNK", 96)
    monkeypatch.setattr(chunks, "BLOCK", 200)


# --- PCB ----------------------------------------------------------------------------------------


def pcb_by_the_equations(deltas, densities, weights, lam):
    """PCB on whole flattened tensors, sorting everything (arXiv:2410.02396 and its reference code)."""
    x = torch.stack([d.reshape(-1).double() for d in deltas])
    n, N = x.shape
    mags = x.abs()
    srt = mags.sort(dim=1).values
    lo = srt[:, int(N * 1e-4)].unsqueeze(1)
    hi = srt[:, int(N * (1 - 1e-4)) - 1].unsqueeze(1)
    a = torch.minimum(torch.maximum(mags, lo), hi)
    intra = torch.exp(n * ((a - lo) / (hi - lo)) ** 2)
    inter = torch.tanh(x * x.sum(0))
    beta = intra * inter
    scales = []
    for i in range(n):
        b = beta[i]
        t, top = b.sort().values[int(N * (1 - densities[i]))], b.max()
        scales.append((b.clamp(t, top) - t) / (top - t))
    s = torch.stack(scales)
    w = torch.tensor(weights, dtype=torch.float64).unsqueeze(1)
    merged = (w * s * torch.sign(x) * a).sum(0) / s.sum(0).clamp(min=1e-12)
    return (lam * merged).reshape(deltas[0].shape)


@pytest.mark.parametrize("densities", [(0.2, 0.2, 0.2), (0.5, 0.1, 0.9), (1.0, 0.3, 0.05)])
def test_pcb_equals_the_equations(densities, small_blocks):
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(37, 23, generator=g) * s for s in (0.01, 0.02, 0.015)]
    weights = [1.0, 0.7, 1.3]
    got = merge("pcb", deltas, {"lambda": 0.8}, [{"density": p, "weight": w} for p, w in zip(densities, weights)])
    expected = pcb_by_the_equations(deltas, densities, weights, 0.8)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-9)
    kept = (got != 0).float().mean().item()
    assert kept <= min(1.0, sum(densities)) + 1e-9  # an entry no input keeps stays at the base


def test_pcb_by_hand_on_two_inputs():
    """Two inputs of 4 entries, density 0.5 (the two best-balanced entries of each are kept).

    N = 4: the clip keeps ascending ranks 0..2, so hi is the 3rd smallest magnitude.
    d0 = [2, -1, 0.5, 3]: lo 0.5, hi 2, a0 = [2, 1, 0.5, 2], norm = [1, 1/3, 0, 1].
    d1 = [1, 1, -1, 0.5]: lo 0.5, hi 1, a1 = [1, 1, 1, 0.5], norm = [1, 1, 1, 0].
    sum = [3, 0, -0.5, 3.5]; inter_0 = tanh([6, 0, -0.25, 10.5]), inter_1 = tanh([3, 0, 0.5, 1.75]).
    beta_0 = [e^2 tanh 6, 0, tanh(-0.25), e^2 tanh 10.5]: kept entries 3 and 0 (t = beta_0[0]).
    beta_1 = [e^2 tanh 3, 0, e^2 tanh 0.5, tanh 1.75]: kept entries 0 and 2 (t = beta_1[2]).
    Entry 0: s0 = 0 (at the threshold), s1 = 1 -> 1 * a1 = 1. Entry 3: s0 = 1 only -> 2.
    Entry 2: s1 = 0 -> nothing kept -> 0. Entry 1: 0.
    """
    d0 = torch.tensor([2.0, -1.0, 0.5, 3.0])
    d1 = torch.tensor([1.0, 1.0, -1.0, 0.5])
    got = merge("pcb", [d0, d1], {}, [{"density": 0.5}, {"density": 0.5}])
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.0, 2.0])


def test_pcb_leaves_out_an_input_whose_balance_cannot_be_normalized():
    """A zero task vector's balance is 0 everywhere (T == t; the reference code gives NaN): it takes
    no part, so d alone is merged: sign(d) clip(|d|, 0.5, 2) where its balance is above the lowest."""
    d = torch.tensor([1.0, -2.0, 3.0, 0.5])
    got = merge("pcb", [d, torch.zeros(4)], {}, [{"density": 1.0}, {"density": 1.0}])
    assert got.tolist() == [1.0, -2.0, 2.0, 0.0]


def test_signed_selection_without_a_sort_is_exact(monkeypatch):
    monkeypatch.setattr(chunks, "BLOCK", 700)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3001, generator=g)
    v[:40] = 0.0
    v[40:80] = -0.0
    v[100:150] = v[150:200]
    v[300] = float("-inf")
    v[301] = 1e30
    fields = [v, -v, v * 1e-20]
    ks = [1, 2, 1500, 3001, 41, 2960]
    for k in ks:
        got, maxima = pcb._kth_largest_values(lambda a, b: [f[a:b] for f in fields], 3001, [k] * 3, torch.device("cpu"))
        assert got == [float(f.sort(descending=True).values[k - 1]) for f in fields], k
        assert maxima == [float(f.max()) for f in fields]


# Reference numbers on three task vectors of shape (4, 5): torch.manual_seed(0), then three
# torch.randn(4, 5), the whole "model" (one tensor, 20 entries). PCB: the authors' implementation
# (github.com/duguodong7/pcb-merging at 5897888, pcb-merging.py PCB_merge(flat_task_checks, ratio),
# whole model flattened) run in float64 on these inputs; merged task vector, lambda 1. Consensus:
# fusion-bench 0.2.33 (pip install fusion-bench, torch 2.13.0 pinned), in float64:
# fusion_bench.method.tall_mask.utils.generate_task_masks(T, T, zeros, tv=tau_MTL,
# tall_mask_lambda=lam), tau_MTL = T.sum(0) (TA) or fusion_bench.method.ties_merging.
# ties_merging_utils.ties_merging(T, reset_thresh=20, merge_func="dis-sum") (TIES), then
# (masks.sum(0) >= 2) * tau_MTL. FusionBench ships no PCB and no consensus step of its own.
REFERENCE = {
    ("pcb", 0.2): [0.0, 2.0819554328918457, 0.0, 2.0819554328918457, 1.9414620399475098, -1.5550950765609741, 0.0,
                   1.85300612449646, 0.0, 0.0, 0.0, 0.0, -1.3253259658813477, 0.0, 0.0, 0.0, -1.4959149360656738, 0.0,
                   1.85300612449646, 1.3252748250961304],
    ("pcb", 0.5): [1.5091218948364258, 2.0819554328918457, 1.525869746554706, 2.0395548118121347, 1.9186139990413338,
                   -1.5550950765609741, 0.0, 1.85300612449646, 1.451342854323113, 1.495914936065674,
                   1.2307560403612323, 0.0, -1.3253259658813477, 1.586334228515625, 0.946298360824585,
                   -0.843676745891571, -1.4959149360656738, 1.2590092420578003, 1.7589119203588561,
                   1.2974563609061678],
    ("consensus_ta", 0.4): [0.8229779005050659, 1.0420064181089401, 2.096925437450409, 0.0, 0.0, -1.213926762342453,
                            -0.934689300134778, 0.0, 0.0, 0.02406121790409088, 0.0, 0.19488397240638733,
                            -0.3015786111354828, 0.47244739532470703, 0.0, -0.8967800736427307, -0.3171619474887848,
                            0.0, 0.0, 0.0],
    ("consensus_ta", 0.6): [0.8229779005050659, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.02406121790409088, 0.0,
                            0.19488397240638733, -0.3015786111354828, 0.47244739532470703, 0.0, -0.8967800736427307,
                            -0.3171619474887848, 0.0, 0.0, 0.0],
    ("consensus_ties", 0.4): [0.0, 0.0, 0.0, 0.0, 1.9414620399475098, -1.5550950765609741, 0.0, 0.0,
                              1.6458669900894165, 1.5419425964355469, 1.4436601400375366, 0.0, -1.3253259658813477,
                              1.586334228515625, 0.0, 0.0, 0.0, 0.0, 0.0, 1.3252748250961304],
    ("consensus_ties", 0.6): [0.0] * 20,
}  # fmt: skip


def reference_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tvs = [torch.randn(4, 5, generator=g) for _ in range(3)]
    assert tvs[0][0, 0].item() == -1.1258398294448853  # the stream the references were computed on
    return tvs


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_against_the_reference_implementations(key, small_blocks):
    method, value = key
    tvs = reference_inputs()
    if method == "pcb":
        got = merge("pcb", tvs, {}, [{"density": value}] * 3)
    elif method == "consensus_ta":
        got = merge(method, tvs, {"k": 2}, [{"weight": 1.0, "tall_lambda": value}] * 3)
    else:  # their TIES keeps the top int(0.2 N) + 1 entries (5 of 20: density 0.25) and sums ("dis-sum")
        got = merge(
            method, tvs, {"k": 2, "normalize": False}, [{"weight": 1.0, "density": 0.25, "tall_lambda": value}] * 3
        )
    assert got.reshape(-1).tolist() == pytest.approx(REFERENCE[key], abs=2e-6)


# --- Consensus Merging (TALL masks) ------------------------------------------------------------


def test_consensus_ta_by_hand():
    """Three task vectors, weights 1, tall_lambda 1: mask_t = |tau_t| >= |tau_MTL - tau_t|.

    tau_MTL = [3, 0.5, 1, -0.2]. Masks: t0 = [1, 1, 1, 0]; t1 = [0, 0, 1, 1]; t2 = [0, 0, 0, 0].
    (entry 2: |0.4| >= |1 - 0.4| is false for t0... see the table below.)
    """
    t0 = torch.tensor([2.0, 1.0, 0.4, 0.1])
    t1 = torch.tensor([0.5, -0.3, 0.7, -0.5])
    t2 = torch.tensor([0.5, -0.2, -0.1, 0.2])
    mtl = t0 + t1 + t2
    masks = [(t.abs() >= (mtl - t).abs()).float() for t in (t0, t1, t2)]
    # by hand: t0 = [2 >= 1, 1 >= 0.5, 0.4 >= 0.6, 0.1 >= 0.3] = [1, 1, 0, 0]
    #          t1 = [0.5 >= 2.5, 0.3 >= 0.8, 0.7 >= 0.3, 0.5 >= 0.3] = [0, 0, 1, 1]
    #          t2 = [0.5 >= 2.5, 0.2 >= 0.7, 0.1 >= 1.1, 0.2 >= 0.4] = [0, 0, 0, 0]
    assert [m.tolist() for m in masks] == [[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    per = [{"weight": 1.0, "tall_lambda": 1.0}] * 3
    k1 = merge("consensus_ta", [t0, t1, t2], {"k": 1}, per)
    assert k1.tolist() == pytest.approx(mtl.tolist())  # every entry is someone's
    k2 = merge("consensus_ta", [t0, t1, t2], {"k": 2}, per)
    assert k2.tolist() == [0.0, 0.0, 0.0, 0.0]  # no entry matters to two tasks
    # a smaller lambda marks more: at 0.2 t0 = [1,1,1,1], t1 = [1,1,1,1], t2 = [1,1,0,1]
    low = [{"weight": 1.0, "tall_lambda": 0.2}] * 3
    k3 = merge("consensus_ta", [t0, t1, t2], {"k": 3, "lambda": 0.5}, low)
    assert k3.tolist() == pytest.approx([1.5, 0.25, 0.0, -0.1])


def test_consensus_ties_masks_the_ties_merge():
    """consensus_ties = TIES's merged vector (a disjoint sum by default, as the reference), with the
    TALL masks computed against it."""
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(300, generator=g) for _ in range(3)]
    per = [{"weight": w, "density": 0.6, "tall_lambda": lam} for w, lam in ((1.0, 0.3), (0.8, 0.5), (1.2, 0.4))]
    assert METHODS["consensus_ties"].param("normalize").default is False
    ties = merge(
        "ties", deltas, {"normalize": False}, [{k: v for k, v in p.items() if k != "tall_lambda"} for p in per]
    )
    for k in (1, 2, 3):
        got = merge("consensus_ties", deltas, {"k": k}, per)
        marks = sum(
            ((p["weight"] * d).abs() >= p["tall_lambda"] * (ties - p["weight"] * d).abs()).float()
            for d, p in zip(deltas, per)
        )
        assert torch.allclose(got, ties * (marks >= k).float(), atol=1e-7)
    assert (merge("consensus_ties", deltas, {"k": 3}, per) == 0).sum() > (
        merge("consensus_ties", deltas, {"k": 1}, per) == 0
    ).sum()


# --- DAREx-q -----------------------------------------------------------------------------------


def test_darex_rescales_by_one_over_q_with_dares_mask():
    ones = torch.ones(4000)
    dare = merge("dare_linear", [ones], {}, [{"weight": 1.0, "density": 0.1}], seed=4)
    darex = merge("darex", [ones], {}, [{"weight": 1.0, "density": 0.1, "q": 0.25}], seed=4)
    assert torch.equal(dare != 0, darex != 0)  # the same random mask
    assert set(darex[darex != 0].tolist()) == {4.0}  # 1/q, not the L1-restoring ~1/density
    assert abs((darex != 0).float().mean().item() - 0.1) < 0.02
    full = merge("darex", [ones * 0.5, ones], {"lambda": 2.0}, [{"weight": 1.0, "q": 0.5}, {"weight": 0.5, "q": 0.8}])
    assert full.tolist() == pytest.approx([2.0 * (0.5 / 0.5 + 0.5 / 0.8)] * 4000)  # density 1: TA with w/q


# --- bad input ---------------------------------------------------------------------------------


def plan(method, n_models, shared=None, models=None):
    models = models or [{"model": f"e{i}", "parameters": {"weight": 1.0, "q": 0.5}} for i in range(n_models)]
    data = {"merge_method": method, "base_model": "b", "models": models, "parameters": shared or {}}
    if method != "darex":
        for m in data["models"]:
            m["parameters"].pop("q", None)
    return RecipePlan(parse_recipe(data), 2)


def test_bad_input_is_refused_before_any_tensor():
    for method in ("pcb", "consensus_ta", "consensus_ties"):
        with pytest.raises(MergeError, match=f"{method} takes 2 to any models besides the base, got 1"):
            plan(method, 1)
    with pytest.raises(MergeError, match=r"parameters.k: k = 4 is larger than the number of experts \(3\)"):
        plan("consensus_ta", 3, {"k": 4})
    with pytest.raises(MergeError, match=r"parameters.k: k = 3 is larger"):
        plan("consensus_ties", 2, {"k": [{"filter": "mlp", "value": 3}, {"value": 1}]})
    assert plan("consensus_ta", 3, {"k": 3}).method.name == "consensus_ta"
    with pytest.raises(MergeError, match=r"k = 2.5 is larger than the number of experts \(2\)"):
        plan("consensus_ta", 2, {"k": 2.5})  # a count rounds halves up, here as where it is used
    with pytest.raises(MergeError, match="missing required parameter 'q'"):
        plan("darex", 1, models=[{"model": "e0", "parameters": {"weight": 1.0}}]).resolve("model.norm.weight")
    with pytest.raises(MergeError, match=r"'q' = 0.0 is outside"):
        plan("darex", 1, models=[{"model": "e0", "parameters": {"weight": 1.0, "q": 0}}]).resolve("model.norm.weight")


# --- from the command line ---------------------------------------------------------------------


def test_merge_command_writes_the_new_methods_and_refuses_bad_input(zoo, tmp_path):
    from safetensors.torch import load_file
    from test_campaign import cli

    def recipe(method, experts, **shared):
        per = {"weight": 1.0, "density": 0.5, "q": 0.7} if method == "darex" else {"weight": 1.0}
        if method == "consensus_ties":
            per["density"] = 0.6
        data = {
            "merge_method": method,
            "base_model": str(zoo / "base"),
            "models": [{"model": str(zoo / "base")}] + [{"model": str(zoo / e), "parameters": per} for e in experts],
            "parameters": shared,
            "evomerge": {"seed": 2},
        }
        path = tmp_path / f"{method}-{len(experts)}.yml"
        path.write_text(yaml.safe_dump(data))
        return path

    two = ["expert-add", "expert-sort"]
    for method in ("pcb", "consensus_ta", "consensus_ties", "darex"):
        out = tmp_path / method
        result = cli("merge", recipe(method, two), "--out", out, "--quiet", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        merged = load_file(out / "model.safetensors")
        base = load_file(zoo / "base" / "model.safetensors")
        assert any(not torch.equal(merged[k], base[k]) for k in base)
        card = (out / "README.md").read_text()
        assert f"evomerge merge mergekit_config.yml --out OUT` (mergekit has no `{method}` method" in card
    cases = [
        (recipe("pcb", ["expert-add"]), "pcb takes 2 to any models besides the base, got 1"),
        (recipe("consensus_ties", ["expert-add"]), "consensus_ties takes 2 to any models besides the base, got 1"),
        (recipe("consensus_ta", two, k=3), "parameters.k: k = 3 is larger than the number of experts (2)"),
    ]
    for path, message in cases:
        result = cli("merge", path, "--out", tmp_path / "refused", cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()
