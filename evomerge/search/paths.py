"""The data-flow space: a genome over layer paths (Akiba et al., "Evolutionary Optimization of Model
Merging Recipes", arXiv:2403.13187, section 3.2).

The source models' layers are laid out in order (every layer of the first model, then of the
second, ...) and the sequence is repeated ``repeats`` times: T slots. Each slot has an inclusion
gene in [-1, 1]; the slot is in the path when its gene is > 0, so CMA-ES and Optuna's samplers
search it as a continuous box unchanged. Each included slot's input scale (the factor the hidden
state is multiplied by as it enters the layer) is either a per-slot gene (the default), fixed, or,
with ``transitions: true``, the paper's matrix W: one gene per (previous source layer -> next
source layer) pair, the previous being the embedding for the path's first layer.

Rules of the decode, stated because the paper leaves them open:
- ``fix_ends: true``: the first slot (layer 0 of the first model) and the last slot (the last
  layer of the last model, in the last repeat) are always in the path, without genes;
- a genome whose inclusion genes are all <= 0 keeps the slot with the largest gene (a path has at
  least one layer);
- with ``max_layers``, a longer path keeps the ``max_layers`` slots with the largest inclusion
  genes (fixed ends first), in sequence order.

A space file::

    models: [ps-merge, expert-rev]
    layers: {granularity: path, repeats: 2, fix_ends: false, scale: {low: 0.5, high: 1.5}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.recipe import Recipe
from evomerge.search.genes import Gene, GeneBox, Range, SpaceError

#: Bounds of an inclusion gene; included when > 0.
INCLUDE = (-1.0, 1.0)


class PathLayers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    granularity: Literal["path"]
    #: r: how many times the models' layer sequence is repeated (T = r x the models' layers).
    repeats: int = Field(2, ge=1, le=16)
    #: The first and last slots always included (no genes for them).
    fix_ends: bool = False
    #: Input scale of each included layer: searched (low/high) or fixed.
    scale: Range = Range(low=0.5, high=1.5)
    #: The paper's transition matrix W instead of per-slot scales (one gene per source-layer pair).
    transitions: bool = False
    #: At most this many layers in a path (default: no cap beyond the T slots).
    max_layers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _scale(self):
        lo = self.scale.low if self.scale.searched else self.scale.fixed
        if isinstance(lo, bool) or lo <= 0:
            raise ValueError("scale: input scales must be > 0")
        if self.transitions and not self.scale.searched:
            raise ValueError("transitions: the matrix W is searched; give scale low/high for its bounds")
        if self.fix_ends and self.max_layers == 1:
            raise ValueError("max_layers: fix_ends keeps two layers; max_layers must be at least 2")
        return self


class PathSpace(BaseModel):
    """A search space over layer paths (``layers.granularity: path``)."""

    model_config = ConfigDict(extra="forbid")
    #: The path's source models, in sequence order (the first gives the embedding of a path that
    #: starts in it; the last model's last layer ends the sequence).
    models: list[str] = Field(min_length=1)
    layers: PathLayers

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: list each model once")
        return self

    #: The parameter-space spaces' interface, where it has a meaning here.
    methods: ClassVar[list[str]] = ["passthrough"]
    kind: ClassVar[Literal["merge", "path"]] = "path"
    #: No task vectors: a path stacks the models' own layers.
    base: ClassVar[None] = None

    @property
    def used_models(self) -> list[str]:
        return list(self.models)

    @property
    def resident_base(self) -> str:
        return self.models[0]

    def resident_models(self, models: Mapping[str, str]) -> dict[str, str]:
        return {m: models[m] for m in self.models}  # held whole, nothing else

    def genome(self, layer_counts: Mapping[str, int], seed: int = 0) -> PathGenome:
        return PathGenome(self, dict(layer_counts), seed)

    def summary(self, genome: PathGenome) -> str:
        lay = self.layers
        scale = f"[{lay.scale.low:g}, {lay.scale.high:g}]" if lay.scale.searched else f"fixed {lay.scale.fixed:g}"
        counts = [genome.layer_counts[m] for m in self.models]
        layers = str(counts[0]) if len(set(counts)) == 1 else " / ".join(map(str, counts))
        return (
            f"{genome.dimension} genes for {len(self.models)} models of {layers} layers; layer path "
            f"over {len(genome.slots)} slots ({' + '.join(self.models)}, x{lay.repeats}); "
            f"{'transition matrix W' if lay.transitions else 'input scale per slot'} {scale}; "
            f"fixed ends: {'yes' if lay.fix_ends else 'no'}; at most {genome.longest} layers"
        )


@dataclass(frozen=True)
class Slot:
    model: str
    layer: int
    repeat: int

    @property
    def label(self) -> str:
        return f"{self.model}.{self.layer}"


class PathGenome(GeneBox):
    """A path space bound to the models' layer counts: the genes, decode and encode."""

    def __init__(self, space: PathSpace, layer_counts: dict[str, int], seed: int = 0):
        missing = [m for m in space.models if m not in layer_counts]
        if missing:
            raise SpaceError(f"no layer count for model '{missing[0]}'")
        self.space, self.seed = space, seed
        lay = space.layers
        self.layer_counts = {m: int(layer_counts[m]) for m in space.models}
        self.slots = [
            Slot(m, i, r) for r in range(lay.repeats) for m in space.models for i in range(self.layer_counts[m])
        ]
        ends = {0, len(self.slots) - 1} if lay.fix_ends else set()
        self.fixed = sorted(ends)
        genes: list[Gene] = []
        self.include_gene: dict[int, int] = {}
        for k, s in enumerate(self.slots):
            if k not in ends:
                self.include_gene[k] = len(genes)
                genes.append(Gene(f"include[{s.label}]@r{s.repeat}", *INCLUDE, param="include", position=k))
        self.scale_gene: dict[object, int] = {}
        if lay.scale.searched and not lay.transitions:
            for k, s in enumerate(self.slots):
                self.scale_gene[k] = len(genes)
                genes.append(Gene(f"scale[{s.label}]@r{s.repeat}", lay.scale.low, lay.scale.high, param="scale"))
        elif lay.transitions:
            sources = ["embed"] + list(dict.fromkeys(s.label for s in self.slots))
            for a in sources:
                for b in sources[1:]:
                    self.scale_gene[(a, b)] = len(genes)
                    genes.append(Gene(f"w[{a}>{b}]", lay.scale.low, lay.scale.high, param="scale"))
        self.genes = genes

    @property
    def longest(self) -> int:
        """The most layers a decoded path can have."""
        return min(len(self.slots), self.space.layers.max_layers or len(self.slots))

    # -- decode -----------------------------------------------------------------------------------
    def _chosen(self, x: list[float]) -> list[int]:
        inc = {k: x[g] for k, g in self.include_gene.items()}
        chosen = self.fixed + [k for k, v in inc.items() if v > 0]
        if not chosen:
            chosen = [max(inc, key=lambda k: (inc[k], -k))]
        cap = self.space.layers.max_layers
        if cap and len(chosen) > cap:
            rank = sorted(chosen, key=lambda k: (k not in self.fixed, -inc.get(k, 0.0), k))
            chosen = rank[:cap]
        return sorted(chosen)

    def path(self, vector) -> list[tuple[str, int, float]]:
        """The layer path at ``vector`` (values clipped to the box): (model, layer, input scale)."""
        if len(vector) != self.dimension:
            raise SpaceError(f"vector has {len(vector)} values, the genome has {self.dimension}")
        x = [min(max(float(v), g.low), g.high) for v, g in zip(vector, self.genes)]
        lay = self.space.layers
        out, previous = [], "embed"
        for k in self._chosen(x):
            s = self.slots[k]
            if lay.transitions:
                scale = x[self.scale_gene[(previous, s.label)]]
            elif lay.scale.searched:
                scale = x[self.scale_gene[k]]
            else:
                scale = float(lay.scale.fixed)
            out.append((s.model, s.layer, scale))
            previous = s.label
        return out

    def decode(self, vector) -> Recipe:
        from evomerge.recipe import path_recipe

        return path_recipe(self.path(vector), seed=self.seed)

    # -- encode -----------------------------------------------------------------------------------
    def encode(self, recipe: Recipe) -> list[float]:
        """The genome of a layer-path recipe: its layers matched to the earliest slots in order
        (included at +0.5, the rest at -0.5), its scales on the scale genes (clipped to the box).
        Raises SpaceError when the path is not a subsequence of the slots."""
        if not recipe.is_path:
            raise SpaceError(f"encode: a '{recipe.merge_method}' recipe is not a layer path")
        if any(sl.sources[0].parameters for sl in recipe.slices):
            raise SpaceError("encode: per-tensor 'scale' parameters are not in a path space's form")
        path = recipe.path()
        x = [(g.low + g.high) / 2 for g in self.genes]
        for g in self.include_gene.values():
            x[g] = -0.5
        k, previous = 0, "embed"
        for model, layer, scale in path:
            while k < len(self.slots) and (self.slots[k].model, self.slots[k].layer) != (model, layer):
                k += 1
            if k == len(self.slots):
                raise SpaceError(
                    f"encode: layer {layer} of '{model}' at this point of the path has no slot left "
                    f"(the space lays out {', '.join(self.space.models)} x {self.space.layers.repeats})"
                )
            if k in self.include_gene:
                x[self.include_gene[k]] = 0.5
            label = self.slots[k].label
            key = (previous, label) if self.space.layers.transitions else k
            if key in self.scale_gene:
                g = self.genes[self.scale_gene[key]]
                x[self.scale_gene[key]] = min(max(scale, g.low), g.high)
            previous = label
            k += 1
        return x

    # -- known recipes as seeds ----------------------------------------------------------------------
    def uniform_average(self) -> None:
        """No average in a path space (the campaign skips this seed)."""
        return None

    def expert_alone(self, model: str) -> list[float]:
        """``model``'s own layers, in order, at scale 1 (plus the fixed ends, when they are fixed)."""
        from evomerge.recipe import path_recipe

        if model not in self.space.models:
            raise SpaceError(f"'{model}' is not a model of the space")
        return self.encode(path_recipe([(model, i, 1.0) for i in range(self.layer_counts[model])]))
