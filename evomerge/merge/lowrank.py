"""A LoRA expert's task vector kept as its factors: ``LowRankDelta`` forms the dense delta of one
tensor on demand, row block by row block, instead of holding it.

Resident per adapted tensor of shape (out, in) at rank r: r * (in + out) elements in the adapter's
dtype (tens of MB per expert at 8B, against 2 B/param for a 16-bit task vector). A merge reads it a
chunk at a time (``chunk``: the row blocks covering the range, formed in float32 on the merge's
device and rounded once to the task-vector dtype); statistics that need the whole tensor (magnitude
thresholds, ranks, norms) read ``dense()``, formed from the same row blocks, so both give the same
values bit for bit. Tensors an adapter does not target have a zero delta with no storage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.merge.chunks import block_for
from evomerge.models.lora import LoraAdapter
from evomerge.models.weights import SafetensorsFile


class LowRankDelta:
    """``B @ A * scaling`` of one tensor (shape (out, in); A (r, in), B (out, r)), its values rounded
    to ``dtype`` (the task-vector dtype). ``a`` None: a zero delta (the adapter does not target it)."""

    def __init__(
        self,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        scaling: float,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ):
        self.a, self.b, self.scaling, self.shape, self.dtype = a, b, float(scaling), torch.Size(shape), dtype
        self._block: tuple[int, torch.Tensor] | None = None  # (index, rows) of the last row block formed
        self._device = a.device if a is not None else torch.device("cpu")

    @classmethod
    def zero(cls, shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> LowRankDelta:
        zero = cls(None, None, 0.0, tuple(shape), dtype)
        zero._device = torch.device(device)
        return zero

    @property
    def is_zero(self) -> bool:
        return self.a is None

    @property
    def device(self) -> torch.device:
        return self._device

    def numel(self) -> int:
        return self.shape.numel()

    def nbytes(self) -> int:
        """Bytes of the factors held."""
        return 0 if self.a is None else self.a.nbytes + self.b.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.a is None else [self.a, self.b]

    def to(self, device: torch.device, non_blocking: bool = False) -> LowRankDelta:
        """This delta for one merge on ``device``: float32 factors there (a few row blocks of scratch
        are formed from them while it lives)."""
        if self.a is None:
            return LowRankDelta.zero(self.shape, self.dtype, device)
        a = self.a.to(device, torch.float32, non_blocking=non_blocking)
        b = self.b.to(device, torch.float32, non_blocking=non_blocking)
        return LowRankDelta(a, b, self.scaling, tuple(self.shape), self.dtype)

    @property
    def _cols(self) -> int:
        return self.shape[-1]

    def _rows_per_block(self) -> int:
        return max(1, block_for(self.device) // self._cols)  # whole rows, about a block: few, large matmuls

    def _rows(self, j: int) -> torch.Tensor:
        """Row block ``j`` (flat, in ``dtype``: formed in float32 and rounded once, as a stored task
        vector is), kept until another is asked for: ranges are read in order."""
        if self._block is not None and self._block[0] == j:
            return self._block[1]
        per = self._rows_per_block()
        b = self.b[j * per : (j + 1) * per]
        rows = torch.matmul(b.float().mul(self.scaling), self.a.float())  # scaling on B: rows x r, not rows x in
        self._block = (j, rows.reshape(-1).to(self.dtype))  # chunk's copy into float32 is exact
        return self._block[1]

    def chunk(self, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
        """Flat entries [a, b) as float32, written into ``out`` (b - a elements)."""
        if self.a is None:
            return out.zero_()
        span = self._rows_per_block() * self._cols
        pos = a
        while pos < b:
            j = pos // span
            rows = self._rows(j)
            take = min(b, j * span + rows.numel()) - pos
            out[pos - a : pos - a + take].copy_(rows[pos - j * span : pos - j * span + take])
            pos += take
        return out

    def dense(self) -> torch.Tensor:
        """The whole delta in ``dtype`` (zero: an expanded scalar, no storage), from the same row blocks
        as ``chunk``."""
        if self.a is None:
            return torch.zeros((), dtype=self.dtype, device=self.device).expand(self.shape)
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        flat, per = out.view(-1), self._rows_per_block()
        for j in range(-(-self.shape[0] // per)):
            rows = self._rows(j)
            start = j * per * self._cols
            flat[start : start + rows.numel()].copy_(rows)
        self._block = None
        return out


def load_factors(adapter: LoraAdapter, shapes: dict[str, tuple[int, ...]]) -> LoraFactors:
    """The adapter's factors of the tensors of ``shapes`` (base tensor name -> shape) it targets, in
    its dtype on the host, ``fan_in_fan_out`` ones transposed at load (to the base's orientation)."""
    source = SafetensorsFile(Path(adapter.weights))
    out = LoraFactors()
    try:
        for name, target in adapter.targets.items():
            if name not in shapes:
                continue
            a, b = source.tensor(target.lora_a), source.tensor(target.lora_b)
            if target.transposed:  # delta = (B A)^T = A^T B^T
                a, b = b.t().contiguous(), a.t().contiguous()
            out[name] = LowRankDelta(a, b, target.scaling, tuple(shapes[name]), a.dtype)
    finally:
        source.close()
    return out


class LoraFactors(dict):
    """A LoRA expert as ``ResidentMerge`` takes it: base tensor name -> ``LowRankDelta`` of the tensors
    its adapter targets (the others have a zero delta), in the adapter's dtype."""


def kept(delta: LowRankDelta | None, shape, dtype: torch.dtype, home: torch.device) -> LowRankDelta:
    """``delta`` (None: zero) as a worker keeps it: factors at ``home`` (pinned on the host when CUDA is
    present), values rounded to ``dtype``."""
    from evomerge.merge.memory import place

    if delta is None or delta.is_zero:
        return LowRankDelta.zero(shape, dtype, home)
    if tuple(delta.shape) != tuple(shape):
        raise ValueError(f"low-rank delta of shape {tuple(delta.shape)} for a tensor of shape {tuple(shape)}")
    return LowRankDelta(place(delta.a, home), place(delta.b, home), delta.scaling, tuple(shape), dtype)
