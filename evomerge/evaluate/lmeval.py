"""Score in-memory Hugging Face models on lm-eval tasks.

A ``TaskSuite`` is built once (task index, task objects, datasets) and then scores any number of
models or of weight states of one model. It calls ``lm_eval.evaluator.evaluate`` directly: no
environment probing and no reseeding of the global RNGs per call, which ``simple_evaluate`` does.

Tasks are named either by a path to a local lm-eval YAML file (data paths inside it are resolved
relative to the YAML's folder) or by a built-in lm-eval task name (needs the network the first time
its dataset is fetched, or the dataset in the local Hugging Face cache: ``evomerge zoo builtin``).
A task whose definition says ``unsafe_code`` (mbpp, humaneval: they run the programs the model
writes) is loaded and scored only when its caller confirms it (``confirm_run_unsafe_code``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import random
from collections.abc import Collection, Mapping, Sequence
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


@functools.cache
def _manager(folders: tuple[str, ...] | None):
    from lm_eval.tasks import TaskManager

    if folders is None:
        return TaskManager(verbosity="ERROR")  # every built-in task (seconds)
    return TaskManager(include_path=list(folders) or None, include_defaults=False, verbosity="ERROR")


def task_manager(builtin: list[str]):
    """An lm-eval ``TaskManager`` that knows the built-in tasks ``builtin``, made once per process.

    Indexing all of lm-eval's ~14,700 tasks costs seconds per process (the campaign's check, each
    worker, export); a built-in task whose folder in lm-eval bears its name (``gsm8k``, ``mbpp``,
    ``humaneval``) is found by indexing that folder alone, and any other name by the whole index."""
    if not builtin:
        return _manager(())
    from lm_eval import tasks

    root = Path(tasks.__file__).parent
    folders = tuple(sorted({str(root / name) for name in builtin}))
    if all(Path(f).is_dir() for f in folders):
        manager = _manager(folders)
        if all(name in manager.all_tasks for name in builtin):
            return manager
    return _manager(None)


def unsafe_tasks(manager, spec: str | dict) -> list[str]:
    """The tasks of ``spec`` (a built-in name: a task, group or tag; or a local task's config) whose
    definition says ``unsafe_code``: scoring them runs the programs the model writes. Read from
    the task index, without loading the tasks (loading mbpp already runs code)."""
    if isinstance(spec, dict):
        return [str(spec.get("task"))] if spec.get("unsafe_code") else []
    found, todo, seen = [], [spec], set()
    while todo:
        name = todo.pop()
        entry = manager.task_index.get(name) if isinstance(name, str) else None
        if entry is None or name in seen:
            continue
        seen.add(name)
        cfg = entry.cfg or {}
        if cfg.get("unsafe_code"):
            found.append(name)
        members = cfg.get("task") if isinstance(cfg.get("task"), list) else []
        todo.extend(m if isinstance(m, str) else (m or {}).get("task") for m in members)
        todo.extend(entry.tags if entry.kind.name == "TAG" else [])
    return sorted(found)


def unsafe_code_of(ref: str | Path) -> list[str]:
    """The tasks of one task reference (a local YAML path or a built-in name) whose definition says
    ``unsafe_code``, read without loading them; [] for a name lm-eval does not know."""
    task = resolve_task(ref)
    manager = task_manager([] if task.yaml_path else [task.name])
    if task.yaml_path is None and task.name not in manager.all_tasks:
        return []
    return unsafe_tasks(manager, _local_config(task) if task.yaml_path else task.name)


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


@dataclass(frozen=True)
class HeldOut:
    """The search and report documents of a task that has no separate report file: disjoint,
    seeded subsets of its documents. A size is a count, or below 1 a fraction of the task's
    documents (rounded up)."""

    search: int | float
    report: int | float

    def documents(self, n: int, seed: str, task: str) -> dict[str, list[int]]:
        """``{"search": [...], "report": [...]}`` of a task of ``n`` documents: one seeded permutation,
        its first documents for the search and the next ones for the report (disjoint by construction).
        TaskError when the two sizes exceed the task."""
        sizes = [math.ceil(n * v) if v < 1 else int(v) for v in (self.search, self.report)]
        if sum(sizes) > n:
            raise TaskError(
                f"task {task} has {n} documents: search_docs ({sizes[0]}) and report_docs ({sizes[1]}) exceed them"
            )
        order = random.Random(f"held-out:{seed}").sample(range(n), n)
        return {"search": sorted(order[: sizes[0]]), "report": sorted(order[sizes[0] : sum(sizes)])}


class TaskSuite:
    """A fixed list of lm-eval tasks, loaded once, that scores models.

    ``limit`` caps the documents per task, the same ones on every call so scores of different models
    are comparable: the first ``limit`` of the task's split, or with ``subset_seed`` a seeded random
    subset of that size (drawn once per task from (seed, task name)); below 1 it is a fraction of
    each task's documents, rounded up; ``limits`` (task name -> limit) overrides it per task.
    ``num_fewshot`` maps task names to their number of few-shot examples, drawn by lm-eval with
    ``fewshot_seed``: the same examples on every call (lm-eval's sampler would otherwise move on from
    call to call, giving each model other examples). ``gen_kwargs`` overrides the generation settings
    of every generating task, ``task_gen_kwargs`` (task name -> settings) of one task, over those;
    ``evaluate_kwargs`` (chat template, multi-turn few-shot, system instruction) go to every
    ``evaluate`` call. ``held_out`` (task name -> ``HeldOut``): tasks whose search and report documents
    are disjoint subsets of one document set; the suite scores its ``split``'s (``held_out`` records
    both). ``confirm_run_unsafe_code``: the task names (or True: all) whose programs may run; a task
    whose definition says ``unsafe_code`` and is not confirmed is refused (TaskError) before it loads.
    """

    def __init__(
        self,
        tasks: list[str | Path],
        limit: int | float | None = None,
        subset_seed: int | None = None,
        num_fewshot: dict[str, int] | None = None,
        fewshot_seed: int = 1234,
        gen_kwargs: dict | None = None,
        evaluate_kwargs: dict | None = None,
        held_out: dict[str, HeldOut] | None = None,
        split: str = "search",
        limits: dict[str, int | float] | None = None,
        task_gen_kwargs: dict[str, dict] | None = None,
        confirm_run_unsafe_code: bool | Collection[str] = (),
    ):
        refs = [resolve_task(t) for t in tasks]
        self.names = [r.name for r in refs]
        if len(set(self.names)) != len(self.names):
            raise TaskError(f"duplicate task names in {self.names}")
        self.task_dict = self._load(refs, confirm_run_unsafe_code)
        self.limit, self.limits = limit, dict(limits or {})
        self.fewshot_seed = fewshot_seed
        self.evaluate_kwargs = dict(evaluate_kwargs or {})
        for name in [*(num_fewshot or {}), *self.limits, *(task_gen_kwargs or {})]:
            if name not in self.names:
                raise TaskError(f"{name!r} is not one of the suite's tasks {self.names}")
        self._owner = {leaf: name for name in self.names for leaf in self.members(name)}
        self._configure(num_fewshot or {}, gen_kwargs or {}, task_gen_kwargs or {})
        self.samples = None
        self._subsets: dict[int | None, dict[str, list[int]]] = {}
        self.held_out: dict[str, dict[str, list[int]]] = {}  # leaf -> split -> its documents
        self._draw(subset_seed, held_out or {}, split)

    def _load(self, refs: list[TaskRef], confirmed: bool | Collection[str]) -> dict:
        """lm-eval's task dict of ``refs``; unsafe tasks only where confirmed (checked before loading:
        loading a code task already runs code)."""
        from lm_eval.tasks import get_task_dict

        builtin = [r.name for r in refs if r.yaml_path is None]
        manager = task_manager(builtin)
        unknown = [n for n in builtin if n not in manager.all_tasks]
        if unknown:
            raise TaskError(f"unknown lm-eval task(s) {unknown} (not a .yaml path nor a built-in name)")
        specs = [_local_config(r) if r.yaml_path else r.name for r in refs]
        unsafe = {r.name: unsafe_tasks(manager, spec) for r, spec in zip(refs, specs)}
        for name, found in unsafe.items():
            if found and not (confirmed is True or name in confirmed):
                raise TaskError(
                    f"task {name} runs the programs the model writes (unsafe_code in the definition of "
                    f"{', '.join(found)}); it is scored only with confirm_run_unsafe_code"
                )
        self.runs_code = any(unsafe.values())
        if self.runs_code:  # what code_eval asks of the process before it runs anything
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        _quiet_lm_eval()
        _cache_prompt_templates()
        return get_task_dict(specs, manager)

    def leaves(self) -> list[tuple[str, object]]:
        """(name, lm-eval Task) of every leaf task (a group's subtasks in its place)."""
        return list(_leaf_tasks(self.task_dict))

    def members(self, name: str) -> list[str]:
        """The leaf tasks of one of the suite's tasks: itself, or a group's subtasks."""
        leaves = dict(_leaf_tasks(self.task_dict))
        return [name] if name in leaves else sorted(_group_members(self.task_dict, name))

    def _configure(self, shots: dict[str, int], gen_kwargs: dict, task_gen_kwargs: dict[str, dict]) -> None:
        for leaf, task in _leaf_tasks(self.task_dict):
            owner = self._owner[leaf]
            if owner in shots:
                task.set_config(key="num_fewshot", value=int(shots[owner]))
            settings = {**gen_kwargs, **task_gen_kwargs.get(owner, {})}
            # as lm-eval's --gen_kwargs: only tasks that generate have generation settings
            if settings and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=settings, update=True)

    def _draw(self, subset_seed: int | None, held_out: dict[str, HeldOut], split: str) -> None:
        """The documents scored: a seeded subset per task, or a held-out task's ``split`` share."""
        leaves = dict(_leaf_tasks(self.task_dict))
        if subset_seed is not None and (self.limit is not None or self.limits):
            self.samples = {}
            for leaf, task in leaves.items():
                n = len(task.eval_docs)
                k = self.documents_of(n, self._owner[leaf])
                rng = random.Random(f"{subset_seed}:{leaf}")
                self.samples[leaf] = sorted(rng.sample(range(n), k)) if k < n else list(range(n))
        for name, sizes in held_out.items():
            for leaf in self.members(name):
                self.held_out[leaf] = sizes.documents(len(leaves[leaf].eval_docs), f"{subset_seed}:{leaf}", leaf)
                self.samples = self.samples if self.samples is not None else {}
                self.samples[leaf] = self.held_out[leaf][split]

    def documents_of(self, n: int, task: str | None = None) -> int:
        """Documents scored of a task that has ``n``: its limit (``limits``, else ``limit``) of them,
        or that fraction, rounded up."""
        limit = self.limits.get(task, self.limit)
        if limit is None:
            return n
        if limit < 1:
            return min(n, max(1, math.ceil(n * limit)))
        return min(n, int(limit))

    def output_types(self) -> dict[str, str]:
        """Each leaf task's lm-eval output type (generate_until, loglikelihood, multiple_choice, ...)."""
        return {leaf: task.get_config("output_type") for leaf, task in _leaf_tasks(self.task_dict)}

    def metrics(self) -> dict[str, set[str]]:
        """The metrics each of the suite's tasks reports, as lm-eval names them in its results:
        ``metric,filter`` (``acc,none``; gsm8k's ``exact_match,strict-match`` and
        ``exact_match,flexible-extract``); a group: its subtasks' together."""
        leaves = dict(_leaf_tasks(self.task_dict))
        out = {}
        for name in self.names:
            members = self.members(name)
            out[name] = {
                f"{m},{f}"
                for leaf in members
                for m in leaves[leaf].higher_is_better()
                for f in [getattr(e, "name", "none") for e in getattr(leaves[leaf], "_filters", None) or []] or ["none"]
            }
        return out

    def subset(self, documents: int | Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
        """Per leaf task, the indices of the documents scored: the suite's own (its ``limit``), or with
        ``documents`` the first that many of a seeded permutation of them, so that smaller subsets
        are nested in larger ones and the largest is the suite's own. Drawn once per ``documents``.
        ``documents`` may also name the documents (leaf task -> ids, racing's anchors): those of
        the suite's own, a leaf not named keeping its own; an id not among them is refused."""
        key = (
            tuple(sorted((t, tuple(ids)) for t, ids in documents.items()))
            if isinstance(documents, Mapping)
            else documents
        )
        if key in self._subsets:
            return self._subsets[key]
        out = self._subsets[key] = {}
        for leaf, task in _leaf_tasks(self.task_dict):
            if self.samples is not None and leaf in self.samples:
                full = self.samples[leaf]
            else:
                full = list(range(self.documents_of(len(task.eval_docs), self._owner[leaf])))
            if isinstance(documents, Mapping):
                if leaf in documents:
                    named = sorted(set(documents[leaf]))
                    if not set(named) <= set(full):
                        del self._subsets[key]
                        raise TaskError(f"task {leaf}: documents {sorted(set(named) - set(full))[:5]} are not scored")
                    full = named
            elif documents is not None and documents < len(full):
                order = random.Random(f"rungs:{leaf}").sample(full, len(full))
                full = sorted(order[:documents])
            out[leaf] = full
        return out

    def evaluate(
        self,
        lm,
        log_samples: bool = False,
        quiet: bool = True,
        documents: int | Mapping[str, Sequence[int]] | None = None,
    ) -> dict:
        """Run every task on ``lm`` (an lm-eval ``LM``); returns lm-eval's results dict. ``documents``:
        score only that many documents per task (``subset``), e.g. a multi-fidelity rung.

        ``quiet`` swallows lm-eval's per-call progress bars (they ignore TQDM_DISABLE) and messages;
        errors still raise.
        """
        from lm_eval.evaluator import evaluate

        chosen = documents is not None or self.samples is not None or self.limit is not None or self.limits
        samples = self.subset(documents) if chosen else None
        for _, task in _leaf_tasks(self.task_dict):  # the same few-shot examples on every call
            task.set_fewshot_seed(seed=self.fewshot_seed)
        sink = contextlib.ExitStack()
        if quiet:  # progress bars on stderr, lm-eval's batch size messages on stdout
            sink.enter_context(contextlib.redirect_stderr(io.StringIO()))
            sink.enter_context(contextlib.redirect_stdout(io.StringIO()))
        with sink:
            return evaluate(
                lm,
                self.task_dict,
                samples=samples,
                bootstrap_iters=0,
                log_samples=log_samples,
                verbosity="ERROR",
                confirm_run_unsafe_code=self.runs_code,
                **self.evaluate_kwargs,
            )

    def scores(self, lm, metrics: dict[str, str] | None = None) -> dict[str, float]:
        """One number per task: the named metric, or the first of PREFERRED_METRICS it reports."""
        results = self.evaluate(lm)["results"]
        return {name: pick_metric(results[name], (metrics or {}).get(name), name) for name in self.names}


def _leaf_tasks(task_dict: dict):
    """(name, Task) for every task in lm-eval's possibly nested task dict (groups hold subtasks)."""
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield getattr(key, "group_name", key), value


def _group_members(task_dict: dict, group: str) -> set[str]:
    for key, value in task_dict.items():
        if isinstance(value, dict):
            if getattr(key, "group_name", key) == group:
                return {n for n, _ in _leaf_tasks(value)}
            found = _group_members(value, group)
            if found:
                return found
    return set()


def check_generation_keys(settings: dict | None) -> dict | None:
    """``settings`` when every key is a generation setting (transformers' ``GenerationConfig`` or
    lm-eval's ``until``/``max_gen_toks``); ValueError naming the others."""
    if settings is None:
        return settings
    from transformers import GenerationConfig

    known = set(GenerationConfig().to_dict()) | {"until", "max_gen_toks"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown generation setting(s) {', '.join(unknown)} (not in transformers' GenerationConfig)")
    return settings


def resolve_metric(metric: str | None, reported, task: str) -> str:
    """The key of lm-eval's results (``metric,filter``) that ``metric`` names: the key itself, or a
    bare metric name its task reports under one filter only; unnamed, the first of PREFERRED_METRICS
    it reports. TaskError (naming what to choose from) when it names none, or several.
    ``reported``: the task's result keys (or ``TaskSuite.metrics``' set for it)."""
    keys = sorted(k for k in reported if "," in k and "_stderr" not in k)
    by_name: dict[str, list[str]] = {}
    for k in keys:
        by_name.setdefault(k.split(",")[0], []).append(k)
    # what to choose from: a metric by its bare name where one filter reports it, else its keys
    choices = ", ".join(n if len(ks) == 1 else ", ".join(ks) for n, ks in sorted(by_name.items())) or "nothing"
    if metric is None:
        preferred = [m for m in PREFERRED_METRICS if m in by_name]
        if not preferred:
            raise TaskError(f"task {task} reports none of {', '.join(PREFERRED_METRICS)}; name one of: {choices}")
        metric = preferred[0]
    found = [metric] if metric in keys else by_name.get(metric, [])
    if not found:
        raise TaskError(f"task {task} does not report '{metric}'; it reports: {choices}")
    if len(found) > 1:
        raise TaskError(f"task {task} reports '{metric}' under several filters; name one: {', '.join(found)}")
    return found[0]


def pick_metric(task_results: dict, metric: str | None, task: str) -> float:
    """The value of ``metric`` (``metric,filter`` or a bare name, see ``resolve_metric``) in one
    task's results."""
    return float(task_results[resolve_metric(metric, task_results, task)])


#: Tokenizations remembered per wrapped model (the same prompts come back for every candidate).
TOKENIZATION_CACHE = 200_000


def wrap_model(model, tokenizer, batch_size: int | str = 64, max_length: int | None = None, max_batch_size: int = 64):
    """An lm-eval ``HFLM`` around an in-memory model object (weights may be rewritten in place).

    It remembers its tokenizations: the tokenizer never changes while the weights do, and every
    candidate sends the same prompts, so each string is tokenized once per worker. With
    ``batch_size="auto"`` it also remembers the batch size lm-eval detects (the largest, up to
    ``max_batch_size``, that runs the longest request): lm-eval
    alone detects it again on every call, a second per candidate on the zoo and an out-of-memory
    search on a GPU, although every candidate sends the same requests. ``detections`` counts the real
    ones (one per request kind, on the first candidate). Generation is sized at its requests' real
    length (longest prompt + ``max_gen_toks``), not the model's maximum context; ``halve_batch``
    is the way back from an out-of-memory error.
    """
    device = str(next(model.parameters()).device)
    lm = _resident_hflm()(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,
        max_length=max_length,
        max_batch_size=max_batch_size,
    )
    lm._tokens, lm.batch_found, lm.detections, lm.generation_length = {}, {}, 0, None  # per instance
    return lm


@functools.cache
def _resident_hflm() -> type:
    """lm-eval's ``HFLM`` with what a resident model needs (see ``wrap_model``); made once."""
    from lm_eval.models.huggingface import HFLM

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        if kwargs:
            return HFLM.tok_encode(self, string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        hit = self._tokens.get(key)
        if hit is None:
            hit = tuple(HFLM.tok_encode(self, string, add_special_tokens, left_truncate_len))
            if len(self._tokens) < TOKENIZATION_CACHE:
                self._tokens[key] = hit
        return list(hit)  # callers get their own list, as from the tokenizer

    def generate_until(self, requests, disable_tqdm=False):
        # automatic batch sizing at the requests' own length (the longest prompt and the tokens it
        # may generate), not the model's whole context (131,072 tokens for Qwen2.5)
        longest = max((len(self.tok_encode(r.args[0])) for r in requests), default=0)
        gen = max((int((r.args[1] or {}).get("max_gen_toks", self.max_gen_toks)) for r in requests), default=0)
        self.generation_length = max(1, min(self.max_length, longest + gen))
        return HFLM.generate_until(self, requests, disable_tqdm)

    def halve_batch(self) -> bool:
        """After an out-of-memory error: half the batch size (a fixed one, or every detected one and
        the most a detection may find); False when it is 1 already."""
        if self.batch_size == "auto":
            if self.max_batch_size <= 1 and all(v <= 1 for v in self.batch_found.values()):
                return False
            self.batch_found = {k: max(1, v // 2) for k, v in self.batch_found.items()}
            self.max_batch_size = max(1, self.max_batch_size // 2)
            return True
        if int(self.batch_size_per_gpu) <= 1:
            return False
        self.batch_size_per_gpu = int(self.batch_size_per_gpu) // 2
        return True

    def detect_batch_size(self, requests=None, pos=0):
        if not requests and self.generation_length:  # a generation: a request of its real length
            requests, pos = [(None, [1] * self.generation_length, [1])], 0
        key = None if not requests else len(requests[pos][1]) + len(requests[pos][2])
        if key not in self.batch_found:
            with contextlib.redirect_stdout(io.StringIO()):
                self.batch_found[key] = HFLM._detect_batch_size(self, requests, pos)
            self.detections += 1
        return self.batch_found[key]

    methods = {"tok_encode": tok_encode, "generate_until": generate_until, "halve_batch": halve_batch}
    return type("ResidentHFLM", (HFLM,), {**methods, "_detect_batch_size": detect_batch_size})


def _cache_prompt_templates() -> None:
    """Compile each of lm-eval's prompt templates once, not once per document per call.

    lm-eval renders every ``doc_to_text``/``doc_to_target``/``doc_to_choice`` through
    ``utils.env.from_string(template)``, which compiles the Jinja template anew on each call: with
    the zoo's models that compilation was ~60% of a candidate's evaluation (benchmarks/pool.py).
    Templates are pure functions of their source, so the compiled one is reused (same output).
    """
    from jinja2 import Environment
    from lm_eval import utils

    if getattr(utils.env, "_evomerge_cached", False):
        return

    class CachedEnvironment(Environment):
        _evomerge_cached = True

        @functools.lru_cache(maxsize=4096)  # noqa: B019 -- one environment per process, kept for its life
        def _compiled(self, source: str):
            return super().from_string(source)

        def from_string(self, source, globals=None, template_class=None):
            if globals is None and template_class is None and isinstance(source, str):
                return self._compiled(source)
            return super().from_string(source, globals, template_class)

    cached = CachedEnvironment(
        loader=utils.env.loader, undefined=utils.env.undefined, keep_trailing_newline=utils.env.keep_trailing_newline
    )
    cached.filters.update(utils.env.filters)
    utils.env = cached


def _quiet_lm_eval() -> None:
    # datasets: "Using the latest cached version" for every offline load; transformers: prompts
    # longer than the model's context, which lm-eval truncates itself
    names = ("lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.api.task", "datasets", "evaluate")
    for name in (*names, "transformers.tokenization_utils_base"):
        logging.getLogger(name).setLevel(logging.ERROR)
