"""In-memory materialization: write a recipe's merge into a resident model's parameters in place.

``ResidentMerge`` holds the base weights once and each expert's ``DeltaStats`` (task vector, in the
dtype and place the ``MemoryPolicy`` gives, plus whatever per-element statistics its cache budget
admits). Statistics that are kept are computed on the first candidate that needs them and reused by
every later one; the others are recomputed per candidate, chunk by chunk, with the same result.
Task vectors kept on the host are streamed to the model's device one tensor at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from evomerge.merge.chunks import scratch_bytes, sum64
from evomerge.merge.kernel import merge_tensor
from evomerge.merge.lowrank import LoraFactors, LowRankDelta
from evomerge.merge.lowrank import kept as lowrank_kept
from evomerge.merge.memory import MemoryPolicy, place
from evomerge.merge.plan import RecipePlan
from evomerge.merge.registry import MergeError
from evomerge.merge.stats import CACHE_KINDS, DeltaStats, field_seed
from evomerge.models import layout
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.merge.shared import Fetched


def compute_tensor(
    plan: RecipePlan,
    name: str,
    base: torch.Tensor,
    inputs: list[torch.Tensor | LowRankDelta] | None = None,
    stats: list[DeltaStats] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged tensor ``name`` from the plan's inputs, given either their tensors (``inputs``, in
    ``plan.inputs`` order, a LoRA expert's as its ``LowRankDelta``: nothing is kept) or their resident
    task-vector ``stats``. float32, or ``out`` (any float dtype, each entry rounded once) when the
    method can write into it."""
    params = plan.resolve(name)
    if stats is None:
        base = base.float()
        seed = plan.recipe.evomerge.seed
        stats = [
            DeltaStats(x if isinstance(x, LowRankDelta) else x.float() - base, field_seed(seed, name, i))
            for i, x in enumerate(inputs)
        ]
    return merge_tensor(plan.method, base, stats, params.shared, list(params.per_model), out, params.lines_scale)


@dataclass
class MaterializeResult:
    seconds: float
    #: Tensors whose merge holds NaN or inf (the model then holds them too: score it as failed).
    nonfinite: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.nonfinite


def _zero(base: torch.Tensor) -> DeltaStats:
    """A zero task vector (the base as an input where it is not the origin, as in linear): no storage."""
    return DeltaStats(torch.zeros((), device=base.device).expand(base.shape), 0)


class ResidentMerge:
    """A model object plus resident base weights and experts' task vectors.

    ``model``: a module with the base's architecture (its parameters are overwritten);
    ``base``: the base's state dict, kept in its dtype (copied where it shares the model's storage);
    ``experts``: model name -> state (any mapping; each tensor is read once, one at a time).
    ``shared``: a machine's one copy of the base and task vectors (``evomerge.merge.shared.fetch``):
    a tensor's shared base and task vectors are used as they are, neither copied nor pinned, where
    that base has the parameter's dtype and shape (the task vectors were made from it by the policy's
    rule); elsewhere ``base`` and the experts' tensors are read as without it.
    ``memory`` (default ``MemoryPolicy()``) sets the task vectors' dtype, where base and task vectors
    live, and the cache budget. Recipes must name the base ``base_name`` and experts by the keys of
    ``experts``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base: Mapping[str, torch.Tensor],
        experts: Mapping[str, Mapping[str, torch.Tensor]],
        base_name: str = "base",
        num_layers: int | None = None,
        memory: MemoryPolicy | None = None,
        shared: Fetched | None = None,
    ):
        self.model = model
        self.base_name = base_name
        self.memory = memory or MemoryPolicy()
        # a config's attribute map names the count for families that store it under another key
        declared = getattr(model.config, "num_hidden_layers", None)
        self.num_layers = num_layers or declared or layout.num_layers(model.config.to_dict())
        self.device = next(model.parameters()).device
        self.params = dict(model.named_parameters())
        missing = [n for n in self.params if n not in base]
        if missing:
            raise MergeError(f"base state has no tensor '{missing[0]}' of the model")
        self.homes = self.memory.homes(self.device)
        self.budget = self.memory.budget()
        self.experts = list(experts)
        self.base: dict[str, torch.Tensor] = {}
        self.stats: dict[str, list[DeltaStats]] = {}
        self._field_keys: dict[str, tuple[int, int]] = {}
        self.shared_tensors = 0  # tensors whose base and task vectors are the shared copy's
        for name, param in self.params.items():
            self.stats[name] = self._row(name, param, base, experts, shared)

    def _row(self, name: str, param: torch.Tensor, base, experts, shared: Fetched | None) -> list[DeltaStats]:
        """Tensor ``name``'s base kept (``self.base``) and each expert's task vector, in ``experts`` order:
        the shared copy's where it fits, a LoRA expert's factors (``LoraFactors``), else made here."""
        base_home, expert_home = self.homes
        lora = {e: state for e, state in experts.items() if isinstance(state, LoraFactors)}
        if shared is not None and self._fits(shared, name, param, lora):
            self.base[name] = place(shared.base[name], base_home, pin=False)
            dense = {e: place(shared.deltas[e][name], expert_home, pin=False) for e in experts if e not in lora}
            self.shared_tensors += 1
        else:
            kept = place(base[name], base_home)
            self.base[name] = kept.clone() if kept.data_ptr() == param.data_ptr() else kept
            dense = self._deltas(name, param, kept, {e: s for e, s in experts.items() if e not in lora})
        row = []
        for expert, state in experts.items():
            if expert in lora:
                factors, adapter_dtype = state.get(name), next((f.dtype for f in state.values()), param.dtype)
                dtype = self.memory.task_vector_dtype_for({adapter_dtype}, param.dtype)
                row.append(DeltaStats(lowrank_kept(factors, param.shape, dtype, expert_home), 0, self.budget))
            else:
                row.append(DeltaStats(dense[expert], 0, self.budget))
        return row

    def _deltas(self, name: str, param: torch.Tensor, kept: torch.Tensor, experts) -> dict[str, torch.Tensor]:
        """Full experts' task vectors of tensor ``name`` against the kept base, in the policy's dtype."""
        tensors = {}
        for expert, state in experts.items():
            if name not in state:
                raise MergeError(f"expert '{expert}' has no tensor '{name}'")
            tensors[expert] = state[name]
            if tensors[expert].shape != kept.shape:
                raise MergeError(
                    f"expert '{expert}': tensor '{name}' has shape "
                    f"{tuple(tensors[expert].shape)}, base has {tuple(kept.shape)}"
                )
        dtype = self.memory.task_vector_dtype_for({t.dtype for t in tensors.values()}, param.dtype)
        base_f32 = kept.to(device=self.device, dtype=torch.float32)
        return {
            e: place((t.to(device=self.device, dtype=torch.float32) - base_f32).to(dtype), self.homes[1])
            for e, t in tensors.items()
        }

    def _fits(self, shared: Fetched, name: str, param: torch.Tensor, lora) -> bool:
        b = shared.base.get(name)
        return (
            b is not None
            and b.dtype == param.dtype
            and b.shape == param.shape
            and all(name in shared.deltas.get(e, {}) for e in self.experts if e not in lora)
        )

    def _reseed(self, seed: int, order: list[str]) -> None:
        """Random fields are seeded by (seed, tensor, input position): redraw those that moved."""
        for position, expert in enumerate(order):
            if expert == self.base_name or self._field_keys.get(expert) == (seed, position):
                continue
            i = self.experts.index(expert)
            for name, row in self.stats.items():
                row[i].reseed(field_seed(seed, name, position))
            self._field_keys[expert] = (seed, position)

    def plan(self, recipe: Recipe) -> RecipePlan:
        plan = RecipePlan(recipe, self.num_layers)
        if recipe.base_model not in (None, self.base_name):
            raise MergeError(f"recipe base_model '{recipe.base_model}' is not the resident base '{self.base_name}'")
        unknown = [m for m in plan.inputs if m not in self.experts and m != self.base_name]
        if unknown:
            raise MergeError(f"recipe model '{unknown[0]}' is not resident; have: {', '.join(self.experts)}")
        return plan

    @torch.no_grad()
    def materialize(self, recipe: Recipe, check_finite: bool = True) -> MaterializeResult:
        """Write the recipe's merge into the model's parameters; returns timing and NaN/inf tensors."""
        started = time.perf_counter()
        plan = self.plan(recipe)
        self._reseed(recipe.evomerge.seed, plan.inputs)
        index = {m: i for i, m in enumerate(self.experts)}
        sums = []
        for name, param in self.params.items():
            base = self.base[name].to(self.device, non_blocking=True)  # streamed when kept on the host
            row = self.stats[name]
            stats = [row[index[m]].on(self.device) if m != self.base_name else _zero(base) for m in plan.inputs]
            # contiguous parameters take the merge directly: no temporary, no copy
            merged = compute_tensor(plan, name, base, stats=stats, out=param.data if param.is_contiguous() else None)
            if check_finite:
                sums.append(sum64(merged))
            if merged.data_ptr() != param.data_ptr():
                param.copy_(merged)
        # one synchronization for all tensors: the device never waits on a per-tensor check
        nonfinite = [n for n, s in zip(self.params, torch.stack(sums).tolist()) if not math.isfinite(s)] if sums else []
        if self.device.type == "cuda":  # the timing covers the device's work
            torch.cuda.synchronize(self.device)
        return MaterializeResult(time.perf_counter() - started, nonfinite)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of every tensor this merge holds, by kind: ``model`` (its parameters), ``base``,
        ``task_vectors`` and each of ``CACHE_KINDS``; storages shared between tensors are counted once.
        ``scratch``: this process's reused chunk buffers (shared by all merges in it)."""
        totals = dict.fromkeys(("model", "base", "task_vectors", *CACHE_KINDS), 0)
        seen = set()

        def count(kind: str, t: torch.Tensor) -> None:
            storage = t.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                totals[kind] += storage.nbytes()

        for t in self.params.values():
            count("model", t)
        for t in self.base.values():
            count("base", t)
        rows = [s for row in self.stats.values() for s in row]
        for s in rows:
            for t in s.stored.tensors() if s.lowrank else [s.stored]:
                count("task_vectors", t)
        for kind in CACHE_KINDS:
            for s in rows:
                for t in s.held(kind):
                    count(kind, t)
        totals["scratch"] = scratch_bytes()
        return totals

    def expert_bytes(self) -> dict[str, int]:
        """Bytes each expert's task vectors hold (a LoRA expert's: its factors), storages counted once."""
        out = {}
        for i, expert in enumerate(self.experts):
            seen = {}
            for row in self.stats.values():
                s = row[i]
                for t in s.stored.tensors() if s.lowrank else [s.stored]:
                    storage = t.untyped_storage()
                    seen[(storage.device, storage.data_ptr())] = storage.nbytes()
            out[expert] = sum(seen.values())
        return out

    def clear_cache(self) -> None:
        """Forget every cached statistic (its bytes go back to the budget), e.g. when a search moves
        on to another method."""
        for row in self.stats.values():
            for s in row:
                s.forget()

    @torch.no_grad()
    def restore_base(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.base[name])
