"""Per-(tensor, model) statistics of a task vector, kept within a byte budget.

``DeltaStats`` holds one input's task vector for one tensor (16- or 32-bit, read as float32 chunk by
chunk) and what its masks need. Per-element statistics (magnitudes sorted once, prefix sums, the
seeded uniform field behind random drop masks, DELLA's ranks, a method's own: ``CACHE_KINDS``) are
optional accelerations kept within a byte budget (``evomerge.merge.memory``): with them a density's
threshold is a lookup; without them it is an exact selection per candidate (a histogram of the
magnitudes' bit patterns), and random fields are drawn again from the same generator. Both give the
same masks. The on-disk path keeps nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from evomerge.merge.chunks import block_for, blocks, f32
from evomerge.merge.memory import CacheBudget, place

if TYPE_CHECKING:
    from evomerge.merge.lowrank import LowRankDelta


def field_seed(seed: int, tensor_name: str, position: int) -> int:
    """The generator seed of the random field of the ``position``-th input model (recipe order) for
    one tensor: independent of where the model is stored; stable across processes and platforms."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sort_desc(values: torch.Tensor) -> torch.Tensor:
    """Flat descending sort; numpy's sort is an order of magnitude faster than torch's on CPU."""
    if values.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sort(values.reshape(-1).numpy())[::-1].copy())
    return torch.sort(values.reshape(-1), descending=True).values


def _argsort(flat: torch.Tensor) -> torch.Tensor:
    if flat.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.argsort(flat.numpy()))  # ties: any order, same prefix sums
    return torch.argsort(flat)


def from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bin of a histogram that holds its k-th largest element, that element's rank from the top
    within the bin)."""
    from_top = counts.flip(0).cumsum(0).cpu()
    j = int(torch.searchsorted(from_top, torch.tensor([k])).item())
    return counts.numel() - 1 - j, k - (int(from_top[j - 1]) if j else 0)


def kth_largest_magnitude(t: torch.Tensor, k: int) -> float:
    """The k-th largest |t| (1 <= k <= t.numel(); t 16- or 32-bit float), exactly, in O(n) time and
    O(block) memory on any device: bincounts of the magnitudes' bit patterns (ordered like the
    values, for non-negative floats) by their high 16 bits, then for 32-bit floats by the low 16 bits
    within the bucket holding the k-th. NaN ranks above inf, as in a descending sort."""
    flat = t.reshape(-1)
    wide = flat.element_size() == 4
    int_type, magnitude = (torch.int32, 0x7FFFFFFF) if wide else (torch.int16, 0x7FFF)

    def histogram(bucket: Callable[[torch.Tensor], torch.Tensor], bins: int) -> torch.Tensor:
        counts = torch.zeros(bins, dtype=torch.int64, device=t.device)
        for a, b in blocks(flat.numel(), block_for(t.device)):
            counts += torch.bincount(bucket(flat[a:b].view(int_type) & magnitude), minlength=bins)[:bins]
        return counts

    high, rank = from_top(histogram(lambda bits: bits >> 16 if wide else bits, 1 << 15), k)
    pattern = high
    if wide:  # outside the bucket -> an extra bin, cut off
        low_half = histogram(lambda bits: torch.where(bits >> 16 == high, bits & 0xFFFF, 1 << 16), 1 << 16)
        pattern = (high << 16) | from_top(low_half, rank)[0]
    return float(torch.tensor(pattern, dtype=int_type).view(flat.dtype))


def _kth_largest(d: torch.Tensor, k: int) -> float:
    if d.device.type == "cpu" and d.dtype == torch.float32:  # numpy's introselect: ~3x the histogram here
        import numpy as np

        mags = np.abs(d.reshape(-1).numpy())
        return float(np.partition(mags, mags.size - k)[mags.size - k])
    return kth_largest_magnitude(d, k)


def della_rank(d: torch.Tensor) -> torch.Tensor:
    """Magnitude rank of each entry along dim 1 (a 1-D tensor is one row), scaled to [0, 1]; float32
    in d's shape. The sort is stable, so a block of rows ranks exactly as in the whole tensor."""
    mags = d.abs()
    mags = mags if mags.dim() >= 2 else mags.unsqueeze(0)
    if mags.device.type == "cpu" and mags.element_size() == 2:  # numpy radix-sorts the 16-bit patterns: ~4x
        import numpy as np

        order = torch.from_numpy(np.argsort(mags.view(torch.int16).numpy(), axis=1, kind="stable"))
    else:
        order = mags.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(mags.shape[1], device=mags.device).expand_as(order))
    span = (mags.shape[1] - 1) or 1
    return (ranks.float() / span).reshape(d.shape)


#: Kinds of cached per-element statistics, as ``ResidentMerge.resident_bytes`` reports them.
CACHE_KINDS = ("sorted", "cumsum", "uniform", "della_rank", "drop_keys", "pcb_balance")


@dataclass
class DeltaStats:
    """One model's task vector for one tensor, and what any density or drop mask needs of it.

    ``delta``: the task vector in the tensor's shape, 16- or 32-bit float (read as float32). Scalars
    (L1 norm, slerp's dot products) are kept once computed. Per-element statistics (``CACHE_KINDS``)
    are kept in ``cache``, at ``home``, only while ``budget`` admits their bytes (None: never);
    otherwise each call recomputes what it needs, with the same result.
    """

    stored: torch.Tensor | LowRankDelta
    seed: int
    budget: CacheBudget | None = None
    #: where cached statistics live: the resident task vector's device
    home: torch.device | None = None
    cache: dict[str, tuple[Any, int]] = field(default_factory=dict, repr=False)  # kind -> (value, bytes)
    scalars: dict[str, Any] = field(default_factory=dict, repr=False)

    #: Drop keys kept per tensor and model: DARE's (eps = 0) and the last DELLA eps, so a search
    #: alternating the two methods never re-sorts.
    KEYS_KEPT = 2

    def __post_init__(self):
        if self.home is None:
            self.home = self.stored.device
        self._dense: torch.Tensor | None = None

    @property
    def delta(self) -> torch.Tensor:
        """The task vector as a tensor: the stored one, or a LoRA expert's formed from its factors and
        held by this object (one tensor's merge: see ``on``)."""
        if isinstance(self.stored, torch.Tensor):
            return self.stored
        if self._dense is None:
            self._dense = self.stored.dense()
        return self._dense

    @property
    def lowrank(self) -> bool:
        return not isinstance(self.stored, torch.Tensor)

    @property
    def zero(self) -> bool:
        """A LoRA expert's delta of a tensor its adapter does not target (statistics are known: 0)."""
        return self.lowrank and self.stored.is_zero

    def dense(self) -> torch.Tensor:
        """The task vector as a tensor, not held afterwards."""
        return self.stored if isinstance(self.stored, torch.Tensor) else self.stored.dense()

    def chunk(self, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
        """Flat entries [a, b) as float32: a view of a float32 stored delta, else written into ``buf``
        (a LoRA expert's formed from its factors, a row block at a time)."""
        if self.lowrank and self._dense is None:
            return self.stored.chunk(a, b, buf)
        return f32(self.delta, a, b, buf)

    @property
    def n(self) -> int:
        return self.stored.numel()

    def on(self, device: torch.device) -> DeltaStats:
        """This task vector for a merge on ``device``: the delta copied there (asynchronously from
        pinned memory; no copy when it is there already; a LoRA expert's factors, in float32),
        sharing the cache and scalars. A LoRA expert's dense delta, when a statistic needs it, is
        held by the copy: for the one tensor it merges."""
        return replace(self, stored=self.stored.to(device, non_blocking=True))

    def reseed(self, seed: int) -> None:
        """Draw random masks from ``seed`` from now on (the cached field and drop keys go)."""
        if seed != self.seed:
            self.seed = seed
            self.forget("uniform", "drop_keys")

    def forget(self, *kinds: str) -> None:
        """Drop the cached statistics of these kinds (all when none are named), releasing their bytes."""
        for kind in [k for k in self.cache if not kinds or k.split("@")[0] in kinds]:
            self.budget.release(self.cache.pop(kind)[1])

    def held(self, kind: str) -> list[torch.Tensor]:
        """The cached tensors of one of ``CACHE_KINDS``."""
        values = [v for k, (v, _) in self.cache.items() if k.split("@")[0] == kind]
        return [t for v in values for t in (v if isinstance(v, tuple) else (v,))]

    def hit(self, kind: str) -> Any:
        if kind not in self.cache:
            return None
        self.cache[kind] = self.cache.pop(kind)  # most recently used last
        return self.cache[kind][0]

    def kept(self, kind: str, nbytes: int, build: Callable[[], Any]) -> Any:
        """The cached statistic ``kind``, built and kept now if the budget admits ``nbytes``; else None."""
        if kind in self.cache:
            return self.hit(kind)
        if self.budget is None or not self.budget.admit(nbytes):
            return None
        built = build()
        value = tuple(place(t, self.home) for t in built) if isinstance(built, tuple) else place(built, self.home)
        self.cache[kind] = (value, nbytes)
        return value

    @property
    def l1(self) -> float:
        if self.zero:
            return 0.0
        if "l1" not in self.scalars:
            dev = self.stored.device
            total, size = torch.zeros((), dtype=torch.float64, device=dev), block_for(dev)
            values = torch.empty(min(size, self.n), device=dev) if self.lowrank else None
            for a, b in blocks(self.n, size):
                part = self.stored.reshape(-1)[a:b] if values is None else self.chunk(a, b, values[: b - a])
                total += part.abs().sum(dtype=torch.float64)
            self.scalars["l1"] = float(total)
        return self.scalars["l1"]

    def _sorted(self) -> torch.Tensor | None:
        return self.kept("sorted", 4 * self.n, lambda: _sort_desc(self.delta.abs().float()))

    def kth_largest(self, k: int) -> float:
        """The k-th largest |delta| (1 <= k <= n): a lookup in cached sorted magnitudes, else a selection."""
        if self.zero:
            return 0.0
        sorted_desc = self._sorted()
        return float(sorted_desc[k - 1]) if sorted_desc is not None else _kth_largest(self.delta, k)

    def top_sum(self, k: int) -> float:
        """Sum of the k largest magnitudes (L1 norm of a top-k mask): a lookup in cached prefix sums,
        else one pass: the sum above the k-th largest, plus as many of its ties as k still takes."""
        if k <= 0 or self.zero:
            return 0.0
        sorted_desc = self._sorted()
        if sorted_desc is not None:
            cum = self.kept("cumsum", 8 * self.n, lambda: torch.cumsum(sorted_desc.double(), 0))
            if cum is not None:
                return float(cum[k - 1])
        threshold = self.kth_largest(k)
        flat, dev = self.delta.reshape(-1), self.delta.device
        total, count = torch.zeros((), dtype=torch.float64, device=dev), torch.zeros((), dtype=torch.int64, device=dev)
        for a, b in blocks(self.n, block_for(dev)):
            v = flat[a:b].abs().float()
            above = v > threshold
            total += (v * above).sum(dtype=torch.float64)
            count += above.sum()
        return float(total) + (k - int(count)) * threshold

    def _draw_field(self) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand(self.delta.shape, generator=gen)

    def uniform_field(self) -> torch.Tensor | None:
        """The seeded uniform field of random masks, if cached or admitted now."""
        return self.kept("uniform", 4 * self.n, self._draw_field)

    def della_rank(self) -> torch.Tensor | None:
        """DELLA's per-row magnitude ranks (see ``_della_rank``), if cached or admitted now."""
        return self.kept("della_rank", 4 * self.n, lambda: della_rank(self.delta))

    def cached_keys(self, eps: float) -> tuple | None:
        """(keys, keys sorted, float64 prefix sums of |delta| in key order) for ``eps`` if cached."""
        return self.hit(f"drop_keys@{eps!r}")

    def sorted_keys(self, eps: float) -> tuple | None:
        """``cached_keys(eps)``, built and kept now if not cached and the budget admits them: the L1
        norm any drop threshold keeps is then a binary search."""
        kind = f"drop_keys@{eps!r}"
        if kind in self.cache:
            return self.hit(kind)
        older = [k for k in self.cache if k.startswith("drop_keys@")]
        for k in older[: max(0, len(older) - self.KEYS_KEPT + 1)]:  # room for this one
            self.budget.release(self.cache.pop(k)[1])
        field_ = self.uniform_field()
        rank = self.della_rank() if eps else None
        nbytes = 12 * self.n + (0 if eps == 0 and field_ is not None else 4 * self.n)
        dev = self.delta.device

        def build() -> tuple:
            u = field_ if field_ is not None else self._draw_field()
            if eps == 0:  # DARE's key is the field itself: kept once
                key, flat = u, u.to(dev).reshape(-1)
            else:
                key = u.to(dev) - (rank.to(dev) if rank is not None else della_rank(self.delta)) * (2 * eps)
                flat = key.reshape(-1)
            order = _argsort(flat)
            return key, flat[order], torch.cumsum(self.delta.reshape(-1)[order].abs().double(), 0)

        return self.kept(kind, nbytes, build)

    def dots(self, base: torch.Tensor) -> tuple[float, float]:
        """(base . delta, delta . delta): with |base|^2 they give slerp's angle for any t."""
        if "dots" not in self.scalars:
            b, d = base.reshape(-1).double(), self.delta.reshape(-1).double()
            self.scalars["dots"] = (float(b @ d), float(d @ d))
        return self.scalars["dots"]
