"""The merge methods' registry: each method's declared parameters, ranges and references, torch-free.

A method is one declaration (``Method``) and one kernel. The search side reads declarations only
(which parameters a gene may set, their ranges, how many models a method takes), so this module and
the method modules import no torch at import time; a kernel imports it when it runs. The built-in
methods live one family per module under ``evomerge.merge.methods`` and register themselves when
this module is first imported; a method of your own registers from any module with ``register`` or
the ``merge_method`` decorator, and is then merged like the built-in ones.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

REQUIRED = object()


class MergeError(ValueError):
    """A merge that cannot be computed as asked (bad parameter, incompatible inputs, NaN)."""


@dataclass(frozen=True)
class Param:
    """A declared method parameter.

    ``per_model``: set per input model (else one value shared by all inputs of a tensor).
    """

    name: str
    per_model: bool
    default: Any = REQUIRED
    kind: type = float
    low: float | None = None
    high: float | None = None
    #: A count of input models (``kind=int``): at most the number of inputs a recipe merges.
    counts_models: bool = False

    def check(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"{where}: '{self.name}' must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeError(f"{where}: '{self.name}' must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise MergeError(f"{where}: '{self.name}' must be finite, got {value}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else self.low
            hi = "inf" if self.high is None else self.high
            raise MergeError(f"{where}: '{self.name}' = {value} is outside [{lo}, {hi}]")
        return round_count(value) if self.kind is int else value


def round_count(value: float) -> int:
    """A count read from a gene or a gradient: the nearest whole number, halves up (2.5 -> 3)."""
    return int(math.floor(value + 0.5))


#: How a task-vector method sparsifies each delta (see ``evomerge.merge.masks``).
Sparsifier = Literal["magnitude", "random", "outliers", "della"]

#: ``kernel(method, base, stats, shared, per_model)``: the merge of one tensor, either whole (the
#: merged weights, float32, in base's shape) or as ``Chunks`` (the mixed task vector, or the merged
#: weights, one flat chunk at a time). ``evomerge.merge.kernel.merge_tensor`` does the rest once:
#: chunking, the output buffer, adding the base, the LiNeS step. ``base``: 16- or 32-bit float;
#: ``stats[i]``: input i's task vector; ``shared``/``per_model[i]``: the resolved parameters.
#: (This module names no torch type: it is imported without torch.)
Kernel = Callable[..., Any]


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    reference: str
    kernel: Kernel
    #: True: the base is the origin of every input's task vector, so it is required and is not an
    #: input itself. False (linear): the base is an ordinary input, averaged only when listed.
    base_is_origin: bool = True
    #: Bounds on the number of non-base input models.
    min_models: int = 1
    max_models: int | None = None
    #: mergekit has this method (a recipe of it runs with ``mergekit-yaml``); else ``evomerge merge`` only.
    in_mergekit: bool = True

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available to recipes, spaces and merges by its name (one name, one method)."""
    known = METHODS.get(method.name)
    if known is not None and known != method:
        raise MergeError(f"merge method '{method.name}' is registered twice")
    METHODS[method.name] = method
    return method


def merge_method(name: str, params: tuple[Param, ...], reference: str, **declared: Any) -> Callable[[Kernel], Kernel]:
    """Decorator: register the decorated kernel as method ``name`` (``declared``: the other fields
    of ``Method``)."""

    def decorate(kernel: Kernel) -> Kernel:
        register(Method(name, params, reference, kernel, **declared))
        return kernel

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MergeError(f"unknown merge method '{name}'; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _register_builtins() -> None:
    """Import every module of ``evomerge.merge.methods``: each registers its family."""
    package = importlib.import_module("evomerge.merge.methods")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


_register_builtins()
