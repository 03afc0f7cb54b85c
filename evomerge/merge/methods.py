"""Merge methods: one registry of declared parameters, and the tensor math behind each method.

Every method merges one tensor at a time: ``merge_tensor(method, base, inputs, shared, per_model)``.
What depends only on the inputs (the task vectors, their magnitudes sorted once, cumulative sums, the
seeded uniform field behind random drop masks, DELLA's magnitude ranks) lives in ``DeltaStats``,
computed lazily: the in-memory path keeps it resident across candidates, so a density is a lookup in
the sorted magnitudes rather than a sort; the on-disk path builds it per tensor and drops it.

Semantics follow mergekit's (its ``merge_state_dicts`` is the test oracle) except where noted:
DARE rescales kept entries by 1/density (the paper's 1/(1-p)), and random masks come from a seeded
generator per (seed, tensor, model) instead of the global RNG, so a merge is reproducible.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

REQUIRED = object()


class MergeError(ValueError):
    """A merge that cannot be computed as asked (bad parameter, incompatible inputs, NaN)."""


@dataclass(frozen=True)
class Param:
    """A declared method parameter.

    ``per_model``: set per input model (else one value shared by all inputs of a tensor);
    ``with_base``: a per-model parameter the base model takes as well (linear's weight).
    """

    name: str
    per_model: bool
    default: Any = REQUIRED
    kind: type = float
    low: float | None = None
    high: float | None = None
    with_base: bool = False

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


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    reference: str
    needs_base: bool = True
    #: Bounds on the number of non-base input models.
    min_models: int = 1
    max_models: int | None = None
    #: For task-vector methods: how each delta is sparsified, and whether signs are elected.
    sparsify: str | None = None
    consensus: bool = False
    family: str = "task_vector"

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


def _tv_params(normalize: bool, rescale: bool, sparsify: str | None) -> tuple[Param, ...]:
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
    return Method(name, _tv_params(normalize, rescale, sparsify), reference, sparsify=sparsify,
                  consensus=consensus)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("linear", (Param("weight", per_model=True, with_base=True),
                          Param("normalize", per_model=False, default=True, kind=bool)),
               "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482",
               needs_base=False, family="linear"),
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
               "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985",
               min_models=1, max_models=1, family="slerp"),
        Method("model_stock", (Param("filter_wise", per_model=False, default=False, kind=bool),),
               "Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522", min_models=2, family="model_stock"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MergeError(f"unknown merge method '{name}'; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# --- per-(tensor, model) statistics -------------------------------------------------------------

def field_seed(seed: int, tensor_name: str, model: str) -> int:
    """The generator seed of one random field: stable across processes and platforms."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class DeltaStats:
    """One model's task vector for one tensor, and what any density or drop mask needs of it.

    Everything but ``delta`` is computed on first use and kept (float32, shape of the tensor unless
    noted). ``seed`` fixes the uniform field behind random masks.
    """

    delta: torch.Tensor
    seed: int
    _abs: torch.Tensor | None = field(default=None, repr=False)
    _sorted: torch.Tensor | None = field(default=None, repr=False)  # |delta| descending, flat
    _cumsum: torch.Tensor | None = field(default=None, repr=False)  # float64 prefix sums of _sorted
    _uniform: torch.Tensor | None = field(default=None, repr=False)
    _della_rank: torch.Tensor | None = field(default=None, repr=False)

    @property
    def abs(self) -> torch.Tensor:
        if self._abs is None:
            self._abs = self.delta.abs()
        return self._abs

    @property
    def sorted_desc(self) -> torch.Tensor:
        if self._sorted is None:
            self._sorted = torch.sort(self.abs.reshape(-1), descending=True).values
        return self._sorted

    def top_sum(self, k: int) -> float:
        """Sum of the k largest magnitudes (L1 norm of a top-k mask), O(1) after the first call."""
        if k <= 0:
            return 0.0
        if self._cumsum is None:
            self._cumsum = torch.cumsum(self.sorted_desc.double(), 0)
        return float(self._cumsum[k - 1])

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
            mags = self.abs if self.abs.dim() >= 2 else self.abs.unsqueeze(0)
            ranks = mags.argsort(dim=1).argsort(dim=1).float()
            span = (mags.shape[1] - 1) or 1
            self._della_rank = (ranks / span).reshape(self.delta.shape)
        return self._della_rank


def _l1_scale(stats: DeltaStats, kept: torch.Tensor) -> float:
    """Factor that restores the L1 norm of the delta after a mask (1 when either norm is ~0)."""
    before = float(stats.abs.sum(dtype=torch.float64))
    after = float(kept.abs().sum(dtype=torch.float64))
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def sparsified(stats: DeltaStats, kind: str, p: dict[str, float], rescale: bool) -> torch.Tensor:
    """The delta with the method's mask applied (and rescaled if asked); may alias stats.delta."""
    delta = stats.delta
    density = p.get("density", 1.0)
    n = delta.numel()
    if kind == "magnitude":
        if density >= 1:
            return delta
        if density <= 0 or n == 0:
            return torch.zeros_like(delta)
        k = max(1, int(density * n))
        kept = torch.where(stats.abs >= stats.sorted_desc[k - 1], delta, 0.0)
        if rescale:
            before, after = float(stats.abs.sum(dtype=torch.float64)), stats.top_sum(k)
            if before >= 1e-7 and after >= 1e-7:
                kept.mul_(before / after)
        return kept
    if kind == "outliers":
        if density >= 1:
            return delta
        target = int(density * n)
        n_top = min(int(p.get("gamma", 0.01) * n), n - target)
        if target == 0:
            return torch.zeros_like(delta)
        hi, lo = stats.sorted_desc[n_top], stats.sorted_desc[n_top + target - 1]
        kept = torch.where((stats.abs <= hi) & (stats.abs >= lo), delta, 0.0)
        if rescale:
            after = stats.top_sum(n_top + target) - stats.top_sum(n_top)
            before = float(stats.abs.sum(dtype=torch.float64))
            if before >= 1e-7 and after >= 1e-7:
                kept.mul_(before / after)
        return kept
    if kind == "random":
        if density >= 1:
            return delta
        kept = torch.where(stats.uniform < density, delta, 0.0)
        if rescale and density > 0:
            kept.mul_(1.0 / density)
        return kept
    if kind == "della":
        if density >= 1:
            return delta
        if density <= 0:
            return torch.zeros_like(delta)
        eps = p.get("epsilon", 0.15)
        if density + eps >= 1 or density - eps <= 0:
            raise MergeError(f"della: density {density} +/- epsilon {eps} must stay inside (0, 1)")
        keep_p = stats.della_rank * (2 * eps) + (density - eps)
        kept = torch.where(stats.uniform < keep_p, delta, 0.0)
        if rescale:
            kept.mul_(_l1_scale(stats, kept))
        return kept
    raise MergeError(f"unknown sparsification '{kind}'")


# --- the merge of one tensor ----------------------------------------------------------------------

def merge_tensor(
    method: Method,
    base: torch.Tensor | None,
    inputs: list[torch.Tensor | DeltaStats],
    shared: dict[str, Any],
    per_model: list[dict[str, Any]],
    base_params: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Merge one tensor; float32 result.

    ``inputs``: the non-base models' tensors (linear, slerp, model_stock) or their ``DeltaStats``
    against ``base`` (task-vector methods). ``per_model[i]`` holds input i's resolved parameters;
    ``base_params`` the base's own (linear only, when the base is weighted like any input).
    """
    if method.family == "linear":
        return _linear(base, inputs, shared, per_model, base_params)
    if method.family == "slerp":
        return _slerp(float(shared["t"]), base.float(), inputs[0].float())
    if method.family == "model_stock":
        return _model_stock(base.float(), [x.float() for x in inputs], bool(shared["filter_wise"]))
    return _task_vector(method, base, inputs, shared, per_model)


def _linear(base, inputs, shared, per_model, base_params) -> torch.Tensor:
    tensors = list(inputs)
    weights = [float(p["weight"]) for p in per_model]
    if base is not None and base_params is not None:
        tensors.insert(0, base)
        weights.insert(0, float(base_params["weight"]))
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        acc.add_(t.float(), alpha=w)
    if shared.get("normalize", True):
        total = sum(weights)
        if total == 0:
            raise MergeError("linear: the weights sum to 0, cannot normalize")
        acc.div_(total)
    return acc


def _task_vector(method, base, stats: list[DeltaStats], shared, per_model) -> torch.Tensor:
    rescale = bool(shared["rescale"])
    weights = [float(p["weight"]) for p in per_model]
    contribs = []
    for s, p, w in zip(stats, per_model, weights):
        d = sparsified(s, method.sparsify, p, rescale) if method.sparsify else s.delta
        contribs.append(d * w)
    if method.consensus:
        # Elect a sign per entry by the sum of weighted deltas (TIES "sum"); keep agreeing entries.
        pos = torch.zeros_like(contribs[0])
        neg = torch.zeros_like(contribs[0])
        for c in contribs:
            pos.add_(c.clamp(min=0))
            neg.add_(c.clamp(max=0))
        positive = (pos + neg) >= 0
        mixed = torch.where(positive, pos, neg)
        if shared["normalize"]:
            wpos = torch.zeros_like(pos)
            wneg = torch.zeros_like(pos)
            for c, w in zip(contribs, weights):
                wpos.add_((c > 0).float(), alpha=w)
                wneg.add_((c < 0).float(), alpha=w)
            divisor = torch.where(positive, wpos, wneg)
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
    else:
        mixed = contribs[0].clone() if len(contribs) == 1 else torch.stack(contribs).sum(0)
        if shared["normalize"]:
            total = sum(weights)
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    lam = float(shared["lambda"])
    if lam != 1:
        mixed.mul_(lam)
    return base.float() + mixed


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
           eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, linear when they are (anti)parallel."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return v0.clone()
    na, nb = a.norm(), b.norm()
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = torch.dot(a / na, b / nb).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * v0 + (torch.sin(t * theta) / s) * v1


def _model_stock(w0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Interpolate the base toward the experts' average by their task vectors' mean cosine."""
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
