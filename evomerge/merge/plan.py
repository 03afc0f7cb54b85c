"""From a recipe to per-tensor parameters: where a tensor sits, and what each setting is there.

Position follows mergekit: a tensor of layer i in a slice covering layers [lo, hi) resolves its
gradients at t = (i - lo) / (hi - lo - 1) (t = 1 for a one-layer slice); tensors outside the layers
(embeddings before, final norm and head after) resolve at t = 0 in the first and last slice.
Settings are looked up per model in order: the slice source's, the slice's, then the recipe's
``parameters`` (for the ``models`` form: the model entry's, then the recipe's); the first that
yields a value wins, else the method's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.merge.registry import REQUIRED, MergeError, Method, get_method, round_count
from evomerge.models.layout import is_pre_layer, layer_index
from evomerge.recipe import Recipe, Settings, resolve_setting


@dataclass(frozen=True)
class TensorParams:
    """Resolved parameters of one tensor: shared ones, one dict per input, and the LiNeS scale."""

    shared: dict[str, Any]
    per_model: tuple[dict[str, Any], ...]
    lines_scale: float | None


class RecipePlan:
    """A validated recipe bound to a model with ``num_layers`` layers."""

    def __init__(self, recipe: Recipe, num_layers: int):
        self.recipe = recipe
        self.method: Method = get_method(recipe.merge_method)
        self.num_layers = num_layers
        listed = [m.model for m in recipe.models] if recipe.models else [s.model for s in recipe.slices[0].sources]
        if len(set(listed)) != len(listed):
            raise MergeError("a model is listed twice")
        if self.method.base_is_origin:
            if not recipe.base_model:
                raise MergeError(f"{self.method.name} needs a base_model")
            self.inputs = [m for m in listed if m != recipe.base_model]
        else:
            self.inputs = listed
        n = len(self.inputs)
        if n < self.method.min_models or (self.method.max_models and n > self.method.max_models):
            most = self.method.max_models or "any"
            raise MergeError(
                f"{self.method.name} takes {self.method.min_models} to {most} models besides the base, got {n}"
            )
        if recipe.evomerge.lines is not None and not recipe.base_model:
            raise MergeError("the LiNeS post-step (evomerge.lines) needs a base_model")
        if recipe.slices:
            covered = recipe.layer_count()
            if covered != num_layers:
                raise MergeError(f"slices cover layers [0, {covered}) but the model has {num_layers} layers")
        self._check_parameter_names()
        self._check_counts(n)

    # -- validation ----------------------------------------------------------------------------
    def _settings_everywhere(self):
        r = self.recipe
        yield "parameters", r.parameters
        for i, m in enumerate(r.models or []):
            yield f"models[{i}].parameters", m.parameters
        for i, sl in enumerate(r.slices or []):
            yield f"slices[{i}].parameters", sl.parameters
            for j, src in enumerate(sl.sources):
                yield f"slices[{i}].sources[{j}].parameters", src.parameters

    def _check_parameter_names(self) -> None:
        valid = {p.name for p in self.method.params}
        for where, settings in self._settings_everywhere():
            for key in settings or {}:
                if key not in valid:
                    raise MergeError(
                        f"{where}: unknown parameter '{key}' for {self.method.name}; valid: {', '.join(sorted(valid))}"
                    )

    def _check_counts(self, n: int) -> None:
        """A count of models (Consensus Merging's k) cannot exceed the inputs, anywhere it is set."""
        for p in self.method.params:
            if not p.counts_models:
                continue
            for where, settings in self._settings_everywhere():
                if settings and p.name in settings:
                    for v in _numbers(settings[p.name]):
                        if round_count(v) > n:
                            raise MergeError(
                                f"{where}.{p.name}: {p.name} = {v:g} is larger than the number of experts ({n})"
                            )

    # -- resolution ----------------------------------------------------------------------------
    def position(self, tensor_name: str) -> tuple[int, float, float]:
        """(slice index, t within the slice, depth 0..1 across the whole model) of a tensor."""
        n_slices = len(self.recipe.slices) if self.recipe.slices else 1
        layer = layer_index(tensor_name)
        last = max(self.num_layers - 1, 1)
        if layer is None:
            pre = is_pre_layer(tensor_name)
            return (0 if pre else n_slices - 1), 0.0, (0.0 if pre else 1.0)
        if layer >= self.num_layers:
            raise MergeError(f"tensor {tensor_name} is in layer {layer}, beyond the {self.num_layers} layers")
        lo, hi = 0, self.num_layers
        index = 0
        if self.recipe.slices:
            for index, sl in enumerate(self.recipe.slices):  # noqa: B007 -- the slice found is returned
                lo, hi = sl.sources[0].layer_range
                if lo <= layer < hi:
                    break
        length = hi - lo
        t = (layer - lo) / (length - 1) if length > 1 else 1.0
        return index, t, layer / last

    def _scopes(self, slice_index: int, model: str | None) -> list[Settings | None]:
        r = self.recipe
        if r.slices:
            sl = r.slices[slice_index]
            scopes = [src.parameters for src in sl.sources if src.model == model] if model else []
            return [*scopes, sl.parameters, r.parameters]
        scopes = [m.parameters for m in r.models if m.model == model] if model else []
        return [*scopes, r.parameters]

    def _value(self, param, scopes, tensor_name: str, t: float, who: str):
        for scope in scopes:
            if scope and param.name in scope:
                value = resolve_setting(scope[param.name], tensor_name, t)
                if value is not None:
                    return param.check(value, who)
        if param.default is REQUIRED:
            raise MergeError(f"{who}: missing required parameter '{param.name}' for {self.method.name}")
        return param.default

    def resolve(self, tensor_name: str) -> TensorParams:
        slice_index, t, depth = self.position(tensor_name)
        shared = {
            p.name: self._value(p, self._scopes(slice_index, None), tensor_name, t, tensor_name)
            for p in self.method.shared_params
        }
        per_model = tuple(
            {
                p.name: self._value(p, self._scopes(slice_index, m), tensor_name, t, f"{m}: {tensor_name}")
                for p in self.method.model_params
            }
            for m in self.inputs
        )
        lines = self.recipe.evomerge.lines
        scale = None if lines is None else lines.alpha + lines.beta * depth
        return TensorParams(shared, per_model, scale)


def _numbers(setting) -> list[float]:
    """Every number in a setting (a number, a gradient list, {filter, value} entries)."""
    if isinstance(setting, bool):
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    if isinstance(setting, list):
        return [v for e in setting for v in _numbers(e)]
    value = getattr(setting, "value", None)
    return _numbers(value) if value is not None else []
