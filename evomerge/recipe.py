"""A merge recipe: the one contract between the search and the workers.

A plain, serializable description of one merge (method, base, models, per-layer parameters),
read and written as YAML in a compatible subset of mergekit's configuration format:
``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``slices`` (with
``sources: [{model, layer_range, parameters}]``), ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source``. evomerge's own additions live under one key, ``evomerge:`` (the seed of random
methods, the LiNeS post-step); mergekit ignores that key.

Parameter values follow mergekit's semantics (see ``resolve_setting``):
- a scalar;
- a gradient: a list of numbers interpolated linearly across the layers of a slice;
- a list of ``{filter, value}`` entries: the first whose ``filter`` is a substring of the tensor
  name (or is absent / ``"*"``) gives the value, which may itself be a scalar or a gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.configfile import describe, read_yaml


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

    # --- what the rest of evomerge reads -----------------------------------------------------
    def model_names(self) -> list[str]:
        """The input models in recipe order (the base first if it is not listed)."""
        names = [m.model for m in self.models] if self.models else [s.model for s in self.slices[0].sources]
        if self.base_model and self.base_model not in names:
            names = [self.base_model, *names]
        return names

    def layer_count(self) -> int | None:
        """Layers the slices cover (None for the ``models`` form: all of the base's layers)."""
        return self.slices[-1].sources[0].layer_range[1] if self.slices else None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if data.get("evomerge") == Extensions().model_dump(mode="json", exclude_none=True):
            data.pop("evomerge")
        return yaml.safe_dump(data, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


#: Keys of mergekit's format outside the supported subset, with why.
UNSUPPORTED_KEYS = {
    "modules": "multi-module (vision/audio) configurations",
    "tokenizer": "tokenizer surgery (vocabulary merging)",
    "chat_template": "chat template selection",
    "residual_weight": "slice residual weights",
}


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
