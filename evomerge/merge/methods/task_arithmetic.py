"""Generalized task arithmetic: each input's task vector masked (by magnitude, a band below the
outliers, or a seeded random drop), weighted, optionally sign-elected and normalized, scaled by
lambda; and Consensus Merging's TALL masks on top. Task arithmetic, TIES, DARE, Breadcrumbs, DELLA,
DAREx-q and Consensus TA/TIES are variants of this one kernel.

Elementwise in mergekit's order of operations, so results agree bit for bit (its
``merge_state_dicts`` is the test oracle); chunked so that every intermediate lives in a reused
cache-sized buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

from evomerge.merge.registry import MergeError, Method, Param, Sparsifier, register


@dataclass(frozen=True)
class Variant:
    """What distinguishes one task-vector method from another."""

    #: How each delta is sparsified (None: kept whole), and whether signs are elected (TIES).
    sparsify: Sparsifier | None = None
    consensus: bool = False
    #: Keep only the entries that at least k inputs' TALL masks mark as important (Consensus Merging).
    tall: bool = False
    #: Rescale a random drop by 1/q, q searched per input (DAREx-q), instead of restoring the L1 norm.
    rescale_q: bool = False


def task_vector(variant: Variant, method, base, stats, shared, per_model):
    """Generalized task arithmetic: mask, weight, optionally elect signs, normalize, scale by lambda.

    References: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089;
    Yadav et al., "TIES-Merging", NeurIPS 2023, arXiv:2306.01708 (trim, elect sign by sum, disjoint
    mean); Yu et al., "Language Models are Super Mario" (DARE), ICML 2024, arXiv:2311.03099;
    Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024, arXiv:2312.06795; Deep et al.,
    "DELLA-Merging", arXiv:2406.11617 (MAGPRUNE); mergekit's generalized task arithmetic.
    """
    from evomerge.merge.kernel import Chunks  # here, not at import: declarations are read without torch
    from evomerge.merge.masks import mask_for

    rescale, lam = bool(shared.get("rescale", False)), float(shared["lambda"])
    # DAREx-q: the rescale 1/q is folded into the weight (it applies to whatever the mask keeps)
    weights = [float(p["weight"]) / (float(p["q"]) if variant.rescale_q else 1.0) for p in per_model]
    masks = [mask_for(variant.sparsify, s, p, rescale) for s, p in zip(stats, per_model)]
    # random masks: no exact order of operations to keep, so fold the rescale and the weight
    masks = [replace(m, scale=(m.scale or 1.0) * w) if m.mode == "drop" else m for m, w in zip(masks, weights)]
    k = int(shared["k"]) if variant.tall else 0
    if k > len(stats):
        raise MergeError(f"{method.name}: k = {k} is larger than the number of experts ({len(stats)})")
    mix = partial(_mix, variant, stats, masks, weights, per_model, shared, k, lam, base.device)
    return Chunks(mix)


def _mix(variant: Variant, stats, masks, weights, per_model, shared, k: int, lam: float, dev, a: int, b: int):
    """The mixed task vector on flat range [a, b), scaled by lambda."""
    import torch

    from evomerge.merge.chunks import scratch
    from evomerge.merge.masks import masked

    normalize, L = bool(shared["normalize"]), b - a
    c, tmp, acc = scratch("c", L, dev), scratch("tmp", L, dev), scratch("acc", L, dev).zero_()
    if variant.consensus:
        pos, neg = scratch("pos", L, dev).zero_(), scratch("neg", L, dev).zero_()
        if normalize:
            wpos, wneg = scratch("wpos", L, dev).zero_(), scratch("wneg", L, dev).zero_()
    for m, s, w in zip(masks, stats, weights):
        masked(m, s, a, b, c, tmp)
        if m.mode != "drop":  # deterministic: (delta * mask) * rescale, then * weight, as mergekit
            c.mul_(w)
        acc.add_(c)
        if variant.consensus:
            pos.add_(torch.clamp(c, min=0, out=tmp))
            neg.add_(torch.clamp(c, max=0, out=tmp))
            if normalize:
                wpos.add_(torch.gt(c, 0, out=tmp), alpha=w)
                wneg.add_(torch.lt(c, 0, out=tmp), alpha=w)
    if variant.consensus:
        # Elect each entry's sign by the sum of weighted deltas (TIES "sum"), keep the entries
        # that agree: with g = [sum >= 0] in {0, 1}, p*g + n*(1-g) selects exactly.
        g = torch.ge(acc, 0, out=acc)
        notg = torch.sub(1.0, g, out=c)
        mixed = pos.mul_(g).add_(neg.mul_(notg))
        if normalize:
            divisor = wpos.mul_(g).add_(wneg.mul_(notg))
            divisor.add_(torch.eq(divisor, 0, out=tmp))  # 0 -> 1, as mergekit
            mixed.div_(divisor)
    else:
        mixed = acc
        if normalize:
            total = sum(float(p["weight"]) for p in per_model)
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    if variant.tall:
        _consensus_mask(mixed, stats, per_model, k, a, b, c, tmp)
    return mixed.mul_(lam) if lam != 1 else mixed


def _consensus_mask(merged, stats, per_model, k: int, a: int, b: int, x, tmp) -> None:
    """Consensus Merging on flat range [a, b): zero the entries of ``merged`` (the multi-task vector
    tau_MTL) that fewer than ``k`` inputs' TALL masks mark. Input t's mask is
    ``|w_t tau_t| >= tall_lambda_t * |tau_MTL - w_t tau_t|``: its own (weighted, untrimmed) task
    vector outweighs the rest of the merge there. ``x`` and ``tmp``: chunk-sized scratch."""
    import torch

    from evomerge.merge.chunks import scratch

    count = scratch("count", b - a, merged.device).zero_()
    for s, p in zip(stats, per_model):
        d = s.chunk(a, b, x)
        torch.mul(d, float(p["weight"]), out=x)
        torch.sub(merged, x, out=tmp).abs_().mul_(float(p["tall_lambda"]))
        count.add_(torch.ge(x.abs_(), tmp, out=tmp))
    merged.mul_(torch.ge(count, k, out=count))


# --- the family's declarations --------------------------------------------------------------------


def _params(normalize: bool, rescale: bool, sparsify: Sparsifier | None) -> tuple[Param, ...]:
    params = [
        Param("weight", per_model=True),
        Param("normalize", per_model=False, default=normalize, kind=bool),
        Param("rescale", per_model=False, default=rescale, kind=bool),
        Param("lambda", per_model=False, default=1.0),
    ]
    if sparsify:
        params.append(Param("density", per_model=True, default=1.0, low=0.0, high=1.0))
    if sparsify == "outliers":
        params.append(Param("gamma", per_model=True, default=0.01, low=0.0, high=1.0))
    if sparsify == "della":
        params.append(Param("epsilon", per_model=True, default=0.15, low=0.0, high=0.5))
    return tuple(params)


def _declare(name, reference, sparsify=None, consensus=False, normalize=False, rescale=False) -> Method:
    variant = Variant(sparsify, consensus)
    return register(Method(name, _params(normalize, rescale, sparsify), reference, partial(task_vector, variant)))


#: Consensus Merging's parameters: the TALL masks' lambda per input, and k (masks that must agree).
_TALL_PARAMS = (
    Param("tall_lambda", per_model=True, default=0.4, low=0.0),
    Param("k", per_model=False, default=2, kind=int, low=1, counts_models=True),
)
_CONSENSUS_REFERENCE = (
    'Wang et al., "Localizing Task Information for Improved Model Merging and Compression" '
    "(TALL masks, Consensus Merging), ICML 2024, arXiv:2405.07813"
)
_DARE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099"
_BREADCRUMBS = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795"
_DELLA = "Deep et al., DELLA-Merging, arXiv:2406.11617"


def _consensus(name: str, sparsify: Sparsifier | None, consensus: bool) -> Method:
    variant = Variant(sparsify, consensus, tall=True)
    params = _params(False, False, sparsify) + _TALL_PARAMS
    kernel = partial(task_vector, variant)
    return register(Method(name, params, _CONSENSUS_REFERENCE, kernel, min_models=2, in_mergekit=False))


_declare("task_arithmetic", "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089")
_declare("ties", "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708", "magnitude", True, normalize=True)
_declare("dare_ties", _DARE, "random", consensus=True, rescale=True)
_declare("dare_linear", _DARE, "random", rescale=True)
_declare("breadcrumbs", _BREADCRUMBS, "outliers")
_declare("breadcrumbs_ties", _BREADCRUMBS, "outliers", consensus=True)
_declare("della", _DELLA, "della", consensus=True, normalize=True, rescale=True)
_declare("della_linear", _DELLA, "della", rescale=True)
_consensus("consensus_ta", None, consensus=False)
# TIES's disjoint sum (normalize false), as the reference builds tau_MTL; tall_lambda's range
# (0.2-0.6 in the paper) was tuned against it
_consensus("consensus_ties", "magnitude", consensus=True)
register(
    Method(
        "darex",
        (
            Param("weight", per_model=True),
            Param("normalize", per_model=False, default=False, kind=bool),
            Param("lambda", per_model=False, default=1.0),
            Param("density", per_model=True, default=1.0, low=0.0, high=1.0),
            Param("q", per_model=True, low=1e-3, high=1.0),
        ),
        'Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models" '
        "(DAREx-q), ICLR 2025, arXiv:2410.09344",
        partial(task_vector, Variant("random", rescale_q=True)),
        in_mergekit=False,
    )
)
