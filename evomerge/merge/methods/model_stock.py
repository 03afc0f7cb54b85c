"""Model Stock: the base moved toward the experts' average by their task vectors' mean cosine."""

from __future__ import annotations

from evomerge.merge.registry import Param, merge_method


@merge_method(
    "model_stock",
    (Param("filter_wise", per_model=False, default=False, kind=bool),),
    "Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522",
    min_models=2,
)
def model_stock(method, base, stats, shared, per_model):
    """Interpolate the base toward the experts' average by their task vectors' mean cosine (per row
    with ``filter_wise``, else over the whole tensor).

    Reference: Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
    arXiv:2403.19522; mergekit ``model_stock``.
    """
    import torch  # here, not at import: the declaration above is read without torch

    base = base.float()
    w0, ws, filter_wise = base, [base + s.delta for s in stats], bool(shared["filter_wise"])
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)
