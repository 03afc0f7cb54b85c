"""lm-eval tasks: an objective reads one metric of a task, a local YAML path or a built-in name.

The task objectives of an evaluator share one ``TaskSuite`` (deduplicated: two objectives may read
two metrics of one task, loaded and scored once) and one lm-eval model wrapper around the resident
model. A multi-fidelity rung scores a seeded subset of each task's documents.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from evomerge.evaluate.kinds import ObjectiveKind, Scored, register
from evomerge.objectives import Objective


class TaskObjective(Objective):
    #: lm-eval task: a YAML path (relative to the evaluator file) or a built-in task name.
    task: str
    #: Metric read from the task's results (default: exact_match, acc, acc_norm, ... whichever it reports).
    metric: str | None = None
    num_fewshot: int | None = Field(default=None, ge=0)
    #: A task without ``{split}`` in its reference (a built-in task, or one file for both splits) is
    #: scored on disjoint, seeded subsets of its documents: this many for the search and this many
    #: held out for the report (a count, or below 1 a fraction). Default: the evaluator's ``limit``
    #: (else half the task) for the search, as many again for the report.
    search_docs: float | None = Field(default=None, gt=0)
    report_docs: float | None = Field(default=None, gt=0)

    def held_out(self, limit: float | None):
        """The task's ``HeldOut`` sizes, or None where its reference names a file per split."""
        from evomerge.evaluate.lmeval import HeldOut

        if "{split}" in self.task:
            return None
        search = self.search_docs or limit or 0.5
        return HeldOut(search, self.report_docs or search)


@register
class TaskKind(ObjectiveKind):
    name = "task"
    Config = TaskObjective
    noun, nouns = "task", "tasks"
    subsets_documents = True

    @classmethod
    def files(cls, objective, evaluator, split):
        path = evaluator.resolve(objective.task, split)
        return [("task", path)] if path.endswith((".yaml", ".yml")) else []  # else a built-in task name

    @classmethod
    def check(cls, objectives, evaluator, split):
        """Every task of ``split`` loads (local file or built-in name, with its data) and reports the
        metric its objective reads; costs a task load (seconds), no model."""
        import contextlib
        import io

        from evomerge.errors import first_line
        from evomerge.evaluate.config import EvaluatorError
        from evomerge.evaluate.lmeval import TaskError, TaskSuite

        where = f"{evaluator.source}: " if evaluator.source else ""
        tasks = [(i, o, evaluator.resolve(o.task, split)) for i, o in objectives]
        refs = list(dict.fromkeys(ref for _, _, ref in tasks))
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # datasets' progress bars
                suite = TaskSuite(refs)
                reported = suite.metrics()
        except TaskError as e:
            raise EvaluatorError(f"{where}objectives: {e}") from None
        except Exception as e:  # lm-eval and datasets raise many types for a task that cannot load
            raise EvaluatorError(
                f"{where}objectives: a task of the {split} split cannot be loaded: {first_line(e, with_type=True)}"
            ) from None
        if evaluator.lm_eval.gen_kwargs and "generate_until" not in suite.output_types().values():
            raise EvaluatorError(
                f"{where}lm_eval.gen_kwargs: no task of the {split} split generates text "
                "(they are scored by likelihood, without generation settings)"
            )
        _check_metrics(tasks, reported, where)
        _check_held_out(tasks, suite, evaluator, where)

    def __init__(self, objectives, evaluator, split, model, tokenizer):
        from evomerge.evaluate.lmeval import TaskSuite, resolve_task, wrap_model

        super().__init__(objectives, evaluator, split, model, tokenizer)
        self.task_of: dict[str, str] = {}  # objective name -> the task it reads
        refs, shots, held = [], {}, {}
        for o in self.objectives:
            ref = evaluator.resolve(o.task, split)
            task = resolve_task(ref).name
            self.task_of[o.name] = task
            if ref not in refs:
                refs.append(ref)
            if o.num_fewshot is not None:
                shots[task] = o.num_fewshot
            if (sizes := o.held_out(evaluator.limit)) is not None:
                held[task] = sizes
        options = evaluator.lm_eval
        self.suite = TaskSuite(
            refs,
            limit=evaluator.limit,
            subset_seed=evaluator.seed,
            num_fewshot=shots,
            fewshot_seed=evaluator.seed,
            gen_kwargs=options.gen_kwargs,
            evaluate_kwargs=options.evaluate_kwargs(),
            held_out=held,
            split=split,
        )
        self.split = split
        self.lm = wrap_model(
            model,
            tokenizer,
            batch_size=evaluator.hflm_batch_size,
            max_length=options.max_length,
            max_batch_size=options.max_batch_size,
        )

    def _evaluate(self, timings, log_samples, documents):
        """lm-eval on the suite; on an out-of-memory error the batch is halved and the evaluation run
        again, down to batch 1 (the smaller batch is kept for later candidates; ``timings`` records
        ``batch_halvings``)."""
        import torch

        while True:
            try:
                return self.suite.evaluate(self.lm, log_samples=log_samples, documents=documents)
            except torch.OutOfMemoryError:
                if not self.lm.halve_batch():
                    raise
                timings["batch_halvings"] = timings.get("batch_halvings", 0) + 1
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def documents(self) -> dict[str, dict[str, list[int]]]:
        """Per task, the documents of each split it knows: both for a held-out task, else this split's."""
        out = dict(self.suite.held_out)
        for leaf, ids in self.suite.subset(None).items():
            out.setdefault(leaf, {self.split: ids})
        return out

    def score(self, model, timings, documents=None, log_samples=False):
        from evomerge.evaluate.lmeval import pick_metric

        out = self._evaluate(timings, log_samples, documents)
        timings["documents"] = sum(len(v) for v in self.suite.subset(documents).values())
        values = {}
        for o in self.objectives:
            task = self.task_of[o.name]
            values[o.name] = pick_metric(out["results"][task], o.metric, task)
        samples = None
        if log_samples:
            samples = {t: [_compact(r) for r in recs] for t, recs in out.get("samples", {}).items()}
        return Scored(values, samples)


def _check_metrics(tasks: list[tuple[int, TaskObjective, str]], reported: dict[str, set[str]], where: str) -> None:
    """Each objective's metric is one its task reports (or, unnamed, one of the preferred ones)."""
    from evomerge.evaluate.config import EvaluatorError
    from evomerge.evaluate.lmeval import TaskError, resolve_metric, resolve_task

    for i, o, ref in tasks:
        name = resolve_task(ref).name
        try:
            resolve_metric(o.metric, reported[name], name)
        except TaskError as e:
            raise EvaluatorError(f"{where}objectives[{i}].metric: {e}") from None


def _check_held_out(tasks, suite, evaluator, where: str) -> None:
    """Objectives of one task agree on its split sizes, and the sizes fit the task's documents."""
    from evomerge.evaluate.config import EvaluatorError
    from evomerge.evaluate.lmeval import TaskError, _group_members, _leaf_tasks, resolve_task

    leaves, seen = dict(_leaf_tasks(suite.task_dict)), {}
    for i, o, ref in tasks:
        sizes, name = o.held_out(evaluator.limit), resolve_task(ref).name
        if sizes is None:
            continue
        if seen.setdefault(name, sizes) != sizes:
            raise EvaluatorError(f"{where}objectives[{i}]: the objectives of task {name} give different split sizes")
        for leaf in [name] if name in leaves else sorted(_group_members(suite.task_dict, name)):
            try:
                sizes.documents(len(leaves[leaf].eval_docs), leaf, leaf)
            except TaskError as e:
                raise EvaluatorError(f"{where}objectives[{i}]: {e}") from None


def _compact(record: dict) -> dict[str, Any]:
    """A per-sample record reduced to what a reader needs: the document id, target, the model's
    (filtered) answer and the per-sample metric values."""
    keep = {
        "doc_id": record.get("doc_id"),
        "target": _plain(record.get("target")),
        "response": _plain(record.get("filtered_resps")),
    }
    for key in record.get("metrics", []):
        if key in record:
            keep[key] = _plain(record[key])
    return keep


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
