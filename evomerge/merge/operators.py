"""Merge operators: pure functions over tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``base + sum_i weights[i] * (experts[i] - base)``, computed in float32, returned in base's dtype.

    Reference: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).
    """
    if len(experts) != len(weights):
        raise ValueError(f"{len(experts)} experts but {len(weights)} weights")
    acc = base.float().clone()
    for expert, w in zip(experts, weights):
        acc.add_(expert.float() - base.float(), alpha=float(w))
    return acc.to(base.dtype)
