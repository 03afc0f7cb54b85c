"""Merge methods: one registry of declared parameters, and the tensor math behind each method.

Every method merges one tensor at a time through the kernel the registry (at the end) gives it:
``merge_tensor(method, base, stats, shared, per_model)``.
What depends only on the inputs (the task vectors, their magnitudes sorted once, cumulative sums, the
seeded uniform field behind random drop masks, DELLA's magnitude ranks) lives in ``DeltaStats``,
computed lazily: the in-memory path keeps it resident across candidates, so a density is a lookup in
the sorted magnitudes rather than a sort; the on-disk path builds it per tensor and drops it.

Semantics follow mergekit's (its ``merge_state_dicts`` is the test oracle) except where noted:
random masks come from a seeded generator per (seed, tensor, input position) instead of the global
RNG, so a merge is reproducible. Rescaling after a random drop restores the delta's L1 norm, as
mergekit does (for DARE this is about 1/density, the paper's 1/(1-p)); the L1 norm a draw keeps is
a lookup in prefix sums sorted by the draw's keys, so it costs no extra pass.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

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
        return value


#: How a task-vector method sparsifies each delta (see _mask_for).
Sparsifier = Literal["magnitude", "random", "outliers", "della"]
#: ``kernel(method, base, stats, shared, per_model, out)``: one merged float32 tensor (see merge_tensor).
Kernel = Callable[["Method", torch.Tensor, list["DeltaStats"], dict[str, Any], list[dict[str, Any]],
                   "torch.Tensor | None"], torch.Tensor]


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


def all_finite(t: torch.Tensor) -> bool:
    """True iff no entry is NaN or inf: one float64 reduction (it cannot overflow from float32
    inputs, and inf - inf is NaN), cheaper than building an isfinite mask."""
    return math.isfinite(float(t.sum(dtype=torch.float64)))


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


@dataclass
class DeltaStats:
    """One model's task vector for one tensor, and what any density or drop mask needs of it.

    ``delta`` is float32 in the tensor's shape. The rest is computed on first use and kept:
    magnitudes sorted descending (a density's threshold is then one lookup), their float64 prefix
    sums (the L1 norm kept by any top-k mask), the L1 norm, the uniform field of random masks
    (seeded by ``seed``) and DELLA's per-row magnitude ranks.
    """

    delta: torch.Tensor
    seed: int
    #: Kept across candidates (in memory): worth sorting once so later lookups are O(1). A
    #: one-shot merge (on disk) computes what it needs directly instead.
    resident: bool = True
    _sorted: torch.Tensor | None = field(default=None, repr=False)
    _cumsum: torch.Tensor | None = field(default=None, repr=False)
    _l1: float | None = field(default=None, repr=False)
    _uniform: torch.Tensor | None = field(default=None, repr=False)
    _della_rank: torch.Tensor | None = field(default=None, repr=False)
    _dots: tuple[float, float] | None = field(default=None, repr=False)
    _drop_keys: dict | None = field(default=None, repr=False)  # eps -> (key, sorted keys, prefix sums)

    @property
    def sorted_desc(self) -> torch.Tensor:
        if self._sorted is None:
            self._sorted = _sort_desc(self.delta.abs())
        return self._sorted

    def top_sum(self, k: int) -> float:
        """Sum of the k largest magnitudes (L1 norm of a top-k mask), O(1) after the first call."""
        if k <= 0:
            return 0.0
        if self._cumsum is None:
            self._cumsum = torch.cumsum(self.sorted_desc.double(), 0)
        return float(self._cumsum[k - 1])

    @property
    def l1(self) -> float:
        if self._l1 is None:
            self._l1 = float(self.delta.abs().sum(dtype=torch.float64))
        return self._l1

    @property
    def uniform(self) -> torch.Tensor:
        if self._uniform is None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            self._uniform = torch.rand(self.delta.shape, generator=gen).to(self.delta.device)
        return self._uniform

    @property
    def della_rank(self) -> torch.Tensor:
        """Magnitude rank of each entry within its row, scaled to [0, 1] (rows: dim 1 of 2-D)."""
        if self._della_rank is None:
            mags = self.delta.abs()
            mags = mags if mags.dim() >= 2 else mags.unsqueeze(0)
            order = mags.argsort(dim=1)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(mags.shape[1], device=mags.device).expand_as(order))
            span = (mags.shape[1] - 1) or 1
            self._della_rank = (ranks.float() / span).reshape(self.delta.shape)
        return self._della_rank

    #: Drop keys kept per tensor and model: DARE's (eps = 0) and the last DELLA eps, so a search
    #: alternating the two methods never re-sorts.
    KEYS_KEPT = 2

    def drop_key(self, eps: float) -> torch.Tensor:
        """Random drop keeps an entry iff key < density - eps, with key = u - 2 eps * rank: DARE is
        eps = 0 (keep with probability density); DELLA's keep probability rises linearly with the
        entry's magnitude rank in its row. For resident stats the keys are also sorted, with prefix
        sums of |delta| in key order, so the L1 norm any threshold keeps is a lookup."""
        return self._keys(eps)[0]

    def _keys(self, eps: float) -> tuple:
        cache = self._drop_keys if self._drop_keys is not None else {}
        self._drop_keys = cache
        if eps in cache:
            cache[eps] = cache.pop(eps)  # most recently used last
            return cache[eps]
        key = self.uniform if eps == 0 else self.uniform - self.della_rank * (2 * eps)
        if not self.resident:
            cache.clear()
            cache[eps] = (key, None, None)
            return cache[eps]
        flat = key.reshape(-1)
        if flat.device.type == "cpu":
            import numpy as np

            order = torch.from_numpy(np.argsort(flat.numpy()))  # ties: any order, same prefix sums
        else:
            order = torch.argsort(flat)
        while len(cache) >= self.KEYS_KEPT:
            cache.pop(next(iter(cache)))
        cache[eps] = (key, flat[order], torch.cumsum(self.delta.reshape(-1)[order].abs().double(), 0))
        return cache[eps]

    def kept_l1(self, eps: float, lo: float) -> float:
        """L1 norm of the entries a drop mask with threshold ``lo`` keeps (exact, O(log n) if resident)."""
        key, keys_sorted, cum = self._keys(eps)
        if keys_sorted is None:
            return float((self.delta.abs() * (key < lo)).sum(dtype=torch.float64))
        k = int(torch.searchsorted(keys_sorted, torch.tensor([lo], dtype=keys_sorted.dtype)).item())
        return float(cum[k - 1]) if k > 0 else 0.0

    def dots(self, base: torch.Tensor) -> tuple[float, float]:
        """(base . delta, delta . delta): with |base|^2 they give slerp's angle for any t."""
        if self._dots is None:
            b, d = base.reshape(-1).double(), self.delta.reshape(-1).double()
            self._dots = (float(b @ d), float(d @ d))
        return self._dots


# --- the merge of one tensor ----------------------------------------------------------------------

#: Elements per chunk of the fused loops: the working set (a few float32 buffers) stays in cache.
CHUNK = int(os.environ.get("EVOMERGE_MERGE_CHUNK", 1 << 16))


@dataclass(frozen=True)
class _Mask:
    """How one input's delta is masked for one tensor: mode and its scalars."""

    mode: str  # "all", "none", "top" (|d| > lo), "band" (lo < |d| <= hi), "drop" (drop_key(hi) < lo)
    lo: float = 0.0
    hi: float = 0.0
    scale: float | None = None  # rescale factor applied after masking


def _shrink(threshold: float) -> float:
    """hardshrink's lambda that keeps |v| >= threshold: the largest float32 below it (0 stays 0)."""
    if threshold <= 0:
        return 0.0
    t = torch.tensor(threshold, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(0.0)))


def _mask_for(kind: Sparsifier | None, s: DeltaStats, p: dict[str, Any], rescale: bool) -> _Mask:
    density = p.get("density", 1.0)
    n = s.delta.numel()
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
        return _Mask("top", _shrink(float(s.sorted_desc[k - 1])), scale=scale)
    if kind == "outliers":
        target = int(density * n)
        if target == 0:
            return _Mask("none")
        n_top = min(int(p.get("gamma", 0.01) * n), n - target)
        scale = None
        if rescale:
            before, after = s.l1, s.top_sum(n_top + target) - s.top_sum(n_top)
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return _Mask("band", _shrink(float(s.sorted_desc[n_top + target - 1])), float(s.sorted_desc[n_top]), scale)
    if kind in ("random", "della"):
        if density <= 0:
            return _Mask("none")
        eps = p.get("epsilon", 0.15) if kind == "della" else 0.0
        if kind == "della" and (density + eps >= 1 or density - eps <= 0):
            raise MergeError(f"della: density {density} +/- epsilon {eps} must stay inside (0, 1)")
        lo = density - eps
        scale = None
        if rescale:  # back to the delta's L1 norm: what this draw keeps is a prefix-sum lookup
            before, after = s.l1, s.kept_l1(eps, lo)
            scale = before / after if before >= 1e-7 and after >= 1e-7 else None
        return _Mask("drop", lo, eps, scale=scale)
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


_SCRATCH = _Scratch()




def _masked(m: _Mask, s: DeltaStats, a: int, b: int, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Write input ``s``'s masked (and rescaled) delta for flat range [a, b) into ``out``.

    Float-only ops: comparisons into bool tensors and bool-conditioned ``where`` cost several times
    more than arithmetic on CPU. Kept entries are the delta's own values, dropped ones exactly 0.
    """
    d = s.delta.reshape(-1)[a:b]
    if m.mode == "all":
        return out.copy_(d)
    if m.mode == "none":
        return out.zero_()
    if m.mode == "top":  # |d| > lo (lo: just below the kept threshold)
        torch.hardshrink(d, m.lo, out=out)
    elif m.mode == "band":  # lo < |d| <= hi
        torch.hardshrink(d, m.lo, out=out)
        out.sub_(torch.hardshrink(d, m.hi, out=tmp))
    else:  # drop (hi = epsilon): keep where key < lo
        torch.lt(s.drop_key(m.hi).reshape(-1)[a:b], m.lo, out=tmp)
        torch.mul(d, tmp, out=out)
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
) -> torch.Tensor:
    """Merge one tensor from the inputs' task vectors against ``base``; float32 result, written
    into ``out`` (a contiguous float32 tensor of base's shape) when the method allows.

    ``per_model[i]`` holds input i's resolved parameters. Where the base is not the origin (linear),
    an input that is the base itself is a zero task vector.
    """
    return method.kernel(method, base.float(), stats, shared, per_model, out)


def _linear(method, base, stats, shared, per_model, out=None) -> torch.Tensor:
    """Weighted average of the inputs (normalized by the weights' sum unless normalize=false).

    Reference: Wortsman et al., "Model soups", ICML 2022, arXiv:2203.05482; mergekit ``linear``.
    """
    weights = [float(p["weight"]) for p in per_model]
    total = sum(weights)
    if shared.get("normalize", True) and total == 0:
        raise MergeError("linear: the weights sum to 0, cannot normalize")
    out = torch.empty_like(base) if out is None else out
    flat_out, flat_base, n = out.view(-1), base.reshape(-1), base.numel()
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        acc = _SCRATCH.get("acc", b - a, torch.float32, base.device).zero_()
        x = _SCRATCH.get("x", b - a, torch.float32, base.device)
        for s, w in zip(stats, weights):
            torch.add(flat_base[a:b], s.delta.reshape(-1)[a:b], out=x)  # the input's own weights
            acc.add_(x, alpha=w)
        if shared.get("normalize", True):
            acc.div_(total)
        flat_out[a:b].copy_(acc)
    return out


def _task_vector(method, base, stats: list[DeltaStats], shared, per_model, out=None) -> torch.Tensor:
    """Generalized task arithmetic: mask, weight, optionally elect signs, normalize, scale by lambda.

    Elementwise in mergekit's order of operations, so results agree bit for bit; chunked so that
    every intermediate lives in a reused cache-sized buffer.

    References: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089;
    Yadav et al., "TIES-Merging", NeurIPS 2023, arXiv:2306.01708 (trim, elect sign by sum, disjoint
    mean); Yu et al., "Language Models are Super Mario" (DARE), ICML 2024, arXiv:2311.03099;
    Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024, arXiv:2312.06795; Deep et al.,
    "DELLA-Merging", arXiv:2406.11617 (MAGPRUNE); mergekit's generalized task arithmetic.
    """
    rescale, normalize, lam = bool(shared["rescale"]), bool(shared["normalize"]), float(shared["lambda"])
    weights = [float(p["weight"]) for p in per_model]
    masks = [_mask_for(method.sparsify, s, p, rescale) for s, p in zip(stats, per_model)]
    # random masks: no exact order of operations to keep, so fold the rescale and the weight
    masks = [_Mask(m.mode, m.lo, m.hi, (m.scale or 1.0) * w) if m.mode == "drop" else m
             for m, w in zip(masks, weights)]
    total = sum(weights)
    out = torch.empty_like(base) if out is None else out
    flat_out, flat_base, n, dev = out.view(-1), base.reshape(-1), base.numel(), base.device
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
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
        if lam != 1:
            mixed.mul_(lam)
        torch.add(flat_base[a:b], mixed, out=flat_out[a:b])
    return out


def _slerp(method, base, stats, shared, per_model, out=None, dot_threshold: float = 0.9995,
           eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``base`` (t=0) to ``base + delta`` (t=1) over whole tensors,
    linear when the two are (anti)parallel. The angle comes from cached dot products, so a new t
    costs two fused elementwise ops.

    Reference: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; mergekit ``slerp``.
    """
    t, other = float(shared["t"]), stats[0]
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
    return torch.add(base * (ca + cb), other.delta, alpha=cb)


def _model_stock(method, base, stats, shared, per_model, out=None) -> torch.Tensor:
    """Interpolate the base toward the experts' average by their task vectors' mean cosine.

    Reference: Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
    arXiv:2403.19522; mergekit ``model_stock``.
    """
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
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)


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
    return Method(name, _tv_params(normalize, rescale, sparsify), reference, _task_vector,
                  sparsify=sparsify, consensus=consensus)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", (Param("weight", per_model=True),
                          Param("normalize", per_model=False, default=True, kind=bool)),
               "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482", _linear, base_is_origin=False),
        _tv("task_arithmetic", "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089"),
        _tv("ties", "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708",
            sparsify="magnitude", consensus=True, normalize=True),
        _tv("dare_ties", "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099",
            sparsify="random", consensus=True, rescale=True),
        _tv("dare_linear", "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv:2311.03099",
            sparsify="random", rescale=True),
        _tv("breadcrumbs", "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795",
            sparsify="outliers"),
        _tv("breadcrumbs_ties", "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795",
            sparsify="outliers", consensus=True),
        _tv("della", "Deep et al., DELLA-Merging, arXiv:2406.11617",
            sparsify="della", consensus=True, normalize=True, rescale=True),
        _tv("della_linear", "Deep et al., DELLA-Merging, arXiv:2406.11617", sparsify="della", rescale=True),
        Method("slerp", (Param("t", per_model=False, low=0.0, high=1.0),),
               "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985", _slerp,
               min_models=1, max_models=1),
        Method("model_stock", (Param("filter_wise", per_model=False, default=False, kind=bool),),
               "Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522", _model_stock, min_models=2),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MergeError(f"unknown merge method '{name}'; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]
