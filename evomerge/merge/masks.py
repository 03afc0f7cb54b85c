"""How a task-vector method masks each input's delta for one tensor: by magnitude (TIES), a band
below the outliers (Breadcrumbs), or a seeded random drop (DARE, DELLA's magnitude-ranked drop),
with the rescale that restores the delta's L1 norm (as mergekit does; for DARE about 1/density).

Random masks come from a seeded generator per (seed, tensor, input position) instead of the global
RNG, so a merge is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.chunks import block_for, blocks
from evomerge.merge.registry import MergeError, Sparsifier
from evomerge.merge.stats import DeltaStats, della_rank

_BIT_WEIGHTS: dict[str, torch.Tensor] = {}


def _pack(keep: torch.Tensor) -> torch.Tensor:
    """bool [L] -> uint8 [ceil(L / 8)]: entry i is bit i % 8 of byte i // 8."""
    if keep.numel() % 8:
        keep = torch.cat([keep, keep.new_zeros(8 - keep.numel() % 8)])
    device = str(keep.device)
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=keep.device)
    return (keep.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS[device]).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` entries packed by ``_pack``, as uint8 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[:n]


class DropKeys:
    """One merge's random drop mask of a task vector: keep entry i iff key_i < ``lo``, with
    key = u - 2 eps rank (u: the seeded uniform field; rank: DELLA's row ranks, eps = 0 for DARE).

    Keys are read from the cache where it holds them. Otherwise they are drawn again from the same
    generator and ranked again, a block of rows at a time: once, in ``kept_l1``'s pass, which packs the
    mask into bits (n / 8 bytes, for this merge only) for ``mask`` to read back; or in ``mask`` itself,
    chunk by chunk from the first, when there is no rescale. Every way gives the same mask.
    """

    def __init__(self, s: DeltaStats, eps: float, lo: float, sorted_keys: bool):
        self.s, self.eps, self.lo, self.device = s, eps, lo, s.stored.device
        self.entry = s.sorted_keys(eps) if sorted_keys else s.cached_keys(eps)
        field_ = s.uniform_field() if self.entry is None else None
        rank = s.della_rank() if self.entry is None and eps else None
        self.key = None if self.entry is None else self.entry[0].reshape(-1)
        self.field = None if field_ is None else field_.reshape(-1)
        self.rank = None if rank is None else rank.reshape(-1)
        self.generator = None
        if self.entry is None and field_ is None:
            self.generator = torch.Generator(device="cpu").manual_seed(s.seed)
        self.drawn = 0
        self.rows: tuple[int, int, torch.Tensor | None] = (0, 0, None)
        self.bits: torch.Tensor | None = None

    def kept_l1(self) -> float:
        """L1 norm of the entries the mask keeps (exact): a binary search in cached sorted keys, else
        one pass over the keys."""
        if self.entry is not None:
            _, keys_sorted, cum = self.entry
            at = torch.tensor([self.lo], dtype=keys_sorted.dtype, device=keys_sorted.device)
            k = int(torch.searchsorted(keys_sorted, at).item())
            return float(cum[k - 1]) if k > 0 else 0.0
        n, size, dev = self.s.n, block_for(self.device), self.device
        buf, total = torch.empty(min(size, n), device=dev), torch.zeros((), dtype=torch.float64, device=dev)
        values = torch.empty(min(size, n), device=dev)
        bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=dev)
        for a, b in blocks(n, size):
            keep = self._keys(a, b, buf[: b - a], size) < self.lo
            total += (self.s.chunk(a, b, values[: b - a]).abs() * keep).sum(dtype=torch.float64)
            bits[a // 8 : (b + 7) // 8] = _pack(keep)
        self.bits = bits
        return float(total)

    def mask(self, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
        """The mask on [a, b) (a: a multiple of 8) as float32 1 (keep) / 0 (drop), in ``out``."""
        if self.bits is not None:
            return out.copy_(_unpack(self.bits[a // 8 : (b + 7) // 8], b - a))
        return torch.lt(self._keys(a, b, out, out.numel()), self.lo, out=out)

    def _keys(self, a: int, b: int, out: torch.Tensor, size: int) -> torch.Tensor:
        """key[a:b] as float32 on the merge's device: a view of the cache, or written into ``out``;
        uncached keys are drawn in order, ranked ``size`` elements' worth of rows at a time."""
        if self.key is not None:
            return self.key[a:b].to(self.device, non_blocking=True)
        if self.field is not None:
            u = self.field[a:b].to(self.device, non_blocking=True)
        else:
            if a != self.drawn:
                raise RuntimeError(f"drop keys are drawn in order: asked for [{a}, {b}) after {self.drawn}")
            host = out if out.device.type == "cpu" else torch.empty(b - a)
            u = torch.rand(b - a, generator=self.generator, out=host)
            u = u if host is out else out.copy_(host)
            self.drawn = b
        if not self.eps:
            return u
        return torch.sub(u, self._ranks(a, b, size) * (2 * self.eps), out=out)

    def _ranks(self, a: int, b: int, size: int) -> torch.Tensor:
        if self.rank is not None:
            return self.rank[a:b].to(self.device, non_blocking=True)
        lo, hi, ranks = self.rows
        if a < lo or b > hi or ranks is None:
            d = self.s.delta
            if d.dim() > 2:  # ranks along dim 1 are not contiguous rows: rank it whole, once
                lo, hi, ranks = 0, d.numel(), della_rank(d).reshape(-1)
            else:
                rows = d.reshape(-1, d.shape[-1])
                width = rows.shape[1]
                first = a // width
                last = min(rows.shape[0], max(first + max(1, size // width), -(-b // width)))
                lo, hi, ranks = first * width, last * width, della_rank(rows[first:last]).reshape(-1)
            self.rows = (lo, hi, ranks)
        return ranks[a - lo : b - lo]


@dataclass(frozen=True)
class Mask:
    """How one input's delta is masked for one tensor: mode and its scalars."""

    mode: str  # "all", "none", "top" (|d| > lo), "band" (lo < |d| <= hi), "drop" (see keys)
    lo: float = 0.0
    hi: float = 0.0
    scale: float | None = None  # rescale factor applied after masking
    keys: DropKeys | None = None


def _shrink(threshold: float) -> float:
    """hardshrink's lambda that keeps |v| >= threshold: the largest float32 below it (0 stays 0)."""
    if threshold <= 0:
        return 0.0
    t = torch.tensor(threshold, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(0.0)))


def mask_for(kind: Sparsifier | None, s: DeltaStats, p: dict[str, Any], rescale: bool) -> Mask:
    density = p.get("density", 1.0)
    n = s.n
    if kind is None or density >= 1:
        return Mask("all")
    if kind == "magnitude":
        if density <= 0 or n == 0:
            return Mask("none")
        k = max(1, int(density * n))
        scale = None
        if rescale:
            before, after = s.l1, s.top_sum(k)
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return Mask("top", _shrink(s.kth_largest(k)), scale=scale)
    if kind == "outliers":
        target = int(density * n)
        if target == 0:
            return Mask("none")
        n_top = min(int(p.get("gamma", 0.01) * n), n - target)
        scale = None
        if rescale:
            before, after = s.l1, s.top_sum(n_top + target) - s.top_sum(n_top)
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return Mask("band", _shrink(s.kth_largest(n_top + target)), s.kth_largest(n_top + 1), scale)
    if kind in ("random", "della"):
        if density <= 0:
            return Mask("none")
        eps = p.get("epsilon", 0.15) if kind == "della" else 0.0
        if kind == "della" and (density + eps >= 1 or density - eps <= 0):
            raise MergeError(f"della: density {density} +/- epsilon {eps} must stay inside (0, 1)")
        keys = DropKeys(s, eps, density - eps, sorted_keys=rescale)
        scale = None
        if rescale:  # back to the delta's L1 norm
            before, after = s.l1, keys.kept_l1()
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return Mask("drop", scale=scale, keys=keys)
    raise MergeError(f"unknown sparsification '{kind}'")


def masked(m: Mask, s: DeltaStats, a: int, b: int, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Write input ``s``'s masked (and rescaled) delta for flat range [a, b) into ``out``.

    Float-only ops: comparisons into bool tensors and bool-conditioned ``where`` cost several times
    more than arithmetic on CPU. Kept entries are the delta's own values, dropped ones exactly 0.
    """
    if m.mode == "none":
        return out.zero_()
    d = s.chunk(a, b, out)
    if m.mode == "all":
        return d if d is out else out.copy_(d)
    if m.mode == "top":  # |d| > lo (lo: just below the kept threshold)
        torch.hardshrink(d, m.lo, out=out)
    elif m.mode == "band":  # lo < |d| <= hi
        torch.hardshrink(d, m.hi, out=tmp)
        torch.hardshrink(d, m.lo, out=out).sub_(tmp)
    else:  # drop
        torch.mul(d, m.keys.mask(a, b, tmp), out=out)
    if m.scale is not None:
        out.mul_(m.scale)
    return out
