"""Search spaces: a genome (a vector in a bounded box) <-> a merge recipe.

A space (``search_spaces/*.yaml``) names the base, the models, the merge method (fixed, or a
categorical gene over several), which parameters are searched with their bounds (or fixed), and the
layer structure of every searched parameter:

- ``granularity: model``   one gene per model for the whole network;
- ``granularity: group``   one gene per group of ``group_size`` consecutive layers;
- ``granularity: layer``   one gene per layer;
- ``granularity: smooth``  ``control_points`` genes interpolated linearly across the layers;
- ``granularity: path``    the data-flow space: which layers of which models, in what order, with
  what input scale (``evomerge.search.paths``; a space of its own, without parameter genes);
- ``split: [self_attn, mlp]`` separate genes for tensors whose name contains each filter, plus one
  set for the rest (norms, embeddings, head);
- ``tied: [weight]``       one gene set shared by all models for those parameters;
- ``fixed`` values in place of bounds, and an optional LiNeS post-step with searched alpha/beta.

``decode`` writes mergekit's own structures (gradient lists, ``{filter, value}`` lists), so a
decoded recipe runs unchanged with mergekit; ``encode`` reads them back: exact inverses on the box
for continuous genes (a categorical gene encodes to the middle of its cell).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.configfile import describe, read_yaml
from evomerge.merge.registry import METHODS, get_method, round_count
from evomerge.recipe import FilterValue, Recipe, RecipeError, parse_recipe, resolve_setting
from evomerge.search.genes import Gene, GeneBox, Range, SpaceError
from evomerge.search.paths import PathSpace


class Layers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    granularity: Literal["model", "group", "layer", "smooth"] = "model"
    group_size: int = Field(2, ge=1)
    control_points: int = Field(3, ge=2)
    split: list[str] = Field(default_factory=list)


class Lines(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: Range = Range(fixed=1.0)
    beta: Range = Range(fixed=0.0)


class Select(BaseModel):
    """Expert selection: an inclusion gene per selectable expert (Model-GLUE, FW-Merging).

    A candidate merges the fixed experts (the space's models without a gene) and the selectable
    ones whose gene is >= 0.5 (CMA-ES: a thresholded continuous gene in [0, 1]; Optuna samplers: a
    categorical choice of two). Rules of the decode: fewer than ``min`` experts -> the excluded ones
    with the largest genes join (ties: in the space's order); more than ``max`` -> the included ones
    with the largest genes stay.
    """

    model_config = ConfigDict(extra="forbid")
    #: The experts with an inclusion gene (default: all the space's models).
    experts: list[str] | None = None
    #: Fewest and most experts a candidate merges (fixed ones included).
    min: int = Field(1, ge=0)
    max: int | None = Field(None, ge=1)


class SearchSpace(BaseModel):
    """A parameter space: a merge method's per-layer parameters over the base's task vectors."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[Literal["merge", "path"]] = "merge"
    base: str
    models: list[str] = Field(min_length=1)
    method: str | list[str]
    parameters: dict[str, Range] = Field(default_factory=dict)
    layers: Layers = Field(default_factory=Layers)
    tied: list[str] = Field(default_factory=list)
    lines: Lines | None = None
    select: Select | None = None

    @model_validator(mode="after")
    def _consistent(self):
        methods = [self.method] if isinstance(self.method, str) else self.method
        if not methods:
            raise ValueError("method: give a method or a non-empty list of methods")
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"method: unknown merge method '{m}'; valid: {', '.join(sorted(METHODS))}")
        declared = {p.name: p for m in methods for p in get_method(m).params}
        for name, rng in self.parameters.items():
            if name not in declared:
                raise ValueError(
                    f"parameters.{name}: not a parameter of {', '.join(methods)}; valid: {', '.join(sorted(declared))}"
                )
            if rng.searched and declared[name].kind is bool:
                raise ValueError(f"parameters.{name}: a true/false parameter can only be fixed")
            p = declared[name]
            lo, hi = (rng.low, rng.high) if rng.searched else (rng.fixed, rng.fixed)
            if not isinstance(lo, bool) and (
                (p.low is not None and lo < p.low) or (p.high is not None and hi > p.high)
            ):
                raise ValueError(f"parameters.{name}: bounds [{lo}, {hi}] leave the method's range [{p.low}, {p.high}]")
        for name in self.tied:
            if name not in self.parameters:
                raise ValueError(f"tied: '{name}' is not in parameters")
        if len(set(self.models)) != len(self.models) or self.base in self.models:
            raise ValueError("models: list each expert once, without the base")
        self._check_selection(methods)
        return self

    def _check_selection(self, methods: list[str]) -> None:
        sel = self.select
        if sel is not None:
            if sel.experts is not None:
                unknown = [m for m in sel.experts if m not in self.models]
                if unknown:
                    raise ValueError(f"select.experts: '{unknown[0]}' is not one of the space's models")
                if not sel.experts or len(set(sel.experts)) != len(sel.experts):
                    raise ValueError("select.experts: list at least one of the space's models, each once")
            fixed = len(self.models) - len(self.selectable)
            if sel.min > len(self.models):
                raise ValueError(f"select.min: {sel.min} is more than the space's {len(self.models)} models")
            if sel.max is not None and (sel.max < sel.min or sel.max < fixed):
                raise ValueError(f"select.max: {sel.max} is below select.min or the {fixed} experts without a gene")
            if max(sel.min, fixed) == 0:
                raise ValueError(
                    "select: every expert has an inclusion gene and select.min is 0, so a candidate could merge no "
                    "expert; set select.min to 1 or more"
                )
        fewest = self.fewest_experts
        for m in methods:
            method = get_method(m)
            if fewest < method.min_models:
                where = "select.min" if sel is not None else "models"
                raise ValueError(
                    f"{where}: {m} needs at least {method.min_models} experts; "
                    f"a candidate of this space could merge {fewest}"
                )
            for p in method.params:
                rng = self.parameters.get(p.name)
                if p.counts_models and rng is not None:
                    most = rng.high if rng.searched else rng.fixed
                    if round_count(most) > fewest:
                        raise ValueError(
                            f"parameters.{p.name}: {p.name} up to {most:g} is larger than the number of experts a "
                            f"candidate could merge ({fewest})"
                        )

    @property
    def selectable(self) -> list[str]:
        """The experts with an inclusion gene (none without ``select``)."""
        if self.select is None:
            return []
        return [m for m in self.models if self.select.experts is None or m in self.select.experts]

    @property
    def fewest_experts(self) -> int:
        """The fewest experts a candidate of this space merges."""
        if self.select is None:
            return len(self.models)
        return max(self.select.min, len(self.models) - len(self.selectable))

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @property
    def used_models(self) -> list[str]:
        return [self.base, *self.models]

    @property
    def resident_base(self) -> str:
        return self.base

    def resident_models(self, models: Mapping[str, str]) -> dict[str, str]:
        return dict(models)  # the base, the experts, and any model a seed recipe names

    def genome(self, layer_counts: Mapping[str, int], seed: int = 0) -> Genome:
        return Genome(self, layer_counts[self.base], seed)

    def summary(self, genome: Genome) -> str:
        selection = ""
        if self.select is not None:
            most = self.select.max or len(self.models)
            selection = f"; merges {self.fewest_experts} to {most} of {len(self.models)} experts"
        return (
            f"{genome.dimension} genes for a {genome.num_layers}-layer model; method "
            f"{' | '.join(self.methods)}; granularity {self.layers.granularity}{selection}"
        )


def load_space(path: str | Path):
    """A ``SearchSpace``, or a ``PathSpace`` (``evomerge.search.paths``) for ``layers.granularity: path``."""
    data = read_yaml(path, SpaceError)
    cls = SearchSpace
    layers = data.get("layers") if isinstance(data, dict) else None
    if isinstance(layers, dict) and layers.get("granularity") == "path":
        mixed = [k for k in ("base", "method", "parameters", "tied", "lines") if k in data]
        if mixed:
            raise SpaceError(
                f"{path}: {mixed[0]}: a layer-path space (layers.granularity: path) has no parameter-space genes; "
                "merge in parameter space first and list that merge among the path's models (PS then DFS)"
            )
        cls = PathSpace
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SpaceError(f"{path}: {describe(e)}") from None


def make_genome(space, layers: int | dict[str, int], seed: int = 0):
    """The genome of ``space``: ``layers`` is every model's layer count (name -> layers), or one count
    for all of them."""
    counts = layers if isinstance(layers, dict) else {m: layers for m in space.used_models}
    return space.genome(counts, seed)


class Genome(GeneBox):
    """A space bound to a model with ``num_layers`` layers: the genes, decode and encode."""

    def __init__(self, space: SearchSpace, num_layers: int, seed: int = 0):
        if num_layers < 1:
            raise SpaceError(f"num_layers must be >= 1, got {num_layers}")
        self.space, self.num_layers, self.seed = space, num_layers, seed
        lay = space.layers
        self.positions = {
            "model": 1,
            "group": math.ceil(num_layers / lay.group_size),
            "layer": num_layers,
            "smooth": lay.control_points,
        }[lay.granularity]
        self.parts: list[str | None] = [*lay.split, "*"] if lay.split else [None]
        genes: list[Gene] = []
        if len(space.methods) > 1:
            genes.append(Gene("method", 0.0, float(len(space.methods))))
        for model in space.selectable:
            genes.append(Gene(f"include[{model}]", 0.0, 1.0, param="include", model=model, choices=2))
        shared = {p.name for m in space.methods for p in get_method(m).shared_params}
        for name, rng in space.parameters.items():
            if not rng.searched:
                continue
            owners = [None] if (name in shared or name in space.tied) else space.models
            for model in owners:
                for part in self.parts:
                    for pos in range(self.positions):
                        label = name + (f"[{model}]" if model else "") + (f".{part}" if part else "")
                        label += f"@{pos}" if self.positions > 1 else ""
                        genes.append(Gene(label, rng.low, rng.high, name, model, part, pos))
        if space.lines:
            for key in ("alpha", "beta"):
                rng = getattr(space.lines, key)
                if rng.searched:
                    genes.append(Gene(f"lines.{key}", rng.low, rng.high, f"lines.{key}"))
        self.genes = genes

    # -- decode -----------------------------------------------------------------------------------
    def _method(self, vector) -> str:
        if len(self.space.methods) == 1:
            return self.space.methods[0]
        x = vector[0]
        return self.space.methods[min(int(max(x, 0.0)), len(self.space.methods) - 1)]

    def _layer_values(self, pos_values: list[float]) -> float | list[float]:
        g = self.space.layers.granularity
        if g == "model":
            return pos_values[0]
        if g == "group":
            k = self.space.layers.group_size
            return [pos_values[i // k] for i in range(self.num_layers)] if self.num_layers > 1 else pos_values[0]
        return list(pos_values) if len(pos_values) > 1 else pos_values[0]

    def _setting(self, by_part: dict) -> object:
        if self.parts == [None]:
            return self._layer_values(by_part[None])
        return [
            (
                {"filter": p, "value": self._layer_values(by_part[p])}
                if p != "*"
                else {"value": self._layer_values(by_part[p])}
            )
            for p in self.parts
        ]

    def decode(self, vector) -> Recipe:
        """The recipe at ``vector`` (values clipped to the box)."""
        if len(vector) != self.dimension:
            raise SpaceError(f"vector has {len(vector)} values, the genome has {self.dimension}")
        x = [min(max(float(v), g.low), g.high) for v, g in zip(vector, self.genes)]
        method = get_method(self._method(x))
        names = {p.name for p in method.params}
        collected: dict[tuple, dict] = {}
        lines = {}
        for v, g in zip(x, self.genes):
            if g.param is None or g.param == "include":
                continue
            if g.param.startswith("lines."):
                lines[g.param.split(".")[1]] = v
                continue
            collected.setdefault((g.param, g.model), {}).setdefault(g.part, [0.0] * self.positions)[g.position] = v
        per_model: dict[str, dict] = {m: {} for m in self.space.models}
        shared: dict[str, object] = {}
        model_params = {p.name for p in method.model_params}
        for name, rng in self.space.parameters.items():
            if name not in names:
                continue  # a parameter of another method in the categorical choice
            for model in self.space.models if name in model_params else [None]:
                if rng.searched:
                    key = (name, None if (name in self.space.tied or name not in model_params) else model)
                    value = self._setting(collected[key])
                else:
                    value = rng.fixed
                (per_model[model] if model else shared)[name] = value
        chosen = self._included(x)
        experts = [{"model": m, "parameters": per_model[m]} for m in self.space.models if m in chosen]
        # listed only as the task vectors' origin: a method that averages its inputs would weight it
        base_entry = [{"model": self.space.base}] if method.base_is_origin else []
        data = {"merge_method": method.name, "base_model": self.space.base, "models": base_entry + experts}
        if shared:
            data["parameters"] = shared
        ext = {"seed": self.seed}
        if self.space.lines:
            ext["lines"] = {k: lines.get(k, getattr(self.space.lines, k).fixed) for k in ("alpha", "beta")}
        data["evomerge"] = ext
        try:
            return parse_recipe(data, "<decoded genome>")
        except RecipeError as e:
            raise SpaceError(str(e)) from None

    def _included(self, x: list[float]) -> set[str]:
        """The experts a candidate merges (see ``Select`` for the rules)."""
        genes = {g.model: v for v, g in zip(x, self.genes) if g.param == "include"}
        if not genes:
            return set(self.space.models)
        sel = self.space.select
        fixed = [m for m in self.space.models if m not in genes]
        by_gene = sorted(genes, key=lambda m: -genes[m])  # stable: the space's order among ties
        chosen = [m for m in by_gene if genes[m] >= 0.5]
        most = len(self.space.models) if sel.max is None else sel.max
        want = min(max(len(fixed) + len(chosen), sel.min), most) - len(fixed)
        return set(fixed) | set(by_gene[:want] if want > len(chosen) else chosen[:want])

    # -- encode -----------------------------------------------------------------------------------
    def _probe(self, part: str | None, pos: int) -> tuple[str, float]:
        """A tensor name in ``part`` and the slice position t that gene ``pos`` governs."""
        g = self.space.layers.granularity
        layer = {
            "model": 0,
            "group": pos * self.space.layers.group_size,
            "layer": pos,
            "smooth": round(pos * (self.num_layers - 1) / (self.space.layers.control_points - 1)),
        }[g]
        t = (layer / (self.num_layers - 1)) if self.num_layers > 1 else 1.0
        if g == "smooth":
            t = pos / (self.space.layers.control_points - 1)
        name = f"model.layers.{layer}." + (
            {None: "mlp.up_proj.weight", "*": "input_layernorm.weight"}.get(part) or f"{part}.weight"
        )
        return name, t

    def _read(self, setting, part: str | None, pos: int) -> float | None:
        """The gene's value in a setting: exact for structures ``decode`` writes, else resolved."""
        if isinstance(setting, list) and setting and all(isinstance(e, FilterValue) for e in setting):
            for e in setting:
                if (part is None and e.filter is None) or e.filter == part or (part == "*" and e.filter is None):
                    return self._read(e.value, None, pos)
        elif isinstance(setting, list) and all(isinstance(e, (int, float)) for e in setting):
            g = self.space.layers.granularity
            if g == "group" and len(setting) == self.num_layers:
                return float(setting[pos * self.space.layers.group_size])
            if len(setting) == self.positions:
                return float(setting[pos])
        elif isinstance(setting, (int, float)) and not isinstance(setting, bool):
            return float(setting)
        name, t = self._probe(part, pos)
        value = resolve_setting(setting, name, t)
        return None if value is None or isinstance(value, (bool, str)) else float(value)

    def encode(self, recipe: Recipe) -> list[float]:
        """The genome of ``recipe`` (values clipped to the box; missing ones at the box's middle)."""
        if recipe.models is None:
            raise SpaceError("encode: recipes with slices are not in a space's form")
        by_model = {m.model: (m.parameters or {}) for m in recipe.models}
        out = []
        for g in self.genes:
            value = None
            if g.name == "method":
                if recipe.merge_method not in self.space.methods:
                    raise SpaceError(f"encode: method '{recipe.merge_method}' is not one of {self.space.methods}")
                value = self.space.methods.index(recipe.merge_method) + 0.5
            elif g.param == "include":
                value = 0.75 if g.model in by_model else 0.25
            elif g.param.startswith("lines."):
                lines = recipe.evomerge.lines
                value = getattr(lines, g.param.split(".")[1]) if lines else None
            else:
                sources = [by_model.get(g.model or self.space.models[0], {}), recipe.parameters or {}]
                for scope in sources:
                    if g.param in scope:
                        value = self._read(scope[g.param], g.part, g.position)
                        if value is not None:
                            break
            if value is None:
                value = (g.low + g.high) / 2
            out.append(min(max(float(value), g.low), g.high))
        return out

    # -- known recipes as seeds ----------------------------------------------------------------------
    def uniform_average(self) -> list[float]:
        """Every model weighted 1/n (other genes at their box middle)."""
        n = len(self.space.models)
        return self._with_weights({m: 1.0 / n for m in self.space.models})

    def expert_alone(self, model: str) -> list[float]:
        """Only ``model`` at full weight (the others at their lowest weight)."""
        if model not in self.space.models:
            raise SpaceError(f"'{model}' is not a model of the space")
        return self._with_weights({m: (1.0 if m == model else -math.inf) for m in self.space.models})

    def _with_weights(self, weights: dict[str, float]) -> list[float]:
        out = []
        for g in self.genes:
            if g.param == "weight" and g.model in weights:
                out.append(min(max(weights[g.model], g.low), g.high))
            elif g.param == "include":
                out.append(1.0 if weights.get(g.model, -math.inf) > -math.inf else 0.0)
            else:
                out.append((g.low + g.high) / 2)
        return out
