"""In-memory materialization: write a recipe's merge into a resident model's parameters in place.

``ResidentMerge`` holds, on the model's device, the base weights and each expert's ``DeltaStats``
(task vector plus lazily computed magnitude order, prefix sums, seeded uniform fields). Those are
computed on the first candidate that needs them and reused by every later one, so a TIES, DARE,
breadcrumbs or DELLA candidate is a handful of elementwise ops per tensor, like a linear one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from evomerge.merge.methods import DeltaStats, MergeError, all_finite, field_seed, merge_tensor
from evomerge.merge.plan import RecipePlan
from evomerge.recipe import Recipe


def compute_tensor(
    plan: RecipePlan,
    name: str,
    base: torch.Tensor,
    inputs: list[torch.Tensor] | None = None,
    stats: list[DeltaStats] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged float32 tensor ``name`` from the plan's inputs, given either their tensors
    (``inputs``, in ``plan.inputs`` order) or their resident task-vector ``stats``."""
    params = plan.resolve(name)
    base = base.float()
    if stats is None:
        seed = plan.recipe.evomerge.seed
        stats = [DeltaStats(x.float() - base, field_seed(seed, name, i), resident=False)
                 for i, x in enumerate(inputs)]
    merged = merge_tensor(plan.method, base, stats, params.shared, list(params.per_model), out)
    if params.lines_scale is not None and params.lines_scale != 1.0:
        merged.sub_(base).mul_(params.lines_scale).add_(base)
    return merged


@dataclass
class MaterializeResult:
    seconds: float
    #: Tensors whose merge holds NaN or inf (the model then holds them too: score it as failed).
    nonfinite: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.nonfinite


class ResidentMerge:
    """A model object plus resident base weights and experts' task vectors.

    ``model``: a module with the base's architecture (its parameters are overwritten);
    ``base``: the base's state dict; ``experts``: model name -> state dict. All tensors are kept in
    float32 on ``model``'s device. Recipes must name the base ``base_name`` and experts by the keys
    of ``experts``.
    """

    def __init__(self, model: torch.nn.Module, base: dict[str, torch.Tensor],
                 experts: dict[str, dict[str, torch.Tensor]], base_name: str = "base",
                 num_layers: int | None = None):
        self.model = model
        self.base_name = base_name
        self.num_layers = num_layers or int(getattr(model.config, "num_hidden_layers"))
        device = next(model.parameters()).device
        self.params = dict(model.named_parameters())
        missing = [n for n in self.params if n not in base]
        if missing:
            raise MergeError(f"base state has no tensor '{missing[0]}' of the model")
        self.base = {n: base[n].to(device=device, dtype=torch.float32) for n in self.params}
        self.experts = list(experts)
        self.stats: dict[str, list[DeltaStats]] = {}
        self._field_keys: dict[str, tuple[int, int]] = {}
        self._zeros: dict[str, DeltaStats] = {}
        for name in self.params:
            row = []
            for expert, state in experts.items():
                if name not in state:
                    raise MergeError(f"expert '{expert}' has no tensor '{name}'")
                if state[name].shape != self.base[name].shape:
                    raise MergeError(f"expert '{expert}': tensor '{name}' has shape "
                                     f"{tuple(state[name].shape)}, base has {tuple(self.base[name].shape)}")
                delta = state[name].to(device=device, dtype=torch.float32) - self.base[name]
                row.append(DeltaStats(delta, 0))
            self.stats[name] = row

    def _reseed(self, seed: int, order: list[str]) -> None:
        """Random fields are seeded by (seed, tensor, input position): redraw those that moved."""
        for position, expert in enumerate(order):
            if expert == self.base_name or self._field_keys.get(expert) == (seed, position):
                continue
            i = self.experts.index(expert)
            for name, row in self.stats.items():
                s = row[i]
                s.seed = field_seed(seed, name, position)
                s._uniform = None
                s._drop_keys = None
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
        nonfinite = []
        for name, param in self.params.items():
            base = self.base[name]
            row = self.stats[name]
            # where the base is not the origin (linear) it may be an input: a zero task vector, made once
            stats = [row[index[m]] if m != self.base_name else self._zero(name) for m in plan.inputs]
            # float32 parameters take the merge directly: no temporary, no copy
            direct = param.dtype == torch.float32 and param.is_contiguous()
            merged = compute_tensor(plan, name, base, stats=stats, out=param.data if direct else None)
            if check_finite and not all_finite(merged):
                nonfinite.append(name)
            if merged.data_ptr() != param.data_ptr():
                param.copy_(merged)
        return MaterializeResult(time.perf_counter() - started, nonfinite)

    def _zero(self, name: str) -> DeltaStats:
        if name not in self._zeros:
            self._zeros[name] = DeltaStats(torch.zeros_like(self.base[name]), 0)
        return self._zeros[name]

    @torch.no_grad()
    def restore_base(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.base[name])
