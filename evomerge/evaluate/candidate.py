"""Score merge candidates in memory: one resident model, rewritten per recipe, scored on the objectives.

A ``CandidateScorer`` loads the base once, keeps the experts' task vectors and the merge engine's
statistics resident (``ResidentMerge``), and has each kind of objective build its state once around
the one model object (``evomerge.evaluate.kinds``: the lm-eval task dict and ``HFLM`` wrapper, the
tokenized perplexity texts). Per candidate it only rewrites the weights in place and runs the
forward passes. Whatever goes wrong with one candidate
(non-finite weights or logits, an evaluation that raises, a NaN objective) gives a failed
``Score`` with the reason; it never raises.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from evomerge.errors import first_line
from evomerge.evaluate.config import EvaluatorConfig
from evomerge.evaluate.kinds import by_kind
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.merge.memory import MemoryPolicy
    from evomerge.merge.shared import Fetched

#: Journaled and compared as these strings.
ScoreStatus = Literal["done", "failed"]


@dataclass
class Score:
    """One candidate's result. ``values``: objective name -> value (None when failed)."""

    status: ScoreStatus
    values: dict[str, float] | None = None
    reason: str | None = None
    #: seconds: materialize (merge into the weights), evaluate (lm-eval and perplexity), forward (the
    #: part of evaluate inside the model's forward passes), total (in the scorer); on CUDA also
    #: device_peak_gib: the most device memory allocated during the candidate, GiB
    timings: dict[str, float] = field(default_factory=dict)
    #: lm-eval's per-sample records, compacted, when asked for: task -> list of records
    samples: dict[str, list[dict]] | None = None
    #: per-document scores of the objectives that have them: objective -> task -> (ids, scores)
    per_document: dict[str, dict[str, tuple[list[int], list[float]]]] | None = None

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "values": self.values,
            "reason": self.reason,
            "timings": self.timings,
            "samples": self.samples,
            "per_document": self.per_document,
        }


class _Tensors(Mapping):
    """One model's tensors ``names``, each read from its files when asked for (nothing is held)."""

    def __init__(self, source, names: list[str]):
        self.source, self.names = source, dict.fromkeys(names)

    def __getitem__(self, name: str):
        if name not in self.names:
            raise KeyError(name)
        return self.source.tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class CandidateScorer:
    """Resident state for scoring recipes over ``models`` (name -> local dir or hub id).

    ``path``: score layer paths (``passthrough`` recipes) over ``models``, each held whole, with the
    tokenizer of ``base`` (``evomerge.merge.path.ResidentPath``); else merges over ``base``.

    ``memory``: how the merge keeps the base, the task vectors and its caches (default
    ``MemoryPolicy()``; see ``evomerge.merge.memory``). ``shared``: the base and task vectors mapped
    from this machine's shared copy (``evomerge.merge.shared.fetch``), used where they fit.
    """

    def __init__(
        self,
        models: dict[str, str],
        base: str,
        evaluator: EvaluatorConfig,
        split: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        memory: MemoryPolicy | None = None,
        shared: Fetched | None = None,
        resident: Literal["merge", "path"] = "merge",
    ):
        from evomerge.merge.io import resolve_model_dir
        from evomerge.models.loading import load_causal_lm

        started = time.perf_counter()
        self.split = split or evaluator.split
        self.evaluator = evaluator
        torch_dtype = getattr(torch, dtype) if dtype else None

        def load(ref: str):
            """The model ``ref`` resident on ``device``, and its tokenizer."""
            return load_causal_lm(
                resolve_model_dir(ref, allow_pickle=allow_pickle),
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                dtype=torch_dtype,
                device=device,
            )

        # the one place the worker's resident model is chosen (the search space's kind)
        if resident == "path":  # every model resident whole; each candidate a shell over their layers
            self.resident, self.model, self.tokenizer = _resident_paths(models, base, load)
        else:
            self.resident, self.model, self.tokenizer = _resident_merge(
                models, base, load, allow_pickle=allow_pickle, memory=memory, shared=shared
            )
        # each kind of objective builds its resident state once (task loading, tokenized texts)
        self.kinds = {
            kind.name: kind([o for _, o in members], evaluator, self.split, self.model, self.tokenizer)
            for kind, members in by_kind(evaluator.objectives)
        }
        self._count_forward_seconds()
        vocab = int(self.model.config.vocab_size)
        self._probe = torch.arange(min(16, vocab)).unsqueeze(0).to(device)
        self.load_seconds = time.perf_counter() - started

    def documents(self) -> dict[str, dict[str, list[int]]]:
        """Per source (task), the document ids of each split this scorer knows (both for a task whose
        search and report documents are held out from one set)."""
        out = {}
        for kind in self.kinds.values():
            out.update(kind.documents())
        return out

    def _count_forward_seconds(self) -> None:
        """Hooks adding the time spent inside the model's forward passes to ``self._forward[0]``
        (seconds; generation calls forward once per token)."""
        self._forward = [0.0, 0.0]  # [seconds, started-at]
        self.model.register_forward_pre_hook(lambda *_: self._forward.__setitem__(1, time.perf_counter()))
        self.model.register_forward_hook(
            lambda *_: self._forward.__setitem__(0, self._forward[0] + time.perf_counter() - self._forward[1])
        )

    @property
    def suite(self):
        """The lm-eval task suite of the task objectives (None without any)."""
        return self.kinds["task"].suite if "task" in self.kinds else None

    @property
    def lm(self):
        """The lm-eval model wrapper around the resident model (None without task objectives)."""
        return self.kinds["task"].lm if "task" in self.kinds else None

    @torch.no_grad()
    def _logits_finite(self) -> bool:
        return bool(torch.isfinite(self.model(input_ids=self._probe).logits).all())

    def score(
        self, recipe: Recipe, log_samples: bool = False, documents: int | dict[str, list[int]] | None = None
    ) -> Score:
        """Merge ``recipe`` into the resident model and score it on every objective; ``documents``:
        on that many documents per lm-eval task (a multi-fidelity rung), or on the named ones (task
        -> ids, racing's anchors), else on the full ``limit``."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        cuda = self._probe.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self._probe.device)

        def finish() -> None:
            timings["total"] = time.perf_counter() - started
            if cuda:
                timings["device_peak_gib"] = torch.cuda.max_memory_allocated(self._probe.device) / 2**30

        def failed(reason: str) -> Score:
            finish()
            return Score("failed", reason=reason, timings=timings)

        try:
            merged = self.resident.materialize(recipe)
        except Exception as e:  # a recipe the resident models cannot take (unknown model, bad value)
            return failed(f"merge failed: {first_line(e, with_type=True)}")
        timings["materialize"] = merged.seconds
        if merged.nonfinite:
            return failed(
                f"non-finite weights after merging ({len(merged.nonfinite)} tensors, first: {merged.nonfinite[0]})"
            )
        evaluate_started = time.perf_counter()
        self._forward[0] = 0.0
        try:
            if not self._logits_finite():
                return failed("non-finite logits")
            values: dict[str, float] = {}
            samples, per_document = None, None
            for kind in self.kinds.values():
                scored = kind.score(self.model, timings, documents=documents, log_samples=log_samples)
                values.update(scored.values)
                if scored.samples is not None:
                    samples = {**(samples or {}), **scored.samples}
                if scored.per_document:
                    per_document = {**(per_document or {}), **scored.per_document}
        except Exception as e:
            timings["evaluate"] = time.perf_counter() - evaluate_started
            detail = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{detail.filename.rsplit('/', 1)[-1]}:{detail.lineno}"
            return failed(f"evaluation raised {first_line(e, with_type=True)} (at {where})")
        timings["evaluate"] = time.perf_counter() - evaluate_started
        timings["forward"] = self._forward[0]
        bad = [n for n, v in values.items() if not math.isfinite(v)]
        if bad:
            return failed(f"objective '{bad[0]}' is {values[bad[0]]}")
        ordered = {o.name: values[o.name] for o in self.evaluator.objectives}
        finish()
        return Score("done", values=ordered, timings=timings, samples=samples, per_document=per_document)


def _resident_paths(models: dict[str, str], base: str, load: Callable[[str], tuple]):
    """Every model of ``models`` held whole for layer paths: (ResidentPath, its model, the tokenizer
    of ``base``), the model holding a first path (the first model alone) so that wrappers built
    around it see a complete model."""
    from evomerge.merge.path import ResidentPath
    from evomerge.recipe import path_recipe

    loaded, tokenizer = {}, None
    for name, ref in models.items():
        loaded[name], tokenizer_of = load(ref)
        if name == base:
            tokenizer = tokenizer_of
    resident = ResidentPath(loaded)
    first = next(iter(loaded))
    resident.materialize(path_recipe([(first, i, 1.0) for i in range(resident.layer_counts[first])]))
    return resident, resident.model, tokenizer


def _resident_merge(
    models: dict[str, str],
    base: str,
    load: Callable[[str], tuple],
    allow_pickle: bool,
    memory: MemoryPolicy | None,
    shared: Fetched | None,
):
    """The base loaded and the other models' task vectors made over it: (ResidentMerge, the base
    model whose weights each candidate rewrites, its tokenizer)."""
    from evomerge.merge.apply import ResidentMerge
    from evomerge.merge.io import ModelSource, resolve_model_dir
    from evomerge.merge.memory import trim_heap
    from evomerge.models.lora import is_adapter_dir

    model, tokenizer = load(models[base])
    params = dict(model.named_parameters())
    base_state = {n: p.detach() for n, p in params.items()}  # ResidentMerge copies what it keeps
    experts = {}
    for name, ref in models.items():
        if name == base:
            continue
        folder = resolve_model_dir(ref, allow_pickle=allow_pickle)
        if is_adapter_dir(folder):  # a LoRA expert: its factors, checked against the base
            experts[name] = _lora_factors(folder, params, models[base], allow_pickle)
            continue
        source = ModelSource(folder, allow_pickle=allow_pickle)
        have = set(source.names())
        experts[name] = _Tensors(source, [n for n in params if n in have])  # read one tensor at a time
    resident = ResidentMerge(model, base_state, experts, base_name=base, memory=memory, shared=shared)
    trim_heap()  # the experts' tensors read while the task vectors were made
    return resident, model, tokenizer


def _lora_factors(folder, params: dict, base_ref: str, allow_pickle: bool):
    """A LoRA expert's factors of the model's parameters, its adapter checked against the base (its
    base named, its targets in the model, its shapes and ranks; ``evomerge.models.lora``)."""
    from evomerge.merge.io import as_merge_error, resolve_model_dir
    from evomerge.merge.lowrank import load_factors
    from evomerge.models.lora import check_adapter

    specs = {n: (tuple(p.shape), str(p.dtype)) for n, p in params.items()}
    with as_merge_error():
        adapter = check_adapter(folder, specs, base_ref, resolve_model_dir(base_ref, allow_pickle=allow_pickle))
        return load_factors(adapter, {n: tuple(p.shape) for n, p in params.items()})
