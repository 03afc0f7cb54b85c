"""The merge of one tensor, done once for every method: chunking, the output buffer, adding the
base and the LiNeS step around a method's kernel (``evomerge.merge.registry``).

A kernel gives either the whole merged tensor (slerp, Model Stock: they need whole-tensor norms) or
``Chunks``: the mixed task vector (or the merged weights) of one flat range at a time, built in
reused chunk-sized float32 buffers so that no temporary of the tensor's size is allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.chunks import blocks, chunk_for
from evomerge.merge.registry import Method
from evomerge.merge.stats import DeltaStats


@dataclass(frozen=True)
class Chunks:
    """A kernel's merge of one tensor, chunk by chunk: ``mix(a, b)`` is flat range [a, b) of the
    mixed task vector (``weights`` False: the base is added after) or of the merged weights (True),
    float32, in a buffer the caller may overwrite."""

    mix: Callable[[int, int], torch.Tensor]
    weights: bool = False


def lines_step(merged: torch.Tensor, base: torch.Tensor, scale: float | None) -> torch.Tensor:
    """LiNeS on float32 ``merged`` in place: base + scale * (merged - base)."""
    return merged if scale is None else merged.sub_(base).mul_(scale).add_(base)


def merge_tensor(
    method: Method,
    base: torch.Tensor,
    stats: list[DeltaStats],
    shared: dict[str, Any],
    per_model: list[dict[str, Any]],
    out: torch.Tensor | None = None,
    lines: float | None = None,
) -> torch.Tensor:
    """Merge one tensor from the inputs' task vectors against ``base`` (16- or 32-bit, read as
    float32). The result is float32, or written into ``out``: a contiguous tensor of base's shape,
    any float dtype (each entry is rounded once, from float32).

    ``per_model[i]`` holds input i's resolved parameters. Where the base is not the origin (linear),
    an input that is the base itself is a zero task vector. ``lines``: the LiNeS post-step's scale of
    the merged task vector (``merged - base``), applied in float32 before any rounding.
    """
    lines = None if lines == 1.0 else lines
    merged = method.kernel(method, base, stats, shared, per_model)
    if not isinstance(merged, Chunks):
        merged = lines_step(merged, base.float(), lines)
        return merged if out is None else out.copy_(merged)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device) if out is None else out
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    for a, b in blocks(base.numel(), chunk_for(base.device)):
        mixed, base_chunk = merged.mix(a, b), flat_base[a:b]
        if merged.weights:
            flat_out[a:b].copy_(lines_step(mixed, base_chunk, lines))
        elif lines is None:
            torch.add(base_chunk, mixed, out=flat_out[a:b])  # in float32 (mixed is), rounded once into out
        else:
            flat_out[a:b].copy_(lines_step(mixed.add_(base_chunk), base_chunk, lines))
    return out
