"""The worker: one process (a Ray actor) that owns a device and scores recipes with resident state.

It loads the base once, keeps the experts' task vectors and the merge engine's statistics
resident, builds the lm-eval tasks and model wrapper once (``CandidateScorer``), and per recipe
returns the objectives and timings. The class is plain Python; the pool wraps it with ``ray.remote``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from evomerge.evaluate.config import EvaluatorConfig, parse_evaluator
from evomerge.merge.memory import MemoryPolicy


@dataclass
class WorkerSpec:
    """Everything a worker needs to build its resident state, sent to every worker as it is (Ray
    pickles it, the checked models within)."""

    models: dict[str, str]  # name -> local directory or hub id
    base: str
    #: The checked evaluator, or an evaluator file's fields read relative to ``evaluator_source``.
    evaluator: EvaluatorConfig | dict
    evaluator_source: str | None = None
    split: str | None = None
    device: str = "auto"  # auto: cuda when the worker has a GPU, else cpu
    dtype: str | None = None  # torch dtype name for the resident model (default: as saved)
    threads: int | None = None  # torch CPU threads per worker (default: its CPU share)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    env: dict[str, str] = field(default_factory=dict)
    started_dir: str | None = None  # opt-in: score() touches <started_dir>/<pid> as it starts a candidate
    memory: MemoryPolicy = field(default_factory=MemoryPolicy)  # (its fields are read too)
    shared: str | None = None  # the name of the SharedStore actor that holds the base and task vectors
    #: What the worker holds (the search space's kind): ``merge``, the base and the experts' task
    #: vectors over ``base``; ``path``, every model of ``models`` whole, candidates stacking their layers.
    resident: Literal["merge", "path"] = "merge"

    def __post_init__(self):
        if isinstance(self.memory, dict):
            self.memory = MemoryPolicy(**self.memory)

    def checked_evaluator(self) -> EvaluatorConfig:
        if isinstance(self.evaluator, EvaluatorConfig):
            return self.evaluator
        return parse_evaluator(self.evaluator, self.evaluator_source)

    def to_dict(self) -> dict:
        """The spec as JSON-able data (``WorkerSpec(**d)`` reads it back)."""
        data = {**asdict(self), "memory": self.memory.model_dump()}
        if isinstance(self.evaluator, EvaluatorConfig):
            data["evaluator"] = self.evaluator.model_dump(mode="json")
            data["evaluator_source"] = str(self.evaluator.source) if self.evaluator.source else None
        return data

    def shared_inputs(self):
        """What the machine's shared copy of base and task vectors is made of (``merge.shared.Inputs``)."""
        from evomerge.merge.shared import Inputs

        return Inputs(self.models, self.base, self.dtype, self.memory, self.trust_remote_code, self.allow_pickle)


class ScoringWorker:
    def __init__(self, spec: WorkerSpec):
        os.environ.update(spec.env)
        import torch

        from evomerge.evaluate.candidate import CandidateScorer

        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        policy = spec.memory
        if (
            device.startswith("cuda") and spec.resident == "merge"
        ):  # refuse before loading anything when the models cannot fit
            from evomerge.merge.memory import fit_device
            from evomerge.merge.shared import plan_bytes

            sizes = plan_bytes(spec.shared_inputs())
            policy = fit_device(policy, sizes, torch.cuda.mem_get_info(torch.device(device))[0], device)
        self.policy = policy
        self.started_dir = spec.started_dir
        evaluator = spec.checked_evaluator()
        shared = None
        if spec.shared is not None:
            import ray

            from evomerge.merge.shared import fetch

            store = ray.get_actor(spec.shared, namespace=ray.get_runtime_context().namespace)
            shared = fetch(ray.cloudpickle.loads(ray.get(store.refs.remote())))
        self.scorer = CandidateScorer(
            spec.models,
            spec.base,
            evaluator,
            split=spec.split,
            device=device,
            dtype=spec.dtype,
            trust_remote_code=spec.trust_remote_code,
            allow_pickle=spec.allow_pickle,
            memory=policy,
            shared=shared,
            resident=spec.resident,
        )

    def ready(self) -> dict:
        """Where this worker runs: Ray node, pid, device, threads, seconds it took to load."""
        import ray
        import torch

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "device": self.device,
            "threads": torch.get_num_threads(),
            "load_seconds": self.scorer.load_seconds,
            "shared_tensors": self.scorer.resident.shared_tensors,
            "base_on": self.policy.homes(torch.device(self.device))[0].type,
            "documents": self.scorer.documents(),
        }

    def kinship(self) -> dict | None:
        """The kinship table of the resident task vectors (``evomerge.models.kinship``), or None for a
        layer-path worker (no base, no task vectors)."""
        from evomerge.merge.apply import ResidentMerge
        from evomerge.models.kinship import Kinship

        resident = self.scorer.resident
        if not isinstance(resident, ResidentMerge) or len(resident.experts) < 2:
            return None
        acc = Kinship(resident.experts, resident.num_layers)
        for name, row in resident.stats.items():
            acc.add(name, [s.dense() for s in row])
        return acc.table().to_dict()

    def score(
        self, recipe: dict, log_samples: bool = False, documents: int | dict[str, list[int]] | None = None
    ) -> dict:
        from evomerge.recipe import parse_recipe

        started = time.perf_counter()
        if self.started_dir:  # lets an observer act once a candidate is really being evaluated
            open(os.path.join(self.started_dir, str(os.getpid())), "w").close()
        try:
            parsed = parse_recipe(recipe, "<candidate>")
        except Exception as e:
            return {
                "status": "failed",
                "values": None,
                "reason": f"invalid recipe: {e}",
                "timings": {},
                "samples": None,
                "pid": os.getpid(),
            }
        out = self.scorer.score(parsed, log_samples=log_samples, documents=documents).to_dict()
        out["timings"]["worker"] = time.perf_counter() - started
        out["pid"] = os.getpid()
        return out
