"""Merge methods: one registry of declared parameters, and the tensor math behind each method.

Every method merges one tensor at a time through the kernel the registry (at the end) gives it:
``merge_tensor(method, base, stats, shared, per_model)``.
What depends only on the inputs lives in ``DeltaStats``: the task vector (16- or 32-bit, read as
float32 chunk by chunk) and what its masks need. Per-element statistics (magnitudes sorted once,
prefix sums, the seeded uniform field behind random drop masks, DELLA's ranks) are optional
accelerations kept within a byte budget (``evomerge.merge.memory``): with them a density's
threshold is a lookup; without them it is an exact selection per candidate (a histogram of the
magnitudes' bit patterns), and random fields are drawn again from the same generator. Both give the
same masks. The on-disk path keeps nothing.

Semantics follow mergekit's (its ``merge_state_dicts`` is the test oracle) except where noted:
random masks come from a seeded generator per (seed, tensor, input position) instead of the global
RNG, so a merge is reproducible. Rescaling after a random drop restores the delta's L1 norm, as
mergekit does (for DARE this is about 1/density, the paper's 1/(1-p)).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from evomerge.merge.memory import CacheBudget, place

REQUIRED = object()


class MergeError(ValueError):
    """A merge that cannot be computed as asked (bad parameter, incompatible inputs, NaN)."""


@dataclass(frozen=True)
class Param:
    """A declared method parameter.

    ``per_model``: set per input model (else one value shared by all inputs of a tensor).
    """

    name: str
    per_model: bool
    default: Any = REQUIRED
    kind: type = float
    low: float | None = None
    high: float | None = None
    #: A count of input models (``kind=int``): at most the number of inputs a recipe merges.
    counts_models: bool = False

    def check(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"{where}: '{self.name}' must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeError(f"{where}: '{self.name}' must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise MergeError(f"{where}: '{self.name}' must be finite, got {value}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else self.low
            hi = "inf" if self.high is None else self.high
            raise MergeError(f"{where}: '{self.name}' = {value} is outside [{lo}, {hi}]")
        return round_count(value) if self.kind is int else value


def round_count(value: float) -> int:
    """A count read from a gene or a gradient: the nearest whole number, halves up (2.5 -> 3)."""
    return int(math.floor(value + 0.5))


#: How a task-vector method sparsifies each delta (see _mask_for).
Sparsifier = Literal["magnitude", "random", "outliers", "della"]
#: ``kernel(method, base, stats, shared, per_model, out, lines)``: one merged tensor (see merge_tensor).
Kernel = Callable[
    [
        "Method",
        torch.Tensor,
        list["DeltaStats"],
        dict[str, Any],
        list[dict[str, Any]],
        "torch.Tensor | None",
        "float | None",
    ],
    torch.Tensor,
]


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    reference: str
    kernel: Kernel
    #: True: the base is the origin of every input's task vector, so it is required and is not an
    #: input itself. False (linear): the base is an ordinary input, averaged only when listed.
    base_is_origin: bool = True
    #: Bounds on the number of non-base input models.
    min_models: int = 1
    max_models: int | None = None
    #: For task-vector methods: how each delta is sparsified, and whether signs are elected.
    sparsify: Sparsifier | None = None
    consensus: bool = False
    #: Keep only the entries that at least k inputs' TALL masks mark as important (Consensus Merging).
    tall: bool = False
    #: Rescale a random drop by 1/q, q searched per input (DAREx-q), instead of restoring the L1 norm.
    rescale_q: bool = False
    #: mergekit has this method (a recipe of it runs with ``mergekit-yaml``); else ``evomerge merge`` only.
    in_mergekit: bool = True

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)


# --- chunks and blocks --------------------------------------------------------------------------

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


def _block_for(device: torch.device) -> int:
    return max(BLOCK, chunk_for(device))


def _blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    return ((a, min(n, a + size)) for a in range(0, n, size))


def sum64(t: torch.Tensor) -> torch.Tensor:
    """Sum of all entries as a float64 0-dim tensor on t's device, block by block: torch's float64
    sum of a 16/32-bit tensor first copies all of it to float64 (8 B/element)."""
    flat, total = t.reshape(-1), torch.zeros((), dtype=torch.float64, device=t.device)
    for a, b in _blocks(flat.numel(), _block_for(t.device)):
        total += flat[a:b].sum(dtype=torch.float64)
    return total


def all_finite(t: torch.Tensor) -> bool:
    """True iff no entry is NaN or inf: a float64 sum cannot overflow from 16/32-bit inputs, and
    inf - inf is NaN; cheaper than building an isfinite mask."""
    return math.isfinite(float(sum64(t)))


# --- per-(tensor, model) statistics -------------------------------------------------------------


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


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
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
        for a, b in _blocks(flat.numel(), _block_for(t.device)):
            counts += torch.bincount(bucket(flat[a:b].view(int_type) & magnitude), minlength=bins)[:bins]
        return counts

    high, rank = _from_top(histogram(lambda bits: bits >> 16 if wide else bits, 1 << 15), k)
    pattern = high
    if wide:  # outside the bucket -> an extra bin, cut off
        low_half = histogram(lambda bits: torch.where(bits >> 16 == high, bits & 0xFFFF, 1 << 16), 1 << 16)
        pattern = (high << 16) | _from_top(low_half, rank)[0]
    return float(torch.tensor(pattern, dtype=int_type).view(flat.dtype))


def _kth_largest(d: torch.Tensor, k: int) -> float:
    if d.device.type == "cpu" and d.dtype == torch.float32:  # numpy's introselect: ~3x the histogram here
        import numpy as np

        mags = np.abs(d.reshape(-1).numpy())
        return float(np.partition(mags, mags.size - k)[mags.size - k])
    return kth_largest_magnitude(d, k)


def _della_rank(d: torch.Tensor) -> torch.Tensor:
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

    delta: torch.Tensor
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
            self.home = self.delta.device

    @property
    def n(self) -> int:
        return self.delta.numel()

    def on(self, device: torch.device) -> DeltaStats:
        """This task vector for a merge on ``device``: the delta copied there (asynchronously from
        pinned memory; no copy when it is there already), sharing the cache and scalars."""
        return replace(self, delta=self.delta.to(device, non_blocking=True))

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

    def _hit(self, kind: str) -> Any:
        if kind not in self.cache:
            return None
        self.cache[kind] = self.cache.pop(kind)  # most recently used last
        return self.cache[kind][0]

    def _kept(self, kind: str, nbytes: int, build: Callable[[], Any]) -> Any:
        """The cached statistic ``kind``, built and kept now if the budget admits ``nbytes``; else None."""
        if kind in self.cache:
            return self._hit(kind)
        if self.budget is None or not self.budget.admit(nbytes):
            return None
        built = build()
        value = tuple(place(t, self.home) for t in built) if isinstance(built, tuple) else place(built, self.home)
        self.cache[kind] = (value, nbytes)
        return value

    @property
    def l1(self) -> float:
        if "l1" not in self.scalars:
            flat, total = self.delta.reshape(-1), torch.zeros((), dtype=torch.float64, device=self.delta.device)
            for a, b in _blocks(self.n, _block_for(self.delta.device)):
                total += flat[a:b].abs().sum(dtype=torch.float64)
            self.scalars["l1"] = float(total)
        return self.scalars["l1"]

    def _sorted(self) -> torch.Tensor | None:
        return self._kept("sorted", 4 * self.n, lambda: _sort_desc(self.delta.abs().float()))

    def kth_largest(self, k: int) -> float:
        """The k-th largest |delta| (1 <= k <= n): a lookup in cached sorted magnitudes, else a selection."""
        sorted_desc = self._sorted()
        return float(sorted_desc[k - 1]) if sorted_desc is not None else _kth_largest(self.delta, k)

    def top_sum(self, k: int) -> float:
        """Sum of the k largest magnitudes (L1 norm of a top-k mask): a lookup in cached prefix sums,
        else one pass: the sum above the k-th largest, plus as many of its ties as k still takes."""
        if k <= 0:
            return 0.0
        sorted_desc = self._sorted()
        if sorted_desc is not None:
            cum = self._kept("cumsum", 8 * self.n, lambda: torch.cumsum(sorted_desc.double(), 0))
            if cum is not None:
                return float(cum[k - 1])
        threshold = self.kth_largest(k)
        flat, dev = self.delta.reshape(-1), self.delta.device
        total, count = torch.zeros((), dtype=torch.float64, device=dev), torch.zeros((), dtype=torch.int64, device=dev)
        for a, b in _blocks(self.n, _block_for(dev)):
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
        return self._kept("uniform", 4 * self.n, self._draw_field)

    def della_rank(self) -> torch.Tensor | None:
        """DELLA's per-row magnitude ranks (see ``_della_rank``), if cached or admitted now."""
        return self._kept("della_rank", 4 * self.n, lambda: _della_rank(self.delta))

    def cached_keys(self, eps: float) -> tuple | None:
        """(keys, keys sorted, float64 prefix sums of |delta| in key order) for ``eps`` if cached."""
        return self._hit(f"drop_keys@{eps!r}")

    def sorted_keys(self, eps: float) -> tuple | None:
        """``cached_keys(eps)``, built and kept now if not cached and the budget admits them: the L1
        norm any drop threshold keeps is then a binary search."""
        kind = f"drop_keys@{eps!r}"
        if kind in self.cache:
            return self._hit(kind)
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
                key = u.to(dev) - (rank.to(dev) if rank is not None else _della_rank(self.delta)) * (2 * eps)
                flat = key.reshape(-1)
            order = _argsort(flat)
            return key, flat[order], torch.cumsum(self.delta.reshape(-1)[order].abs().double(), 0)

        return self._kept(kind, nbytes, build)

    def cached_balance(self, inputs: str) -> tuple | None:
        """``pcb_balance(inputs)`` if it is cached (no build)."""
        return self._hit(f"pcb_balance@{inputs}")

    def pcb_balance(self, inputs: str, build: Callable[[], torch.Tensor]) -> tuple | None:
        """(PCB's balance of this task vector, flat float32; the same sorted ascending) among the input
        set ``inputs`` (the balance depends on every input), if cached or admitted now (8 B/element).
        One input set is kept: a new one replaces it."""
        kind = f"pcb_balance@{inputs}"
        if kind in self.cache:
            return self._hit(kind)
        self.forget("pcb_balance")

        def both() -> tuple[torch.Tensor, torch.Tensor]:
            balance = build()
            if balance.device.type == "cpu":
                import numpy as np

                return balance, torch.from_numpy(np.sort(balance.numpy()))
            return balance, torch.sort(balance).values

        return self._kept(kind, 8 * self.n, both)

    def dots(self, base: torch.Tensor) -> tuple[float, float]:
        """(base . delta, delta . delta): with |base|^2 they give slerp's angle for any t."""
        if "dots" not in self.scalars:
            b, d = base.reshape(-1).double(), self.delta.reshape(-1).double()
            self.scalars["dots"] = (float(b @ d), float(d @ d))
        return self.scalars["dots"]


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
        self.s, self.eps, self.lo, self.device = s, eps, lo, s.delta.device
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
        n, size, dev = self.s.n, _block_for(self.device), self.device
        flat = self.s.delta.reshape(-1)
        buf, total = torch.empty(min(size, n), device=dev), torch.zeros((), dtype=torch.float64, device=dev)
        bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=dev)
        for a, b in _blocks(n, size):
            keep = self._keys(a, b, buf[: b - a], size) < self.lo
            total += (flat[a:b].abs().float() * keep).sum(dtype=torch.float64)
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
                lo, hi, ranks = 0, d.numel(), _della_rank(d).reshape(-1)
            else:
                rows = d.reshape(-1, d.shape[-1])
                width = rows.shape[1]
                first = a // width
                last = min(rows.shape[0], max(first + max(1, size // width), -(-b // width)))
                lo, hi, ranks = first * width, last * width, _della_rank(rows[first:last]).reshape(-1)
            self.rows = (lo, hi, ranks)
        return ranks[a - lo : b - lo]


# --- the merge of one tensor ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Mask:
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


def _mask_for(kind: Sparsifier | None, s: DeltaStats, p: dict[str, Any], rescale: bool) -> _Mask:
    density = p.get("density", 1.0)
    n = s.n
    if kind is None or density >= 1:
        return _Mask("all")
    if kind == "magnitude":
        if density <= 0 or n == 0:
            return _Mask("none")
        k = max(1, int(density * n))
        scale = None
        if rescale:
            before, after = s.l1, s.top_sum(k)
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return _Mask("top", _shrink(s.kth_largest(k)), scale=scale)
    if kind == "outliers":
        target = int(density * n)
        if target == 0:
            return _Mask("none")
        n_top = min(int(p.get("gamma", 0.01) * n), n - target)
        scale = None
        if rescale:
            before, after = s.l1, s.top_sum(n_top + target) - s.top_sum(n_top)
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return _Mask("band", _shrink(s.kth_largest(n_top + target)), s.kth_largest(n_top + 1), scale)
    if kind in ("random", "della"):
        if density <= 0:
            return _Mask("none")
        eps = p.get("epsilon", 0.15) if kind == "della" else 0.0
        if kind == "della" and (density + eps >= 1 or density - eps <= 0):
            raise MergeError(f"della: density {density} +/- epsilon {eps} must stay inside (0, 1)")
        keys = DropKeys(s, eps, density - eps, sorted_keys=rescale)
        scale = None
        if rescale:  # back to the delta's L1 norm
            before, after = s.l1, keys.kept_l1()
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return _Mask("drop", scale=scale, keys=keys)
    raise MergeError(f"unknown sparsification '{kind}'")


class _Scratch:
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


_SCRATCH = _Scratch()


def scratch_bytes() -> int:
    """Bytes of this process's reused chunk buffers (shared by every merge in it)."""
    return _SCRATCH.nbytes()


def _f32(t: torch.Tensor, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
    """t's flat entries [a, b) as float32: a view when t is float32, else converted into ``buf``."""
    v = t.reshape(-1)[a:b]
    return v if v.dtype == torch.float32 else buf.copy_(v)


def _masked(m: _Mask, s: DeltaStats, a: int, b: int, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Write input ``s``'s masked (and rescaled) delta for flat range [a, b) into ``out``.

    Float-only ops: comparisons into bool tensors and bool-conditioned ``where`` cost several times
    more than arithmetic on CPU. Kept entries are the delta's own values, dropped ones exactly 0.
    """
    if m.mode == "none":
        return out.zero_()
    d = _f32(s.delta, a, b, out)
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
    float32). The result is float32, or written into ``out`` where the method allows: a contiguous
    tensor of base's shape, any float dtype (each entry is rounded once, from float32).

    ``per_model[i]`` holds input i's resolved parameters. Where the base is not the origin (linear),
    an input that is the base itself is a zero task vector. ``lines``: the LiNeS post-step's scale of
    the merged task vector (``merged - base``), applied in float32 before any rounding.
    """
    return method.kernel(method, base, stats, shared, per_model, out, None if lines == 1.0 else lines)


def _lines(merged: torch.Tensor, base: torch.Tensor, scale: float | None) -> torch.Tensor:
    """LiNeS on float32 ``merged`` in place: base + scale * (merged - base)."""
    return merged if scale is None else merged.sub_(base).mul_(scale).add_(base)


def _output(base: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(base.shape, dtype=torch.float32, device=base.device) if out is None else out


def _linear(method, base, stats, shared, per_model, out=None, lines=None) -> torch.Tensor:
    """Weighted average of the inputs (normalized by the weights' sum unless normalize=false).

    Reference: Wortsman et al., "Model soups", ICML 2022, arXiv:2203.05482; mergekit ``linear``.
    """
    weights = [float(p["weight"]) for p in per_model]
    total = sum(weights)
    if shared.get("normalize", True) and total == 0:
        raise MergeError("linear: the weights sum to 0, cannot normalize")
    out = _output(base, out)
    flat_out, flat_base, dev = out.view(-1), base.reshape(-1), base.device
    for a, b in _blocks(base.numel(), chunk_for(dev)):
        acc = _SCRATCH.get("acc", b - a, torch.float32, dev).zero_()
        x = _SCRATCH.get("x", b - a, torch.float32, dev)
        base_chunk = _f32(flat_base, a, b, _SCRATCH.get("base", b - a, torch.float32, dev))
        for s, w in zip(stats, weights):
            torch.add(base_chunk, s.delta.reshape(-1)[a:b], out=x)  # the input's own weights, in float32
            acc.add_(x, alpha=w)
        if shared.get("normalize", True):
            acc.div_(total)
        flat_out[a:b].copy_(_lines(acc, base_chunk, lines))
    return out


def _task_vector(method, base, stats: list[DeltaStats], shared, per_model, out=None, lines=None) -> torch.Tensor:
    """Generalized task arithmetic: mask, weight, optionally elect signs, normalize, scale by lambda.

    Elementwise in mergekit's order of operations, so results agree bit for bit; chunked so that
    every intermediate lives in a reused cache-sized buffer.

    References: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089;
    Yadav et al., "TIES-Merging", NeurIPS 2023, arXiv:2306.01708 (trim, elect sign by sum, disjoint
    mean); Yu et al., "Language Models are Super Mario" (DARE), ICML 2024, arXiv:2311.03099;
    Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024, arXiv:2312.06795; Deep et al.,
    "DELLA-Merging", arXiv:2406.11617 (MAGPRUNE); mergekit's generalized task arithmetic.
    """
    rescale, normalize, lam = bool(shared.get("rescale", False)), bool(shared["normalize"]), float(shared["lambda"])
    total = sum(float(p["weight"]) for p in per_model)
    # DAREx-q: the rescale 1/q is folded into the weight (it applies to whatever the mask keeps)
    weights = [float(p["weight"]) / (float(p["q"]) if method.rescale_q else 1.0) for p in per_model]
    dev = base.device
    size = chunk_for(dev)
    masks = [_mask_for(method.sparsify, s, p, rescale) for s, p in zip(stats, per_model)]
    # random masks: no exact order of operations to keep, so fold the rescale and the weight
    masks = [replace(m, scale=(m.scale or 1.0) * w) if m.mode == "drop" else m for m, w in zip(masks, weights)]
    if method.tall:
        k = int(shared["k"])
        if k > len(stats):
            raise MergeError(f"{method.name}: k = {k} is larger than the number of experts ({len(stats)})")
    out = _output(base, out)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    for a, b in _blocks(base.numel(), size):
        L = b - a
        c = _SCRATCH.get("c", L, torch.float32, dev)
        tmp = _SCRATCH.get("tmp", L, torch.float32, dev)
        acc = _SCRATCH.get("acc", L, torch.float32, dev).zero_()
        if method.consensus:
            pos = _SCRATCH.get("pos", L, torch.float32, dev).zero_()
            neg = _SCRATCH.get("neg", L, torch.float32, dev).zero_()
            if normalize:
                wpos = _SCRATCH.get("wpos", L, torch.float32, dev).zero_()
                wneg = _SCRATCH.get("wneg", L, torch.float32, dev).zero_()
        for m, s, w in zip(masks, stats, weights):
            _masked(m, s, a, b, c, tmp)
            if m.mode != "drop":  # deterministic: (delta * mask) * rescale, then * weight, as mergekit
                c.mul_(w)
            acc.add_(c)
            if method.consensus:
                pos.add_(torch.clamp(c, min=0, out=tmp))
                neg.add_(torch.clamp(c, max=0, out=tmp))
                if normalize:
                    wpos.add_(torch.gt(c, 0, out=tmp), alpha=w)
                    wneg.add_(torch.lt(c, 0, out=tmp), alpha=w)
        if method.consensus:
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
                mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        if method.tall:
            _consensus_mask(mixed, stats, per_model, k, a, b, c, tmp)
        if lam != 1:
            mixed.mul_(lam)
        if lines is None:
            torch.add(flat_base[a:b], mixed, out=flat_out[a:b])  # in float32 (mixed is), rounded once into out
        else:
            flat_out[a:b].copy_(_lines(mixed.add_(flat_base[a:b]), flat_base[a:b], lines))
    return out


def _consensus_mask(
    merged: torch.Tensor,
    stats: list[DeltaStats],
    per_model: list[dict[str, Any]],
    k: int,
    a: int,
    b: int,
    x: torch.Tensor,
    tmp: torch.Tensor,
) -> None:
    """Consensus Merging on flat range [a, b): zero the entries of ``merged`` (the multi-task vector
    tau_MTL) that fewer than ``k`` inputs' TALL masks mark. Input t's mask is
    ``|w_t tau_t| >= tall_lambda_t * |tau_MTL - w_t tau_t|``: its own (weighted, untrimmed) task
    vector outweighs the rest of the merge there. ``x`` and ``tmp``: chunk-sized scratch."""
    count = _SCRATCH.get("count", b - a, torch.float32, merged.device).zero_()
    for s, p in zip(stats, per_model):
        d = _f32(s.delta, a, b, x)
        torch.mul(d, float(p["weight"]), out=x)
        torch.sub(merged, x, out=tmp).abs_().mul_(float(p["tall_lambda"]))
        count.add_(torch.ge(x.abs_(), tmp, out=tmp))
    merged.mul_(torch.ge(count, k, out=count))


# --- PCB-Merging --------------------------------------------------------------------------------

#: Fraction of each task vector's magnitudes clipped at either end before PCB's balancing (the
#: reference implementation's outlier clip).
PCB_CLIP = 1e-4


def _order_keys(v: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 keys ordered as the floats (negatives' magnitude bits flipped); an involution."""
    bits = v.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _kth_largest_values(
    block_values: Callable[[int, int], list[torch.Tensor]], n: int, ks: list[int], device
) -> tuple[list[float], list[float]]:
    """For m float32 fields of n entries that ``block_values(a, b)`` computes block by block (a list
    of m tensors for [a, b)): (each field's ks[i]-th largest value, signed and exact, 1 <= ks[i] <= n;
    each field's maximum). Two passes of bincounts of order-preserving keys, high then low 16 bits:
    nothing of size n is held."""
    m, size = len(ks), _block_for(device)
    counts = torch.zeros(m, 1 << 16, dtype=torch.int64, device=device)
    maxima = [-math.inf] * m
    for a, b in _blocks(n, size):
        for i, v in enumerate(block_values(a, b)):
            counts[i] += torch.bincount(((_order_keys(v) >> 16) + 32768).long(), minlength=1 << 16)
            maxima[i] = max(maxima[i], float(v.max()))
    found = [_from_top(counts[i], k) for i, k in enumerate(ks)]
    low = torch.zeros(m, (1 << 16) + 1, dtype=torch.int64, device=device)
    for a, b in _blocks(n, size):
        for i, v in enumerate(block_values(a, b)):
            key = _order_keys(v)
            inside = ((key >> 16) + 32768) == found[i][0]
            low[i] += torch.bincount(torch.where(inside, key & 0xFFFF, 1 << 16).long(), minlength=(1 << 16) + 1)
    values = []
    for i, (high, rank) in enumerate(found):
        lo_bits = _from_top(low[i, : 1 << 16], rank)[0]
        key = torch.tensor([((high - 32768) << 16) | lo_bits], dtype=torch.int64).to(torch.int32)
        values.append(float(_order_keys(key).view(torch.float32)))
    return values, maxima


def _pcb_score(
    d: torch.Tensor, total: torch.Tensor, lo: float, hi: float, n: int, out: torch.Tensor, tmp: torch.Tensor
) -> torch.Tensor:
    """PCB's balance of one task vector on a chunk, in ``out``: intra-balancing exp(n * norm(|d|)^2)
    (|d| clipped to [lo, hi] and min-max normalized; 0 when lo == hi) times inter-balancing
    tanh(d * sum_j d_j). ``tmp``: scratch of the chunk's size."""
    torch.abs(d, out=out).clamp_(lo, hi)
    if hi > lo:
        out.sub_(lo).mul_(1.0 / (hi - lo)).square_().mul_(n).exp_()
    else:
        out.fill_(1.0)
    return out.mul_(torch.mul(d, total, out=tmp).tanh_())


def _pcb(method, base, stats: list[DeltaStats], shared, per_model, out=None, lines=None) -> torch.Tensor:
    """PCB-Merging: balance each entry of each task vector by its own magnitude (intra) and its
    agreement with the others (inter), keep each task vector's top ``density`` fraction by balance,
    and merge as the balance-weighted mean, scaled by lambda.

    For input i with task vector d_i (n inputs, one tensor of N entries):
      a_i = clip(|d_i|, lo_i, hi_i), lo_i/hi_i its magnitudes' 1e-4 and 1 - 1e-4 quantiles;
      beta_i = exp(n * ((a_i - lo_i) / (hi_i - lo_i))^2) * tanh(d_i * sum_j d_j);
      t_i = beta_i's value at ascending rank floor(N * (1 - density_i)), T_i = max beta_i;
      s_i = (clip(beta_i, t_i, T_i) - t_i) / (T_i - t_i)  (entries below t_i get 0: dropped);
      merged = base + lambda * sum_i w_i s_i sign(d_i) a_i / max(sum_i s_i, 1e-12).
    Choices the paper leaves open, taken from its reference implementation: the per-model
    normalization of the intra term (its softmax's denominator cancels in the min-max step), tanh
    for the inter term, the 1e-4 outlier clip. Ours: statistics per tensor (the reference flattens
    the whole model), a per-model weight w_i (1 in the paper) in the numerator, a degenerate range
    (hi_i == lo_i: intra term 1; T_i == t_i or density 0: the input is left out of this tensor)
    instead of NaN. The balance depends on the inputs alone: where the memory budget admits it
    (8 B/element per input: the balance and its sorted copy) it is computed once and a candidate's
    thresholds are lookups; otherwise nothing per element is kept, the thresholds come from two
    histogram passes over the balance, recomputed a block at a time, and give the same merge.

    Reference: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
    arXiv:2410.02396.
    """
    n_models, lam, dev = len(stats), float(shared["lambda"]), base.device
    n = base.numel()
    weights = [float(p["weight"]) for p in per_model]
    out = _output(base, out)
    if n == 0:
        return out
    bounds = []
    for s in stats:  # the outlier clip depends on the task vector alone: computed once
        if "pcb_clip" not in s.scalars:
            low_rank, high_rank = int(n * PCB_CLIP), int(n * (1 - PCB_CLIP)) - 1
            high_rank += n if high_rank < 0 else 0
            s.scalars["pcb_clip"] = (s.kth_largest(n - low_rank), s.kth_largest(n - high_rank))
        bounds.append(s.scalars["pcb_clip"])

    def balance(a: int, b: int, key: str, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        L = b - a
        ds = [_f32(s.delta, a, b, _SCRATCH.get(f"{key}d{i}", L, torch.float32, dev)) for i, s in enumerate(stats)]
        total = _SCRATCH.get(f"{key}sum", L, torch.float32, dev).zero_()
        for d in ds:
            total.add_(d)
        tmp = _SCRATCH.get(f"{key}tmp", L, torch.float32, dev)
        outs = into or [_SCRATCH.get(f"{key}s{i}", L, torch.float32, dev) for i in range(n_models)]
        return [_pcb_score(d, total, lo, hi, n_models, o, tmp) for d, (lo, hi), o in zip(ds, bounds, outs)], ds

    # ascending rank floor(N (1 - density)) is the (N - rank)-th largest; density 0 keeps nothing
    ranks = [int(n * (1 - float(p["density"]))) for p in per_model]
    # the balance depends on the inputs alone, not on the candidate's densities and weights: kept,
    # with its sorted copy, where the budget admits every input's (a threshold is then a lookup).
    # The input set is named by the inputs' cache dicts: one per resident task vector, for its life.
    inputs = ",".join(str(id(s.cache)) for s in stats)
    budget = stats[0].budget
    cached = [] if any(s.budget is not budget for s in stats) or budget is None else [None] * n_models
    if cached:
        cached = [s.cached_balance(inputs) for s in stats]
        missing = [i for i, c in enumerate(cached) if c is None]
        for i in missing:
            stats[i].forget("pcb_balance")  # another input set's: one set per task vector
        if missing and budget.admit(8 * n * len(missing)):
            budget.release(8 * n * len(missing))  # each entry reserves its own bytes below
            wholes = {i: torch.empty(n, dtype=torch.float32, device=dev) for i in missing}
            for a, b in _blocks(n, _block_for(dev)):  # every missing balance in one pass
                scores = balance(a, b, "pcb")[0]
                for i in missing:
                    wholes[i][a:b] = scores[i]
            for i in missing:
                cached[i] = stats[i].pcb_balance(inputs, lambda i=i: wholes.pop(i))
        elif missing:
            cached = []
    if cached:
        cuts = [float(k[1][r]) if r < n else None for k, r in zip(cached, ranks)]
        tops = [float(k[1][-1]) for k in cached]
    else:
        ks = [min(n, n - r) if r < n else 1 for r in ranks]
        cuts, tops = _kth_largest_values(lambda a, b: balance(a, b, "pcb")[0], n, ks, dev)
        cuts = [c if r < n else None for c, r in zip(cuts, ranks)]
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    for a, b in _blocks(n, chunk_for(dev)):
        L = b - a
        if cached:
            ds = [_f32(s.delta, a, b, _SCRATCH.get(f"pcbd{i}", L, torch.float32, dev)) for i, s in enumerate(stats)]
            scores = [
                _SCRATCH.get(f"pcbs{i}", L, torch.float32, dev).copy_(k[0][a:b], non_blocking=True)
                for i, k in enumerate(cached)
            ]
        else:
            scores, ds = balance(a, b, "pcb")
        acc = _SCRATCH.get("acc", L, torch.float32, dev).zero_()
        den = _SCRATCH.get("den", L, torch.float32, dev).zero_()
        kept = _SCRATCH.get("tmp", L, torch.float32, dev)
        for d, score, (lo, hi), w, top, t in zip(ds, scores, bounds, weights, tops, cuts):
            if t is None or top <= t:
                continue
            score.clamp_(t, top).sub_(t).mul_(1.0 / (top - t))
            den.add_(score)
            sign = torch.sign(d, out=_SCRATCH.get("sign", L, torch.float32, dev))
            torch.abs(d, out=kept).clamp_(lo, hi).mul_(sign).mul_(score)  # sign(d) clip(|d|, lo, hi)
            acc.add_(kept, alpha=w)
        mixed = acc.div_(den.clamp_(min=1e-12))
        if lam != 1:
            mixed.mul_(lam)
        if lines is None:
            torch.add(flat_base[a:b], mixed, out=flat_out[a:b])
        else:
            flat_out[a:b].copy_(_lines(mixed.add_(flat_base[a:b]), flat_base[a:b], lines))
    return out


def _slerp(
    method, base, stats, shared, per_model, out=None, lines=None, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from ``base`` (t=0) to ``base + delta`` (t=1) over whole tensors,
    linear when the two are (anti)parallel. The angle comes from cached dot products, so a new t
    costs two fused elementwise ops.

    Reference: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; mergekit ``slerp``.
    """
    t, other, base = float(shared["t"]), stats[0], base.float()
    if base.numel() == 0:
        return base.clone()
    bd, dd = other.dots(base)
    bb = float(base.reshape(-1).double() @ base.reshape(-1).double())
    na, nb = math.sqrt(bb), math.sqrt(max(bb + 2 * bd + dd, 0.0))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, (bb + bd) / (na * nb)))
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    # ca * base + cb * (base + delta)
    return _lines(torch.add(base * (ca + cb), other.delta, alpha=cb), base, lines)


def _model_stock(method, base, stats, shared, per_model, out=None, lines=None) -> torch.Tensor:
    """Interpolate the base toward the experts' average by their task vectors' mean cosine.

    Reference: Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
    arXiv:2403.19522; mergekit ``model_stock``.
    """
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
    return _lines((t * avg + (1 - t) * w0).reshape(shape), base, lines)


# --- the registry -----------------------------------------------------------------------------------


def _tv_params(normalize: bool, rescale: bool, sparsify: Sparsifier | None) -> tuple[Param, ...]:
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


def _tv(name, reference, sparsify=None, consensus=False, normalize=False, rescale=False) -> Method:
    return Method(
        name, _tv_params(normalize, rescale, sparsify), reference, _task_vector, sparsify=sparsify, consensus=consensus
    )


#: Consensus Merging's parameters: the TALL masks' lambda per input, and k (masks that must agree).
_TALL_PARAMS = (
    Param("tall_lambda", per_model=True, default=0.4, low=0.0),
    Param("k", per_model=False, default=2, kind=int, low=1, counts_models=True),
)
_CONSENSUS_REFERENCE = (
    'Wang et al., "Localizing Task Information for Improved Model Merging and Compression" '
    "(TALL masks, Consensus Merging), ICML 2024, arXiv:2405.07813"
)


def _consensus(name: str, sparsify: Sparsifier | None, consensus: bool, normalize: bool) -> Method:
    return Method(
        name,
        _tv_params(normalize, False, sparsify) + _TALL_PARAMS,
        _CONSENSUS_REFERENCE,
        _task_vector,
        min_models=2,
        sparsify=sparsify,
        consensus=consensus,
        tall=True,
        in_mergekit=False,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            (Param("weight", per_model=True), Param("normalize", per_model=False, default=True, kind=bool)),
            "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482",
            _linear,
            base_is_origin=False,
        ),
        _tv("task_arithmetic", "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089"),
        _tv(
            "ties",
            "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708",
            sparsify="magnitude",
            consensus=True,
            normalize=True,
        ),
        _tv(
            "dare_ties",
            "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099",
            sparsify="random",
            consensus=True,
            rescale=True,
        ),
        _tv(
            "dare_linear",
            "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099",
            sparsify="random",
            rescale=True,
        ),
        _tv("breadcrumbs", "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795", sparsify="outliers"),
        _tv(
            "breadcrumbs_ties",
            "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795",
            sparsify="outliers",
            consensus=True,
        ),
        _tv(
            "della",
            "Deep et al., DELLA-Merging, arXiv:2406.11617",
            sparsify="della",
            consensus=True,
            normalize=True,
            rescale=True,
        ),
        _tv("della_linear", "Deep et al., DELLA-Merging, arXiv:2406.11617", sparsify="della", rescale=True),
        _consensus("consensus_ta", None, consensus=False, normalize=False),
        # TIES's disjoint sum (normalize false), as the reference builds tau_MTL; tall_lambda's range
        # (0.2-0.6 in the paper) was tuned against it
        _consensus("consensus_ties", "magnitude", consensus=True, normalize=False),
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
            _task_vector,
            sparsify="random",
            rescale_q=True,
            in_mergekit=False,
        ),
        Method(
            "pcb",
            (
                Param("weight", per_model=True, default=1.0),
                Param("density", per_model=True, default=0.1, low=0.0, high=1.0),
                Param("lambda", per_model=False, default=1.0),
            ),
            'Du et al., "Parameter Competition Balancing for Model Merging" (PCB-Merging), NeurIPS 2024, '
            "arXiv:2410.02396",
            _pcb,
            min_models=2,
            in_mergekit=False,
        ),
        Method(
            "slerp",
            (Param("t", per_model=False, low=0.0, high=1.0),),
            "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
            _slerp,
            min_models=1,
            max_models=1,
        ),
        Method(
            "model_stock",
            (Param("filter_wise", per_model=False, default=False, kind=bool),),
            "Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522",
            _model_stock,
            min_models=2,
        ),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MergeError(f"unknown merge method '{name}'; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]
