"""Linear: the weighted average of the inputs' weights (Model soups)."""

from __future__ import annotations

from evomerge.merge.registry import MergeError, Param, merge_method


@merge_method(
    "linear",
    (Param("weight", per_model=True), Param("normalize", per_model=False, default=True, kind=bool)),
    "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482",
    base_is_origin=False,
)
def linear(method, base, stats, shared, per_model):
    """Weighted average of the inputs (normalized by the weights' sum unless normalize=false), each
    input's own weights formed in float32 first, as mergekit ``linear`` sums them.

    Reference: Wortsman et al., "Model soups", ICML 2022, arXiv:2203.05482; mergekit ``linear``.
    """
    import torch  # here, not at import: the declaration above is read without torch

    from evomerge.merge.chunks import f32, scratch
    from evomerge.merge.kernel import Chunks

    weights = [float(p["weight"]) for p in per_model]
    total, normalize = sum(weights), shared.get("normalize", True)
    if normalize and total == 0:
        raise MergeError("linear: the weights sum to 0, cannot normalize")
    flat_base, dev = base.reshape(-1), base.device

    def mix(a: int, b: int) -> torch.Tensor:
        acc = scratch("acc", b - a, dev).zero_()
        x = scratch("x", b - a, dev)
        base_chunk = f32(flat_base, a, b, scratch("base", b - a, dev))
        for s, w in zip(stats, weights):
            torch.add(base_chunk, s.chunk(a, b, x), out=x)  # the input's own weights, in float32
            acc.add_(x, alpha=w)
        return acc.div_(total) if normalize else acc

    return Chunks(mix, weights=True)
