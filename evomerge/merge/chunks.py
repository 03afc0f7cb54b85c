"""Chunks and blocks: how the merge loops and the statistics' passes cut a tensor, the reused
chunk-sized buffers, and float64 sums block by block."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch

#: Elements per chunk of the fused merge loops. CPU: the working set (a few float32 buffers) stays
#: in cache. CUDA: large, so that kernel launches do not dominate (scratch: up to 9 buffers x 32 MiB;
#: PCB: 2 per expert + 6, e.g. 448 MiB for 5 experts).
#: Chunks and blocks are multiples of 8 (drop masks are packed into bytes).
CHUNK = int(os.environ.get("EVOMERGE_MERGE_CHUNK", 1 << 16)) // 8 * 8 or 8
CHUNK_CUDA = int(os.environ.get("EVOMERGE_MERGE_CHUNK_CUDA", 1 << 23)) // 8 * 8 or 8
#: Elements per block of the passes that compute one statistic (selection, sums, redrawn fields):
#: few calls per tensor, temporaries bounded by a block.
BLOCK = 1 << 20


def chunk_for(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else CHUNK_CUDA


def block_for(device: torch.device) -> int:
    return max(BLOCK, chunk_for(device))


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    return ((a, min(n, a + size)) for a in range(0, n, size))


def sum64(t: torch.Tensor) -> torch.Tensor:
    """Sum of all entries as a float64 0-dim tensor on t's device, block by block: torch's float64
    sum of a 16/32-bit tensor first copies all of it to float64 (8 B/element)."""
    flat, total = t.reshape(-1), torch.zeros((), dtype=torch.float64, device=t.device)
    for a, b in blocks(flat.numel(), block_for(t.device)):
        total += flat[a:b].sum(dtype=torch.float64)
    return total


def all_finite(t: torch.Tensor) -> bool:
    """True iff no entry is NaN or inf: a float64 sum cannot overflow from 16/32-bit inputs, and
    inf - inf is NaN; cheaper than building an isfinite mask."""
    return math.isfinite(float(sum64(t)))


class Scratch:
    """Chunk-sized buffers reused across tensors and candidates (no allocation in the loop)."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        k = (key, dtype, str(device))
        buf = self._bufs.get(k)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, CHUNK), dtype=dtype, device=device)
            self._bufs[k] = buf
        return buf[:n]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


SCRATCH = Scratch()


def scratch(key: str, n: int, device) -> torch.Tensor:
    """The reused float32 buffer ``key`` of ``n`` elements on ``device`` (contents undefined)."""
    return SCRATCH.get(key, n, torch.float32, device)


def scratch_bytes() -> int:
    """Bytes of this process's reused chunk buffers (shared by every merge in it)."""
    return SCRATCH.nbytes()


def f32(t: torch.Tensor, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
    """t's flat entries [a, b) as float32: a view when t is float32, else converted into ``buf``."""
    v = t.reshape(-1)[a:b]
    return v if v.dtype == torch.float32 else buf.copy_(v)
