"""What every genome shares, torch-free: its genes and their box, a searched-or-fixed range, and the
protocol a search space keeps (a parameter space, ``evomerge.search.space``, or a layer-path space,
``evomerge.search.paths``), so that the campaign, the experiment's checks and the CLI ask the space
instead of branching on its kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, model_validator

from evomerge.recipe import Recipe


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file and the field."""


class Range(BaseModel):
    """A searched parameter (``low``/``high``) or a fixed one (``fixed``)."""

    model_config = ConfigDict(extra="forbid")
    low: float | None = None
    high: float | None = None
    fixed: float | bool | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        searched = self.low is not None or self.high is not None
        if searched == (self.fixed is not None):
            raise ValueError("give either low and high, or fixed")
        if searched and (self.low is None or self.high is None or not self.low < self.high):
            raise ValueError("low and high are both needed, with low < high")
        return self

    @property
    def searched(self) -> bool:
        return self.fixed is None


@dataclass(frozen=True)
class Gene:
    """One coordinate of the genome: what it sets, and its bounds."""

    name: str  # e.g. "weight[expert-add].mlp@2", "method", "lines.alpha"
    low: float
    high: float
    param: str | None = None
    model: str | None = None  # None: shared (global or tied)
    part: str | None = None  # split filter, "*" for the rest, None without split
    position: int = 0
    #: A categorical gene's number of choices (0: continuous); Optuna samples it as categorical.
    choices: int = 0


class GeneBox:
    """The box a genome's genes span (``genes``: a list of ``Gene``)."""

    genes: list[Gene]

    @property
    def dimension(self) -> int:
        return len(self.genes)

    @property
    def bounds(self) -> tuple[list[float], list[float]]:
        return [g.low for g in self.genes], [g.high for g in self.genes]


class GenomeLike(Protocol):
    """A space bound to its models' layer counts: a point of the box <-> a recipe."""

    genes: list[Gene]
    seed: int

    @property
    def dimension(self) -> int: ...

    def decode(self, vector: Any) -> Recipe: ...

    def encode(self, recipe: Recipe) -> list[float]: ...


class Space(Protocol):
    """A search space, whatever its kind."""

    #: What a worker holds resident: ``merge`` (the base and the experts' task vectors, merged per
    #: candidate) or ``path`` (every model whole; a candidate is a shell over their layers).
    kind: ClassVar[Literal["merge", "path"]]
    #: The models the space draws on (each must be given by the experiment).
    models: list[str]

    @property
    def base(self) -> str | None:
        """The model task vectors are taken against (None: the space merges no task vectors)."""

    @property
    def used_models(self) -> list[str]: ...

    @property
    def resident_base(self) -> str:
        """The model a worker builds its resident model from."""

    def resident_models(self, models: Mapping[str, str]) -> dict[str, str]:
        """Of the experiment's models (name -> reference), those a worker holds."""

    def genome(self, layer_counts: Mapping[str, int], seed: int = 0) -> GenomeLike:
        """The genome for models of these layer counts (name -> layers)."""

    def summary(self, genome: Any) -> str:
        """One line on the genome's size and shape (``evomerge space show``)."""
