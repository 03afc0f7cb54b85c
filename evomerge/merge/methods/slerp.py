"""SLERP: spherical interpolation between the base and one other model."""

from __future__ import annotations

import math

from evomerge.merge.registry import Param, merge_method

#: Above this |cos| of the angle the two are (anti)parallel: linear interpolation.
DOT_THRESHOLD = 0.9995
EPS = 1e-8


@merge_method(
    "slerp",
    (Param("t", per_model=False, low=0.0, high=1.0),),
    "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
    min_models=1,
    max_models=1,
)
def slerp(method, base, stats, shared, per_model):
    """Spherical interpolation from ``base`` (t=0) to ``base + delta`` (t=1) over whole tensors,
    linear when the two are (anti)parallel. The angle comes from cached dot products, so a new t
    costs two fused elementwise ops.

    Reference: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; mergekit ``slerp``.
    """
    import torch  # here, not at import: the declaration above is read without torch

    t, other, base = float(shared["t"]), stats[0], base.float()
    if base.numel() == 0:
        return base.clone()
    bd, dd = other.dots(base)
    bb = float(base.reshape(-1).double() @ base.reshape(-1).double())
    na, nb = math.sqrt(bb), math.sqrt(max(bb + 2 * bd + dd, 0.0))
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    dot = max(-1.0, min(1.0, (bb + bd) / (na * nb)))
    if abs(dot) > DOT_THRESHOLD:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return torch.add(base * (ca + cb), other.delta, alpha=cb)  # ca * base + cb * (base + delta)
