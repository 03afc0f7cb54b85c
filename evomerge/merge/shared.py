"""One copy per machine: the base and the experts' task vectors, shared by every worker on a node.

A store actor (``SharedStore``) computes them once, tensor by tensor (never a whole model in memory),
and puts them in Ray's object store, which keeps one copy per node in shared memory. Every worker maps
that copy zero-copy (``fetch``) and keeps only its own model and caches privately, so the host holds
one copy of the inputs plus one model per worker, not one of everything per worker.

Exactness: a task vector is ``(expert.float() - base_in_model_dtype.float())`` rounded once to the
policy's dtype, as ``ResidentMerge`` computes it. The store does not load the model, so it takes
the model's dtype from ``workers.dtype``, else ``config.json``'s ``dtype``/``torch_dtype``, else the
tensor's saved dtype. A worker uses a shared tensor only when that guess is its parameter's dtype;
otherwise it computes that tensor privately, as without sharing. Either way the merged weights are
bit-identical to an unshared worker's.

Shared tensors are read-only views: the merge never writes into its base or task vectors. On a GPU,
shared host tensors are not pinned (pinning would copy them), so host-to-device copies of
``experts_on: host`` run synchronously; ``share: false`` keeps pinned private copies instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from evomerge.merge.io import DTYPE_NAMES, ModelSource, as_merge_error, resolve_model_dir
from evomerge.merge.memory import MemoryPolicy, trim_heap
from evomerge.merge.registry import MergeError
from evomerge.models import weights
from evomerge.models.config import parameter_names, read_config, saved_dtype
from evomerge.models.lora import is_adapter_dir, lora_bytes


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw(t: torch.Tensor):
    """``t``'s bytes as a flat uint8 numpy array (any dtype, bfloat16 included; no copy when contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _tensor(raw, dtype: str, shape: list[int]) -> torch.Tensor:
    """The tensor viewing ``raw`` (read-only memory of the object store: torch warns, nothing writes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(raw)
    return flat.view(getattr(torch, dtype)).view(shape)


def model_dtype_guess(base_dir: Path, dtype: str | None) -> torch.dtype | None:
    """The dtype a worker's model will have: ``workers.dtype``, else the config's; None: as saved."""
    if dtype:
        return DTYPE_NAMES[dtype]
    return DTYPE_NAMES.get(saved_dtype(read_config(base_dir)))


@dataclass(frozen=True)
class Inputs:
    """What the shared copy is made of: the models (name -> directory or hub id), which is the base,
    the workers' dtype, the memory policy's fields; plain data (the store actor passes it on without
    importing torch)."""

    models: dict[str, str]
    base: str
    dtype: str | None
    memory: MemoryPolicy  # (or its fields)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    #: the base's parameter names (``parameter_names``), once known: the producer then needs no
    #: transformers (an import of seconds in a process that lives for one task)
    names: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.memory, dict):
            object.__setattr__(self, "memory", MemoryPolicy(**self.memory))  # frozen: set once, here

    def adapters(self) -> dict[str, Path]:
        """The LoRA experts' adapter folders (name -> folder): each worker keeps their factors itself
        (tens of MB at 8B), so the shared copy holds none of them."""
        dirs = {
            n: resolve_model_dir(r, allow_pickle=self.allow_pickle) for n, r in self.models.items() if n != self.base
        }
        return {n: d for n, d in dirs.items() if is_adapter_dir(d)}

    @property
    def experts(self) -> list[str]:
        """The experts whose task vectors the shared copy holds: the full ones."""
        adapters = self.adapters()
        return [n for n in self.models if n != self.base and n not in adapters]

    def open(self) -> tuple[list[str], torch.dtype | None, dict[str, ModelSource]]:
        """(parameter names, the model's dtype guess, name -> ModelSource of the base and the full
        experts); close the sources."""
        base_dir = resolve_model_dir(self.models[self.base], allow_pickle=self.allow_pickle)
        if self.names is not None:
            names = list(self.names)
        else:
            with as_merge_error():
                names = parameter_names(base_dir, self.trust_remote_code)
        sources = {
            n: ModelSource(resolve_model_dir(self.models[n], allow_pickle=self.allow_pickle), self.allow_pickle)
            for n in [self.base, *self.experts]
        }
        return names, model_dtype_guess(base_dir, self.dtype), sources


def with_names(inputs: Inputs) -> Inputs:
    """``inputs`` with the base's parameter names filled in (read from its config, no weights)."""
    if inputs.names is not None:
        return inputs
    base_dir = resolve_model_dir(inputs.models[inputs.base], allow_pickle=inputs.allow_pickle)
    with as_merge_error():
        return replace(inputs, names=tuple(parameter_names(base_dir, inputs.trust_remote_code)))


def stored_names(inputs: Inputs) -> tuple[str, ...] | None:
    """The tensors every model's safetensors files hold, in the base's order, from the headers alone
    (``evomerge.models.weights.stored_names``): the parameters and any buffer saved beside them, so
    that ``plan_bytes`` over them is at least the shared copy's size (tied weights are saved once).
    None for pickled checkpoints, which cannot be listed without loading them."""
    dirs = {
        n: resolve_model_dir(inputs.models[n], allow_pickle=inputs.allow_pickle) for n in [inputs.base, *inputs.experts]
    }
    with as_merge_error():
        return weights.stored_names(dirs, inputs.base, inputs.allow_pickle)


def plan_bytes(inputs: Inputs) -> dict[str, int]:
    """Bytes of the base (in the model's dtype: also the model's own size) and of all the experts'
    task vectors, from the config and safetensors headers only: what ``produce`` makes, and what a
    worker holds."""
    names, model_dtype, sources = inputs.open()
    policy = inputs.memory
    # LoRA experts: their factors, kept in the adapter's dtype by each worker
    sizes = {"base": 0, "experts": sum(lora_bytes(folder) for folder in inputs.adapters().values())}
    try:
        for name in names:
            info = sources[inputs.base].info(name)
            numel = 1
            for d in info.shape:
                numel *= d
            kept = model_dtype or info.dtype
            tv = policy.task_vector_dtype_for({sources[e].info(name).dtype for e in inputs.experts}, kept)
            sizes["base"] += numel * kept.itemsize
            sizes["experts"] += numel * len(inputs.experts) * tv.itemsize
    except KeyError as e:
        raise MergeError(f"a model has no tensor {e}") from None
    finally:
        for s in sources.values():
            s.close()
    return sizes


def produce(inputs: Inputs):
    """Per parameter name, in ``parameter_names`` order, ``(name, object to share)``, the object being
    ``(shape, base dtype, base bytes, task-vector dtype, [one task vector's bytes per expert])``,
    computed from one tensor of each model at a time. Raises MergeError."""
    names, model_dtype, sources = inputs.open()
    policy, base, experts = inputs.memory, inputs.base, inputs.experts
    have = {n: set(s.names()) for n, s in sources.items()}
    try:
        for name in names:
            lacking = [n for n in [base, *experts] if name not in have[n]]
            if lacking:
                raise MergeError(f"model '{lacking[0]}' has no tensor '{name}'")
            raw = sources[base].tensor(name)
            kept = raw.to(model_dtype) if model_dtype is not None else raw
            tensors = [sources[e].tensor(name) for e in experts]
            for e, t in zip(experts, tensors):
                if t.shape != kept.shape:
                    shapes = f"{tuple(t.shape)}, base has {tuple(kept.shape)}"
                    raise MergeError(f"expert '{e}': tensor '{name}' has shape {shapes}")
            tv_dtype = policy.task_vector_dtype_for({t.dtype for t in tensors}, kept.dtype)
            base_f32 = kept.float()
            deltas = [(t.float() - base_f32).to(tv_dtype) for t in tensors]
            yield name, (list(kept.shape), _name(kept.dtype), _raw(kept), _name(tv_dtype), [_raw(d) for d in deltas])
    finally:
        for s in sources.values():
            s.close()
        trim_heap()  # the tensors read and converted on the way


def produce_stream(fields: dict):
    """For a Ray generator task: ``produce``'s objects (``Inputs(**fields)``), then a small last item:
    ("ok", the parameter names in the order of the objects, the experts whose task vectors they hold)
    or ("error", the reason)."""
    names = []
    try:
        for name, payload in produce(Inputs(**fields)):
            yield payload
            names.append(name)
    except Exception as e:
        from evomerge.errors import first_line

        yield ("error", first_line(e))
        return
    yield ("ok", names, Inputs(**fields).experts)


@dataclass
class Fetched:
    """A worker's view of the published tensors: ``base[name]`` and ``deltas[expert][name]``."""

    base: dict[str, torch.Tensor]
    deltas: dict[str, dict[str, torch.Tensor]]
    nbytes: int


def fetch(published: dict) -> Fetched:
    """Map every published tensor (zero-copy from this node's object store)."""
    import ray

    names = list(published["refs"])
    values = ray.get([published["refs"][n] for n in names])
    base, deltas = {}, {e: {} for e in published["experts"]}
    for name, (shape, base_dtype, base_raw, tv_dtype, raws) in zip(names, values):
        base[name] = _tensor(base_raw, base_dtype, shape)
        for expert, raw in zip(published["experts"], raws):
            deltas[expert][name] = _tensor(raw, tv_dtype, shape)
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    nbytes += sum(t.numel() * t.element_size() for d in deltas.values() for t in d.values())
    return Fetched(base, deltas, nbytes)
