"""Objective kinds: what an evaluator's objective is computed from, one module per kind.

A kind is a subclass of ``ObjectiveKind`` registered (``@register``) under its ``name``, which is
also the evaluator-file key naming its source: an objective with ``task:`` is of kind ``task``, one
with ``perplexity:`` of kind ``perplexity``. Every module of this package is a kind, found and
imported the first time the registry is read; a kind defined elsewhere is registered by calling
``register(Kind)`` before an evaluator using it is read.

A kind declares its objective's fields (``Config``, a pydantic model over ``Objective``; its default
direction is the default of ``Config.direction``), how messages name it (``noun``, ``nouns``),
whether a multi-fidelity rung may score a subset of its documents (``subsets_documents``), what is
checked before compute (``files``, ``check``), and is built once per worker (``__init__``: its
resident state) to score each candidate (``score``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import PlainValidator, SerializeAsAny
from pydantic_core import PydanticKnownError

from evomerge.objectives import Objective

#: The evaluator a kind is read, checked and built with: ``evomerge.evaluate.config.EvaluatorConfig``
#: (not imported here: the evaluator reads its objectives through this module).
Evaluator = Any

#: The package's kinds imported first, in this order: the order messages list kinds in and a
#: candidate's objectives are scored in (lm-eval first, as before kinds were modules).
FIRST = ("task", "perplexity")


@dataclass
class Scored:
    """One kind's objective values for one candidate (objective name -> value), where the kind has
    them its per-document scores (objective name -> task -> (document ids, scores)), and, when asked
    for, its per-sample records (source -> list of records)."""

    values: dict[str, float]
    samples: dict[str, list[dict]] | None = None
    per_document: dict[str, dict[str, tuple[list[int], list[float]]]] | None = None


class ObjectiveKind:
    """A kind of objective. The class declares how it is read and checked; an instance is the kind
    built on a worker for its objectives of one evaluator, scoring every candidate."""

    #: The kind's name: the evaluator-file key that gives its source.
    name: ClassVar[str]
    #: Its objective's fields (the source under ``name``, its options), over the shared ones.
    Config: ClassVar[type[Objective]]
    #: How messages name one of its objectives (``a perplexity``) and several (``tasks``).
    noun: ClassVar[str]
    nouns: ClassVar[str]
    #: Whether a multi-fidelity rung may score a subset of its documents (``documents`` in ``score``).
    subsets_documents: ClassVar[bool] = False
    #: Its own keys that an objective of another kind may not give (None: all of them).
    exclusive: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def files(cls, objective: Objective, evaluator: Evaluator, split: str) -> list[tuple[str, str]]:
        """(field, path) of each local file ``objective`` reads for ``split``: checked to exist
        before any compute starts."""
        return []

    @classmethod
    def check(cls, objectives: Sequence[tuple[int, Objective]], evaluator: Evaluator, split: str) -> None:
        """Checks before compute that load something (seconds, no model), of this kind's
        ``objectives`` (index in the evaluator, objective); raises EvaluatorError naming the field."""

    def __init__(self, objectives: Sequence[Objective], evaluator: Evaluator, split: str, model, tokenizer):
        """Build what scores ``objectives`` on ``split`` with the resident ``model`` (rewritten in
        place per candidate) and its ``tokenizer``: once per worker."""
        self.objectives = list(objectives)

    def documents(self) -> dict[str, dict[str, list[int]]]:
        """The documents this kind scores, per source and split (``{"task": {"search": [ids]}}``),
        where it has documents."""
        return {}

    def score(
        self,
        model,
        timings: dict[str, float],
        documents: int | dict[str, list[int]] | None = None,
        log_samples: bool = False,
    ) -> Scored:
        """Score the model's current weights. ``documents``: per source (task), for a multi-fidelity
        rung, or task -> document ids for racing (an experiment with either is refused if a kind cannot
        subset). ``timings``: the
        candidate's, where a kind adds what it counts (``documents`` scored)."""
        raise NotImplementedError


_KINDS: dict[str, type[ObjectiveKind]] = {}
_found = False


def registered() -> dict[str, type[ObjectiveKind]]:
    """The registered kinds by name: the package's own (imported on the first call), then the rest."""
    global _found
    if not _found:
        _found = True  # before importing: each module's @register reads the registry
        found = sorted(m.name for m in pkgutil.iter_modules(__path__))
        try:
            for name in [*FIRST, *(n for n in found if n not in FIRST)]:
                importlib.import_module(f"{__name__}.{name}")
        except BaseException:
            _found = False  # a kind that cannot be imported fails every read, not only the first
            raise
    return _KINDS


def register(kind: type[ObjectiveKind]) -> type[ObjectiveKind]:
    """Register ``kind`` under its name (usable as a class decorator)."""
    kinds = registered()
    if kinds.get(kind.name, kind) is not kind:
        raise ValueError(f"objective kind '{kind.name}' is registered twice")
    kinds[kind.name] = kind
    return kind


def kind_of(objective: Objective) -> type[ObjectiveKind]:
    """The kind whose config ``objective`` is."""
    for kind in registered().values():
        if type(objective) is kind.Config:
            return kind
    raise LookupError(f"objective '{objective.name}' is of no registered kind ({type(objective).__name__})")


def by_kind(objectives: Sequence[Objective]) -> list[tuple[type[ObjectiveKind], list[tuple[int, Objective]]]]:
    """The objectives of each kind with their index, kinds in registry order."""
    groups: dict[type[ObjectiveKind], list[tuple[int, Objective]]] = {}
    for i, objective in enumerate(objectives):
        groups.setdefault(kind_of(objective), []).append((i, objective))
    return [(kind, groups[kind]) for kind in registered().values() if kind in groups]


def _listing(words: Sequence[str], last: str) -> str:
    return f"{', '.join(words[:-1])} {last} {words[-1]}" if len(words) > 1 else words[0]


def parse_objective(data: Any) -> Objective:
    """An evaluator file's objective, validated by the config of the kind whose key it gives.

    Another kind's exclusive keys are refused unless empty (``null`` or ``""``: not given); its other
    keys are ignored. ``direction: null`` is the kind's default."""
    if isinstance(data, Objective) and any(type(data) is k.Config for k in registered().values()):
        return data
    if not isinstance(data, dict):
        raise PydanticKnownError("model_type", {"class_name": "ObjectiveSpec"})
    kinds = list(registered().values())
    given = [k for k in kinds if data.get(k.name) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {_listing([repr(k.name) for k in kinds], 'or')}")
    kind, fields = given[0], dict(data)
    if "direction" in fields and fields["direction"] is None:
        del fields["direction"]
    own = kind.Config.model_fields
    for other in kinds:
        foreign = [key for key in other.Config.model_fields if key not in own and key in fields]
        exclusive = other.exclusive if other.exclusive is not None else tuple(other.Config.model_fields)
        given = [key for key in foreign if key in exclusive and fields[key] not in (None, "")]
        if given:
            options = [repr(k) for k in given]
            verb = "apply" if len(options) > 1 else "applies"
            raise ValueError(f"{_listing(options, 'and')} {verb} to {other.nouns}, not to {kind.nouns}")
        for key in foreign:
            del fields[key]
    return kind.Config.model_validate(fields)


#: An evaluator file's objective: one kind's config (serialized as that config).
ObjectiveSpec = Annotated[SerializeAsAny[Objective], PlainValidator(parse_objective)]
