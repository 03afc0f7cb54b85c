"""Model kinship: how alike the experts' task vectors are, pair by pair, overall and per layer group.

After Hu et al., "Exploring Model Kinship for Merging Large Language Models", arXiv:2410.12613: the
similarity of two fine-tunes' delta parameters (task vectors against a shared base), by Pearson
correlation, cosine similarity and Euclidean distance. Every statistic is a sum accumulated in
float64 a chunk at a time, so the experts are read one tensor at a time (from safetensors, or from
a worker's resident task vectors) and nothing of a model's size is held.

Flags (the rule, stated; thresholds are options of ``evomerge kinship``):
- ``opposed``: overall cosine < ``opposed_below`` (default 0): the two updates point away from each
  other, so adding them cancels part of each;
- ``sign-conflict``: of the entries both experts change, more than ``conflict_above`` (default 0.5)
  change in opposite directions, so a sign election (TIES) drops most of one of them;
- ``near-orthogonal``: |cosine| < ``orthogonal_below`` (default 0.01): nothing shared, each merge
  weight only trades one skill for the other;
- ``redundant``: cosine > ``redundant_above`` (default 0.95): near duplicates, a merge adds little
  beyond either (the paper's saturation of merges between close kin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from evomerge.models.layout import is_pre_layer, layer_index, num_layers
from evomerge.models.source import ModelLoadError
from evomerge.models.weights import ModelSource

#: Elements per chunk of the accumulation.
CHUNK = 1 << 20

#: Column names of the metrics, in the order they are printed.
METRICS = ("cosine", "pearson", "euclidean", "sign_conflict")


@dataclass(frozen=True)
class FlagRule:
    opposed_below: float = 0.0
    conflict_above: float = 0.5
    orthogonal_below: float = 0.01
    redundant_above: float = 0.95

    def flags(self, m: dict[str, float]) -> list[str]:
        out = []
        if m["cosine"] < self.opposed_below:
            out.append("opposed")
        if m["sign_conflict"] > self.conflict_above:
            out.append("sign-conflict")
        if abs(m["cosine"]) < self.orthogonal_below:
            out.append("near-orthogonal")
        if m["cosine"] > self.redundant_above:
            out.append("redundant")
        return out

    def describe(self) -> str:
        return (
            f"opposed: cosine < {self.opposed_below:g}; sign-conflict: over {self.conflict_above:g} of the entries "
            f"both change move in opposite directions; near-orthogonal: |cosine| < {self.orthogonal_below:g}; "
            f"redundant: cosine > {self.redundant_above:g}"
        )


def layer_group(tensor_name: str, num_layers: int, group_size: int) -> str:
    """The group a tensor belongs to: ``embeddings``, ``layers a-b`` (``group_size`` layers), ``head``."""
    layer = layer_index(tensor_name)
    if layer is None:
        return "embeddings" if is_pre_layer(tensor_name) else "head"
    lo = layer // group_size * group_size
    hi = min(lo + group_size, num_layers) - 1
    return f"layers {lo}" if lo == hi else f"layers {lo}-{hi}"


@dataclass
class _Sums:
    """float64 sums over one group: per expert (count, sum, sum of squares) and per pair."""

    n: int = 0
    s: list[float] = field(default_factory=list)
    ss: list[float] = field(default_factory=list)
    dot: dict[tuple[int, int], float] = field(default_factory=dict)
    sqdiff: dict[tuple[int, int], float] = field(default_factory=dict)
    conflict: dict[tuple[int, int], int] = field(default_factory=dict)
    both: dict[tuple[int, int], int] = field(default_factory=dict)

    def metrics(self, i: int, j: int) -> dict[str, float]:
        p = (i, j)
        norm = math.sqrt(self.ss[i] * self.ss[j])
        cosine = self.dot[p] / norm if norm > 0 else 0.0
        n = max(self.n, 1)
        cov = self.dot[p] / n - (self.s[i] / n) * (self.s[j] / n)
        var_i = self.ss[i] / n - (self.s[i] / n) ** 2
        var_j = self.ss[j] / n - (self.s[j] / n) ** 2
        pearson = cov / math.sqrt(var_i * var_j) if var_i > 0 and var_j > 0 else 0.0
        return {
            "cosine": max(-1.0, min(1.0, cosine)),
            "pearson": max(-1.0, min(1.0, pearson)),
            "euclidean": math.sqrt(max(self.sqdiff[p], 0.0)),
            "sign_conflict": self.conflict[p] / self.both[p] if self.both[p] else 0.0,
        }


class Kinship:
    """Accumulates the experts' task vectors tensor by tensor (``add``), then reports (``table``)."""

    def __init__(self, experts: list[str], num_layers: int, group_size: int | None = None):
        if len(experts) < 2:
            raise ValueError(f"kinship compares experts pairwise: give at least 2, got {len(experts)}")
        self.experts = list(experts)
        self.num_layers = max(1, num_layers)
        self.group_size = group_size or max(1, math.ceil(self.num_layers / 4))
        self.pairs = list(combinations(range(len(experts)), 2))
        self.groups: dict[str, _Sums] = {}
        self.total = self._new()

    def _new(self) -> _Sums:
        m = len(self.experts)
        zero = {p: 0.0 for p in self.pairs}
        counts = dict.fromkeys(self.pairs, 0)
        return _Sums(0, [0.0] * m, [0.0] * m, dict(zero), dict(zero), dict(counts), dict(counts))

    @torch.no_grad()
    def add(self, tensor_name: str, tensors: list[torch.Tensor], base: torch.Tensor | None = None) -> None:
        """One tensor of each expert (in ``experts`` order; any float dtype, one device): their task
        vectors, or their weights when ``base`` is given (subtracted a chunk at a time)."""
        group = layer_group(tensor_name, self.num_layers, self.group_size)
        sums = self.groups.setdefault(group, self._new())
        flat = [d.reshape(-1) for d in tensors]
        origin = None if base is None else base.reshape(-1)
        n = flat[0].numel()
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            x = [f[a:b].float() for f in flat]
            if origin is not None:
                o = origin[a:b].float()
                x = [v - o if f.dtype == torch.float32 else v.sub_(o) for v, f in zip(x, flat)]  # never the source
            wide = [v.double() for v in x]  # once per chunk; sums and dot products in float64
            for target in (sums, self.total):
                target.n += b - a
            for i, v in enumerate(wide):
                s, ss = float(v.sum()), float(torch.dot(v, v))
                for target in (sums, self.total):
                    target.s[i] += s
                    target.ss[i] += ss
            for i, j in self.pairs:
                dot = float(torch.dot(wide[i], wide[j]))
                diff = wide[i] - wide[j]
                sqdiff = float(torch.dot(diff, diff))
                both = int(((x[i] != 0) & (x[j] != 0)).sum())  # signs compared, not a product that underflows
                conflict = int(((x[i] > 0) & (x[j] < 0)).sum() + ((x[i] < 0) & (x[j] > 0)).sum())
                for target in (sums, self.total):
                    target.dot[(i, j)] += dot
                    target.sqdiff[(i, j)] += sqdiff
                    target.conflict[(i, j)] += conflict
                    target.both[(i, j)] += both

    def table(self, rule: FlagRule | None = None) -> KinshipTable:
        rule = rule or FlagRule()
        order = sorted(self.groups, key=_group_order)
        rows = []
        for i, j in self.pairs:
            overall = self.total.metrics(i, j)
            rows.append(
                {
                    "a": self.experts[i],
                    "b": self.experts[j],
                    **overall,
                    "groups": {g: self.groups[g].metrics(i, j) for g in order},
                    "flags": rule.flags(overall),
                }
            )
        return KinshipTable(self.experts, order, rows, rule.describe(), self.total.n)


def _group_order(group: str) -> tuple[int, int]:
    if group == "embeddings":
        return (0, 0)
    if group == "head":
        return (2, 0)
    return (1, int(group.split()[1].split("-")[0]))


@dataclass
class KinshipTable:
    experts: list[str]
    groups: list[str]
    #: one per pair: a, b, the overall METRICS, ``groups`` (group -> METRICS), ``flags``
    pairs: list[dict]
    rule: str
    parameters: int

    def to_dict(self) -> dict:
        return {
            "experts": self.experts,
            "groups": self.groups,
            "parameters": self.parameters,
            "rule": self.rule,
            "pairs": self.pairs,
        }

    def format(self) -> str:
        """The overall table, the per-group cosines, the flagged pairs and the rule."""
        width = max(len(f"{p['a']} ~ {p['b']}") for p in self.pairs) + 2
        head = "pair".ljust(width) + "".join(m.rjust(14) for m in METRICS)
        lines = [f"kinship of {len(self.experts)} experts' task vectors ({self.parameters:,} parameters each)", head]
        for p in self.pairs:
            lines.append(f"{p['a']} ~ {p['b']}".ljust(width) + "".join(_num(p[m]).rjust(14) for m in METRICS))
        lines += ["", "cosine by layer group", "pair".ljust(width) + "".join(g.rjust(14) for g in self.groups)]
        for p in self.pairs:
            row = "".join(_num(p["groups"][g]["cosine"]).rjust(14) for g in self.groups)
            lines.append(f"{p['a']} ~ {p['b']}".ljust(width) + row)
        flagged = [p for p in self.pairs if p["flags"]]
        lines.append("")
        if flagged:
            lines.append("unlikely to merge well:")
            lines += [f"  {p['a']} ~ {p['b']}: {', '.join(p['flags'])}" for p in flagged]
        else:
            lines.append("no pair flagged")
        lines += ["flag rules:", *(f"  {r}" for r in self.rule.split("; "))]
        return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def stream_models(
    base_dir: str | Path, expert_dirs: list[str | Path], allow_pickle: bool = False
) -> tuple[int, Iterator[tuple[str, list[torch.Tensor], torch.Tensor]]]:
    """(the base's layer count, an iterator of (tensor name, the experts' tensors, the base's)) read
    from the models' safetensors one tensor at a time: one tensor of each model is held, in its own
    dtype (task vectors are taken a chunk at a time by ``Kinship.add``). Raises ModelLoadError."""

    def source(d) -> ModelSource:
        try:
            return ModelSource(d, allow_pickle)
        except ValueError as e:  # an unreadable config.json
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"{d}: config.json is not valid JSON ({e})") from None

    base = source(base_dir)
    lora = _lora_experts(base, Path(base_dir), expert_dirs)
    experts = [lora.get(i) or source(d) for i, d in enumerate(expert_dirs)]
    for src, d in zip(experts, expert_dirs):
        missing = [] if isinstance(src, dict) else [n for n in base.names() if n not in src.names()]
        if missing:
            raise ModelLoadError(f"{d}: has no tensor '{missing[0]}' of the base")
    layers = num_layers(base.config)

    def tensors() -> Iterator[tuple[str, list[torch.Tensor], torch.Tensor]]:
        try:
            for name in base.names():
                if not base.info(name).dtype.is_floating_point:
                    continue
                b = base.tensor(name)
                row = []
                for src, d in zip(experts, expert_dirs):
                    t = _expert_tensor(src, name, b) if lora else src.tensor(name)
                    if tuple(t.shape) != tuple(b.shape):
                        raise ModelLoadError(
                            f"{d}: tensor '{name}' has shape {tuple(t.shape)}, base has {tuple(b.shape)}"
                        )
                    row.append(t)
                yield (name, row, None) if lora else (name, row, b)
        finally:
            base.close()
            for src in experts:
                if not isinstance(src, dict):
                    src.close()

    return layers, tensors()


def _lora_experts(base: ModelSource, base_dir: Path, expert_dirs: list) -> dict:
    """Position -> factors (``evomerge.merge.lowrank.LoraFactors``) of the experts that are LoRA
    adapters, each checked against the base."""
    from evomerge.models.lora import check_adapter, is_adapter_dir

    found = {i: Path(d) for i, d in enumerate(expert_dirs) if is_adapter_dir(Path(d))}
    if not found:
        return {}
    from evomerge.merge.lowrank import load_factors

    infos = {n: base.info(n) for n in base.names()}
    specs = {n: (i.shape, str(i.dtype)) for n, i in infos.items()}
    shapes = {n: i.shape for n, i in infos.items()}
    return {i: load_factors(check_adapter(d, specs, str(base_dir), base_dir), shapes) for i, d in found.items()}


def _expert_tensor(src, name: str, base: torch.Tensor) -> torch.Tensor:
    """An expert's task vector of tensor ``name`` in float32: a LoRA expert's formed from its factors
    (zero where its adapter targets none), a full expert's its weights minus the base's."""
    if isinstance(src, dict):
        delta = src.get(name)
        return torch.zeros(base.shape) if delta is None else delta.to("cpu").dense()
    return src.tensor(name).float() - base.float()


def kinship_of(
    names: list[str],
    layers: int,
    tensors: Iterable[tuple[str, list[torch.Tensor], torch.Tensor | None]],
    rule: FlagRule | None = None,
    group_size: int | None = None,
) -> KinshipTable:
    """The kinship table of ``(tensor name, tensors, base tensor or None for task vectors)`` items."""
    acc = Kinship(names, layers, group_size)
    for name, row, base in tensors:
        acc.add(name, row, base)
    return acc.table(rule)
