"""Score in-memory Hugging Face models on lm-eval tasks.

A ``TaskSuite`` is built once (task index, task objects, datasets) and then scores any number of
models or of weight states of one model. It calls ``lm_eval.evaluator.evaluate`` directly: no
environment probing and no reseeding of the global RNGs per call, which ``simple_evaluate`` does.

Tasks are named either by a path to a local lm-eval YAML file (data paths inside it are resolved
relative to the YAML's folder) or by a built-in lm-eval task name (needs the network the first time
its dataset is fetched).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

#: Metric read from a task's results when the caller does not name one, in order of preference.
PREFERRED_METRICS = ("exact_match", "acc", "acc_norm", "perplexity", "word_perplexity")


class TaskError(ValueError):
    """A task name, file or metric that cannot be used."""


@dataclass(frozen=True)
class TaskRef:
    """One task: a local YAML path or a built-in lm-eval name."""

    name: str
    yaml_path: Path | None = None


def resolve_task(ref: str | Path) -> TaskRef:
    """A local YAML path (existing ``*.yaml``/``*.yml`` file) or else a built-in task name."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"task file not found: {path}")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict) or "task" not in config:
            raise TaskError(f"{path}: not an lm-eval task file (no 'task' field)")
        return TaskRef(name=str(config["task"]), yaml_path=path.resolve())
    return TaskRef(name=str(ref))


def _local_config(ref: TaskRef) -> dict:
    """The task's YAML as a dict, with relative ``data_files`` made absolute against its folder
    (a path, a list of paths, or a split -> path(s) mapping) and each local file checked."""
    config = yaml.safe_load(ref.yaml_path.read_text())
    kwargs = config.get("dataset_kwargs") or {}
    if kwargs.get("data_files") is None:
        return config

    def resolve(value):
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if "://" in value:
            return value
        path = Path(value) if Path(value).is_absolute() else ref.yaml_path.parent / value
        if not path.exists():
            raise TaskError(f"{ref.yaml_path}: data file not found: {path}")
        return str(path)

    kwargs["data_files"] = resolve(kwargs["data_files"])
    return config


class TaskSuite:
    """A fixed list of lm-eval tasks, loaded once, that scores models.

    ``limit`` caps the documents per task (the first ``limit`` of the task's split, the same for
    every call, so scores of different models are comparable).
    """

    def __init__(self, tasks: list[str | Path], limit: int | None = None):
        from lm_eval.tasks import TaskManager, get_task_dict

        refs = [resolve_task(t) for t in tasks]
        names = [r.name for r in refs]
        if len(set(names)) != len(names):
            raise TaskError(f"duplicate task names in {names}")
        builtin = [r.name for r in refs if r.yaml_path is None]
        # Indexing lm-eval's ~14k built-in tasks costs seconds: only do it when one is asked for.
        manager = TaskManager(include_defaults=bool(builtin), verbosity="ERROR")
        if builtin:
            unknown = [n for n in builtin if n not in manager.all_tasks]
            if unknown:
                raise TaskError(f"unknown lm-eval task(s) {unknown} (not a .yaml path nor a built-in name)")
        specs = [_local_config(r) if r.yaml_path else r.name for r in refs]
        _quiet_lm_eval()
        self.task_dict = get_task_dict(specs, manager)
        self.names = names
        self.limit = limit

    def evaluate(self, lm, log_samples: bool = False, quiet: bool = True) -> dict:
        """Run every task on ``lm`` (an lm-eval ``LM``); returns lm-eval's results dict.

        ``quiet`` swallows lm-eval's per-call progress bars (they ignore TQDM_DISABLE); errors still raise.
        """
        from lm_eval.evaluator import evaluate

        sink = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
        with sink:
            return evaluate(
                lm, self.task_dict, limit=self.limit, bootstrap_iters=0,
                log_samples=log_samples, verbosity="ERROR",
            )

    def scores(self, lm, metrics: dict[str, str] | None = None) -> dict[str, float]:
        """One number per task: the named metric, or the first of PREFERRED_METRICS it reports."""
        results = self.evaluate(lm)["results"]
        return {name: pick_metric(results[name], (metrics or {}).get(name), name) for name in self.names}


def pick_metric(task_results: dict, metric: str | None, task: str) -> float:
    """The value of ``metric`` in one task's results (keys look like ``"acc,none"``)."""
    values = {k.split(",")[0]: v for k, v in task_results.items() if "," in k and "_stderr" not in k}
    wanted = [metric] if metric else [m for m in PREFERRED_METRICS if m in values]
    if not wanted or wanted[0] not in values:
        raise TaskError(f"task {task}: metric {metric!r} not reported; available: {sorted(values)}")
    return float(values[wanted[0]])


def wrap_model(model, tokenizer, batch_size: int = 64, max_length: int | None = None):
    """An lm-eval ``HFLM`` around an in-memory model object (weights may be rewritten in place)."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                max_length=max_length)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.api.task"):
        logging.getLogger(name).setLevel(logging.ERROR)
