"""A merge recipe: the one contract between the search and the workers.

A plain, serializable description of one merge (method, base, models, per-layer parameters),
read and written as YAML in a compatible subset of mergekit's configuration format:
``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``slices`` (with
``sources: [{model, layer_range, parameters}]``), ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``. evomerge's own additions live under one key, ``evomerge:`` (the seed of random
methods, the LiNeS post-step, a layer path's input scales); mergekit ignores that key.

A layer path (the data-flow space, ``evomerge.merge.path``) is mergekit's ``passthrough``: slices of
one source each, stacked in order, each source optionally with mergekit's per-tensor ``scale``.

Parameter values follow mergekit's semantics (see ``resolve_setting``):
- a scalar;
- a gradient: a list of numbers interpolated linearly across the layers of a slice;
- a list of ``{filter, value}`` entries: the first whose ``filter`` is a substring of the tensor
  name (or is absent / ``"*"``) gives the value, which may itself be a scalar or a gradient.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.configfile import describe, read_yaml

#: mergekit's method for stacking layers; here the form of a data-flow (layer path) candidate.
PASSTHROUGH = "passthrough"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


Scalar = bool | int | float | str


class FilterValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar]


Setting = Scalar | list[Scalar] | list[FilterValue]
Settings = dict[str, Setting]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Settings | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Settings | None = None

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.layer_range
        if not 0 <= lo < hi:
            raise ValueError(f"layer_range {list(self.layer_range)} must satisfy 0 <= start < end")
        return self


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Settings | None = None


class LinesStep(BaseModel):
    """LiNeS post-step: the merged delta of layer l (0..L-1) is scaled by alpha + beta * l / (L-1);
    tensors before the layers (embeddings) take alpha, those after (final norm, head) alpha + beta.

    Reference: Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
    Model Merging", ICLR 2025, arXiv:2410.17146.
    """

    model_config = ConfigDict(extra="forbid")
    alpha: float = 1.0
    beta: float = 0.0


class Extensions(BaseModel):
    """evomerge-only keys (ignored by mergekit)."""

    model_config = ConfigDict(extra="forbid")
    #: Seed of random methods (DARE and DELLA drop masks): same seed, bit-identical merge.
    seed: int = 0
    lines: LinesStep | None = None
    #: ``passthrough`` layer paths only: the factor the hidden state is multiplied by as it enters
    #: each layer of the path, in path order (absent: all 1). Export folds them into the weights.
    scales: list[float] | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Settings | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    evomerge: Extensions = Field(default_factory=Extensions)

    @model_validator(mode="after")
    def _shape(self):
        if (self.models is None) == (self.slices is None):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.merge_method == PASSTHROUGH:
            return self._path_shape()
        if self.evomerge.scales is not None:
            raise ValueError("evomerge.scales: only a passthrough layer path takes input scales")
        if self.slices:
            first = [s.model for s in self.slices[0].sources]
            for i, sl in enumerate(self.slices):
                ranges = {s.layer_range for s in sl.sources}
                if len(ranges) != 1:
                    raise ValueError(
                        f"slices[{i}]: all sources must share one layer_range (layer stacking is not supported)"
                    )
                if [s.model for s in sl.sources] != first:
                    raise ValueError(f"slices[{i}]: every slice must list the same models in the same order")
                if sl.base_model not in (None, self.base_model):
                    raise ValueError(f"slices[{i}].base_model: a per-slice base model is not supported")
            ends = [self.slices[0].sources[0].layer_range[0]]
            for i, sl in enumerate(self.slices):
                lo, hi = sl.sources[0].layer_range
                if lo != ends[-1]:
                    raise ValueError(
                        f"slices[{i}].layer_range starts at {lo}, expected {ends[-1]}: "
                        "slices must be contiguous and in order"
                    )
                ends.append(hi)
            if ends[0] != 0:
                raise ValueError("slices must start at layer 0")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source 'union' is not supported (use 'base' or a model)")
        return self

    def _path_shape(self):
        """A layer path (mergekit's ``passthrough``): slices of one source each, stacked in order."""
        if not self.slices:
            raise ValueError("passthrough: give the layer path as 'slices' (one source each)")
        if self.base_model is not None or self.parameters:
            raise ValueError("passthrough: a layer path takes no base_model and no parameters")
        for i, sl in enumerate(self.slices):
            if len(sl.sources) != 1 or sl.parameters or sl.base_model:
                raise ValueError(f"slices[{i}]: a passthrough slice has exactly one source and no slice parameters")
            params = sl.sources[0].parameters or {}
            if set(params) - {"scale"}:
                raise ValueError(f"slices[{i}].sources[0].parameters: passthrough takes only 'scale'")
            if "scale" in params and not _constant_setting(params["scale"]):
                raise ValueError(
                    f"slices[{i}].sources[0].parameters.scale: give a number or {{filter, value}} entries with numbers"
                )
        if self.evomerge.scales is not None and any(sl.sources[0].parameters for sl in self.slices):
            raise ValueError("evomerge.scales: give input scales or per-tensor 'scale' parameters, not both")
        scales = self.evomerge.scales
        if scales is not None:
            n = sum(hi - lo for lo, hi in (sl.sources[0].layer_range for sl in self.slices))
            if len(scales) != n:
                raise ValueError(f"evomerge.scales: {len(scales)} values for a path of {n} layers")
            if not all(math.isfinite(v) and v > 0 for v in scales):
                raise ValueError("evomerge.scales: every input scale must be a finite number > 0")
        return self

    @property
    def is_path(self) -> bool:
        """A layer path (``passthrough`` slices), rather than a merge of parameters."""
        return self.merge_method == PASSTHROUGH

    def path(self) -> list[tuple[str, int, float]]:
        """A layer path's layers in order: (model, layer index in that model, input scale)."""
        layers = [(sl.sources[0].model, i) for sl in self.slices for i in range(*sl.sources[0].layer_range)]
        scales = self.evomerge.scales or [1.0] * len(layers)
        return [(m, i, float(s)) for (m, i), s in zip(layers, scales)]

    # --- what the rest of evomerge reads -----------------------------------------------------
    def model_names(self) -> list[str]:
        """The input models in recipe order (the base first if it is not listed)."""
        if self.models:
            names = [m.model for m in self.models]
        else:
            names = list(dict.fromkeys(s.model for sl in self.slices for s in sl.sources))
        if self.base_model and self.base_model not in names:
            names = [self.base_model, *names]
        return names

    def layer_count(self) -> int | None:
        """Layers the slices cover (None for the ``models`` form: all of the base's layers)."""
        if self.is_path:
            return len(self.path())
        return self.slices[-1].sources[0].layer_range[1] if self.slices else None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if data.get("evomerge") == Extensions().model_dump(mode="json", exclude_none=True):
            data.pop("evomerge")
        return yaml.safe_dump(data, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def _constant_setting(setting) -> bool:
    """A number, or filter entries whose values are numbers (no gradients)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if number(setting):
        return True
    return isinstance(setting, list) and all(isinstance(e, FilterValue) and number(e.value) for e in setting)


#: Keys of mergekit's format outside the supported subset, with why.
UNSUPPORTED_KEYS = {
    "modules": "multi-module (vision/audio) configurations",
    "tokenizer": "tokenizer surgery (vocabulary merging)",
    "chat_template": "chat template selection",
    "residual_weight": "slice residual weights",
}


#: Decimal places a recipe's numbers are compared at (``recipe_key``): closer values merge alike.
KEY_DECIMALS = 6


def recipe_key(recipe: Recipe) -> str:
    """A recipe's canonical form: its fields as merged (a model left out of the merge is absent,
    whatever genes it had), numbers rounded to ``KEY_DECIMALS``, keys sorted. Two recipes with one
    key merge to the same weights (the seed of random methods is part of it)."""

    def canonical(value):
        if isinstance(value, float):
            return round(value, KEY_DECIMALS) + 0.0  # -0.0 and 0.0 alike
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        return value

    return json.dumps(canonical(recipe.model_dump(mode="json", exclude_none=True)), sort_keys=True)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; errors name ``source`` and the offending field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {describe(e, UNSUPPORTED_KEYS)}") from None


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_yaml(path, RecipeError), str(path))


# --- parameter resolution (mergekit semantics) ------------------------------------------------


def resolve_setting(setting: Setting | FilterValue, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at relative depth ``t`` (0..1) in its slice.

    A numeric gradient ``[v0, ..., vn]`` is interpolated linearly at ``t * n``; a non-numeric list
    picks the element at ``int(t * n)``; a filter list yields None when no entry matches.
    """
    if isinstance(setting, FilterValue):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, FilterValue) for e in setting):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return resolve_setting(cond.value, tensor_name, t)
        return None
    numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def path_recipe(path: list[tuple[str, int, float]], seed: int = 0) -> Recipe:
    """The passthrough recipe of ``path``: runs of consecutive layers of one model become one slice."""
    if not path:
        raise RecipeError("a layer path needs at least one layer")
    slices: list[dict] = []
    for model, layer, _ in path:
        last = slices[-1]["sources"][0] if slices else None
        if last and last["model"] == model and last["layer_range"][1] == layer:
            last["layer_range"][1] += 1
        else:
            slices.append({"sources": [{"model": model, "layer_range": [layer, layer + 1]}]})
    ext: dict = {"seed": seed}
    scales = [float(s) for _, _, s in path]
    if any(s != 1.0 for s in scales):
        ext["scales"] = scales
    return parse_recipe({"merge_method": PASSTHROUGH, "slices": slices, "evomerge": ext}, "<layer path>")


def fold_scales(recipe: Recipe) -> Recipe:
    """The same model with the input scales folded into the weights: ``evomerge.scales`` become
    mergekit ``scale`` parameters on each layer's ``o_proj``/``down_proj`` (1 / running product),
    so ``mergekit-yaml`` and ``write_path`` both produce it. A recipe without scales is returned as is."""
    if not recipe.is_path or recipe.evomerge.scales is None:
        return recipe
    slices, product = [], 1.0
    for model, layer, scale in recipe.path():
        product *= scale
        factor = 1.0 / product
        last = slices[-1]["sources"][0] if slices else None
        if last and last["model"] == model and last["layer_range"][1] == layer and last["factor"] == factor:
            last["layer_range"][1] += 1
        else:
            slices.append({"sources": [{"model": model, "layer_range": [layer, layer + 1], "factor": factor}]})
    for sl in slices:
        factor = sl["sources"][0].pop("factor")
        if factor != 1.0:
            sl["sources"][0]["parameters"] = {
                "scale": [
                    {"filter": "o_proj", "value": factor},
                    {"filter": "down_proj", "value": factor},
                    {"value": 1.0},
                ]
            }
    data = recipe.model_dump(mode="json", exclude_none=True)
    data["slices"] = slices
    data["evomerge"].pop("scales")
    return parse_recipe(data, "<folded layer path>")
