"""lm-eval tasks: an objective reads one metric of a task, a local YAML path or a built-in name.

The task objectives of an evaluator are scored by one lm-eval model wrapper around the resident
model and as few ``TaskSuite``s as their prompt settings allow: one per distinct chat template /
multi-turn / system instruction (lm-eval takes those per call), each task loaded and scored once
(two objectives may read two metrics of one task). An objective's own lm-eval settings (documents,
few-shot examples, generation settings, prompt settings) override the evaluator's for its task;
objectives of one task that give a setting must give the same value. A multi-fidelity rung scores a
seeded subset of each task's documents.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from evomerge.evaluate.kinds import ObjectiveKind, Scored, register
from evomerge.objectives import Objective

#: Settings that belong to a task, not to one of its metrics: objectives reading one task agree on them.
TASK_SETTINGS = (
    "limit",
    "num_fewshot",
    "search_docs",
    "report_docs",
    "gen_kwargs",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "system_instruction",
    "confirm_run_unsafe_code",
)
#: Settings lm-eval takes per ``evaluate`` call: tasks that differ in them are scored by separate suites.
PROMPT_SETTINGS = ("apply_chat_template", "fewshot_as_multiturn", "system_instruction")


class TaskObjective(Objective):
    #: lm-eval task: a YAML path (relative to the evaluator file) or a built-in task name.
    task: str
    #: Metric read from the task's results as lm-eval names it (``exact_match,strict-match``), or a
    #: bare name it reports under one filter only. Default: exact_match, acc, acc_norm, ... whichever
    #: it reports.
    metric: str | None = None
    #: Few-shot examples (default: the task's own number).
    num_fewshot: int | None = Field(default=None, ge=0)
    #: Documents scored of a task with a file per split (``{split}``): a count, or below 1 a fraction.
    #: Default: the evaluator's ``limit``.
    limit: float | None = Field(default=None, gt=0)
    #: A task without ``{split}`` in its reference (a built-in task, or one file for both splits) is
    #: scored on disjoint, seeded subsets of its documents: this many for the search and this many
    #: held out for the report (a count, or below 1 a fraction). Default: the objective's ``limit``,
    #: else the evaluator's (else half the task) for the search, as many again for the report.
    search_docs: float | None = Field(default=None, gt=0)
    report_docs: float | None = Field(default=None, gt=0)
    #: This task's generation settings, over the evaluator's ``lm_eval.gen_kwargs``.
    gen_kwargs: dict[str, Any] | None = None
    #: Prompt settings of this task; default: the evaluator's ``lm_eval`` ones.
    apply_chat_template: bool | str | None = None
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None
    #: Allow a task whose definition says ``unsafe_code`` (mbpp, humaneval): scoring it runs the
    #: programs the model writes, in the worker's processes. Refused before compute without it.
    confirm_run_unsafe_code: bool = False

    @field_validator("gen_kwargs")
    @classmethod
    def _generation_keys(cls, value):
        from evomerge.evaluate.lmeval import check_generation_keys

        return check_generation_keys(value)

    @field_validator("limit")
    @classmethod
    def _limit(cls, value):
        if value is not None and not (value < 1 or float(value).is_integer()):
            raise ValueError("a number of documents (a whole number >= 1) or a fraction below 1")
        return int(value) if value is not None and value >= 1 else value

    def held_out(self, limit: float | None):
        """The task's ``HeldOut`` sizes, or None where its reference names a file per split."""
        from evomerge.evaluate.lmeval import HeldOut

        if "{split}" in self.task:
            return None
        search = self.search_docs or self.limit or limit or 0.5
        return HeldOut(search, self.report_docs or search)

    def prompt(self, options) -> dict[str, Any]:
        """``lm_eval.evaluator.evaluate``'s prompt keywords for this task: its own settings, else the
        evaluator's ``options`` (``LmEvalOptions``)."""
        own = {key: getattr(self, key) for key in PROMPT_SETTINGS}
        return {key: getattr(options, key) if value is None else value for key, value in own.items()}


class _Plan:
    """What scores one split's task objectives: each task's settings (its objectives' merged: a
    setting one of them gives), and per group of prompt settings its tasks with their few-shot
    numbers, limits, generation settings, held-out sizes and confirmed code tasks."""

    def __init__(self, objectives, evaluator, split):
        from evomerge.evaluate.lmeval import resolve_task

        self.task_of: dict[str, str] = {}  # objective name -> the task it reads
        self.merged: dict[str, TaskObjective] = {}  # task -> its settings (an objective of it)
        refs: dict[str, str] = {}
        for _, o in objectives:
            ref = evaluator.resolve(o.task, split)
            task = self.task_of[o.name] = resolve_task(ref).name
            refs.setdefault(task, ref)
            given = {k: getattr(o, k) for k in TASK_SETTINGS if getattr(o, k) not in (None, False)}
            self.merged[task] = self.merged.get(task, o).model_copy(update=given)
        self.groups: dict[tuple, dict[str, Any]] = {}
        for task, o in self.merged.items():
            prompt = o.prompt(evaluator.lm_eval)
            group = self.groups.setdefault(
                tuple(prompt.values()),
                {"prompt": prompt, "refs": [], "tasks": [], "shots": {}, "limits": {}, "gen": {}, "held": {}},
            )
            group["refs"].append(refs[task])
            group["tasks"].append(task)
            for key, value in (("shots", o.num_fewshot), ("limits", o.limit), ("gen", o.gen_kwargs)):
                if value is not None:
                    group[key][task] = value
            if (sizes := o.held_out(evaluator.limit)) is not None:
                group["held"][task] = sizes
            group.setdefault("confirmed", set()).update([task] if o.confirm_run_unsafe_code else [])

    def suite(self, group: dict, evaluator, split: str, draw: bool = True):
        """The ``TaskSuite`` of one group (``draw``: with its documents drawn; a check loads only)."""
        from evomerge.evaluate.lmeval import TaskSuite

        options = evaluator.lm_eval
        return TaskSuite(
            group["refs"],
            limit=evaluator.limit_for(split) if draw else None,
            subset_seed=evaluator.seed if draw else None,
            num_fewshot=group["shots"],
            fewshot_seed=evaluator.seed,
            gen_kwargs=options.gen_kwargs,
            evaluate_kwargs=group["prompt"],
            held_out=group["held"] if draw else None,
            split=split,
            limits=group["limits"] if draw and evaluator.own_limits_apply(split) else None,
            task_gen_kwargs=group["gen"],
            confirm_run_unsafe_code=group["confirmed"],
        )


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
        metric its objective reads; objectives of one task agree on its settings; a task that runs
        the model's programs is confirmed (checked before it loads); costs a task load, no model."""
        import contextlib
        import io

        from evomerge.errors import first_line
        from evomerge.evaluate.config import EvaluatorError
        from evomerge.evaluate.lmeval import TaskError

        where = f"{evaluator.source}: " if evaluator.source else ""
        _check_settings(objectives, evaluator, split, where)
        plan, suites = _Plan(objectives, evaluator, split), []
        try:
            _check_unsafe(objectives, plan, evaluator, split, where)
            with contextlib.redirect_stderr(io.StringIO()):  # datasets' progress bars
                for group in plan.groups.values():
                    suites.append((group, plan.suite(group, evaluator, split, draw=False)))
        except EvaluatorError:
            raise
        except TaskError as e:
            raise EvaluatorError(f"{where}objectives: {e}") from None
        except Exception as e:  # lm-eval and datasets raise many types for a task that cannot load
            raise EvaluatorError(
                f"{where}objectives: a task of the {split} split cannot be loaded: {first_line(e, with_type=True)}"
            ) from None
        _check_generation(objectives, plan, [s for _, s in suites], evaluator, split, where)
        for group, suite in suites:
            mine = [(i, o) for i, o in objectives if plan.task_of[o.name] in group["tasks"]]
            _check_metrics(mine, plan, suite.metrics(), where)
            _check_held_out(mine, plan, suite, evaluator, where)

    def __init__(self, objectives, evaluator, split, model, tokenizer):
        from evomerge.evaluate.lmeval import wrap_model

        super().__init__(objectives, evaluator, split, model, tokenizer)
        plan = _Plan(list(enumerate(self.objectives)), evaluator, split)
        self.task_of = plan.task_of
        #: (suite, its objectives) per group of prompt settings
        self.suites = [
            (plan.suite(g, evaluator, split), [o for o in self.objectives if plan.task_of[o.name] in g["tasks"]])
            for g in plan.groups.values()
        ]
        self.split = split
        options = evaluator.lm_eval
        self.lm = wrap_model(
            model,
            tokenizer,
            batch_size=evaluator.hflm_batch_size,
            max_length=options.max_length,
            max_batch_size=options.max_batch_size,
        )

    @property
    def suite(self):
        """The first (usually the only) task suite."""
        return self.suites[0][0]

    def _evaluate(self, suite, timings, log_samples, documents):
        """lm-eval on one suite; on an out-of-memory error the batch is halved and the evaluation run
        again, down to batch 1 (the smaller batch is kept for later candidates; ``timings`` records
        ``batch_halvings``)."""
        import torch

        while True:
            try:
                return suite.evaluate(self.lm, log_samples=log_samples, documents=documents)
            except torch.OutOfMemoryError:
                if not self.lm.halve_batch():
                    raise
                timings["batch_halvings"] = timings.get("batch_halvings", 0) + 1
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def documents(self) -> dict[str, dict[str, list[int]]]:
        """Per task, the documents of each split it knows: both for a held-out task, else this split's."""
        out = {}
        for suite, _ in self.suites:
            out.update(suite.held_out)
            for leaf, ids in suite.subset(None).items():
                out.setdefault(leaf, {self.split: ids})
        return out

    def score(self, model, timings, documents=None, log_samples=False):
        from evomerge.evaluate.lmeval import resolve_metric

        values, samples, per_document, timings["documents"] = {}, {} if log_samples else None, {}, 0
        for suite, objectives in self.suites:
            # lm-eval's per-sample records always: each objective's per-document scores come from them
            out = self._evaluate(suite, timings, True, documents)
            timings["documents"] += sum(len(v) for v in suite.subset(documents).values())
            for o in objectives:
                task = self.task_of[o.name]
                key = resolve_metric(o.metric, out["results"][task], task)  # metric,filter
                values[o.name] = float(out["results"][task][key])
                per_document[o.name] = _per_document(out["samples"], suite.members(task), key)
            if log_samples:
                samples.update({t: [_compact(r) for r in recs] for t, recs in out.get("samples", {}).items()})
        return Scored(values, samples, per_document)


def _check_settings(objectives, evaluator, split: str, where: str) -> None:
    """Objectives of one task give one value of each task setting; multi-turn few-shot examples
    have a chat template."""
    from evomerge.evaluate.config import EvaluatorError
    from evomerge.evaluate.lmeval import resolve_task

    given: dict[tuple[str, str], tuple[int, Any]] = {}
    for i, o in objectives:
        task = resolve_task(evaluator.resolve(o.task, split)).name
        for key in TASK_SETTINGS:
            value = getattr(o, key)
            if value in (None, False):
                continue
            first = given.setdefault((task, key), (i, value))
            if first[1] != value:
                raise EvaluatorError(
                    f"{where}objectives[{i}].{key}: objectives[{first[0]}] gives task {task} another {key} "
                    "(a task is scored once: its objectives share its settings)"
                )
        prompt = o.prompt(evaluator.lm_eval)
        if prompt["fewshot_as_multiturn"] and not prompt["apply_chat_template"]:
            raise EvaluatorError(
                f"{where}objectives[{i}].fewshot_as_multiturn: needs apply_chat_template "
                "(the turns are the chat template's)"
            )


def _check_unsafe(objectives, plan, evaluator, split: str, where: str) -> None:
    """A task that runs the model's programs is confirmed by its objective (read before it loads)."""
    from evomerge.evaluate.config import EvaluatorError
    from evomerge.evaluate.lmeval import unsafe_code_of

    for i, o in objectives:
        task = plan.task_of[o.name]
        if not plan.merged[task].confirm_run_unsafe_code and unsafe_code_of(evaluator.resolve(o.task, split)):
            raise EvaluatorError(
                f"{where}objectives[{i}].confirm_run_unsafe_code: task {task} runs the programs the model writes "
                "(unsafe_code in its definition); set confirm_run_unsafe_code: true on the objective to score it"
            )


def _check_generation(objectives, plan, suites, evaluator, split: str, where: str) -> None:
    """Generation settings only where a task generates text."""
    from evomerge.evaluate.config import EvaluatorError

    kinds: dict[str, str] = {}
    for suite in suites:
        for name in suite.names:
            kinds[name] = {t for leaf, t in suite.output_types().items() if leaf in suite.members(name)}
    if evaluator.lm_eval.gen_kwargs and not any("generate_until" in k for k in kinds.values()):
        raise EvaluatorError(
            f"{where}lm_eval.gen_kwargs: no task of the {split} split generates text "
            "(they are scored by likelihood, without generation settings)"
        )
    for i, o in objectives:
        task = plan.task_of[o.name]
        if o.gen_kwargs and "generate_until" not in kinds[task]:
            raise EvaluatorError(
                f"{where}objectives[{i}].gen_kwargs: task {task} does not generate text "
                "(it is scored by likelihood, without generation settings)"
            )


def _check_metrics(objectives, plan, reported: dict[str, set[str]], where: str) -> None:
    """Each objective's metric is one its task reports (or, unnamed, one of the preferred ones)."""
    from evomerge.evaluate.config import EvaluatorError
    from evomerge.evaluate.lmeval import TaskError, resolve_metric

    for i, o in objectives:
        name = plan.task_of[o.name]
        try:
            resolve_metric(o.metric, reported[name], name)
        except TaskError as e:
            raise EvaluatorError(f"{where}objectives[{i}].metric: {e}") from None


def _check_held_out(objectives, plan, suite, evaluator, where: str) -> None:
    """A held-out task's split sizes fit its documents."""
    from evomerge.evaluate.config import EvaluatorError
    from evomerge.evaluate.lmeval import TaskError

    for i, o in objectives:
        name = plan.task_of[o.name]
        sizes = plan.merged[name].held_out(evaluator.limit)
        for leaf in suite.members(name) if sizes is not None else []:
            try:
                sizes.documents(len(dict(suite.leaves())[leaf].eval_docs), leaf, leaf)
            except TaskError as e:
                raise EvaluatorError(f"{where}objectives[{i}]: {e}") from None


def _per_document(
    samples: dict[str, list[dict]], leaves: list[str], key: str
) -> dict[str, tuple[list[int], list[float]]]:
    """Per leaf task, its documents' ids (ascending) and their scores under ``key`` (``metric,filter``)."""
    metric, _, kept = key.partition(",")
    out = {}
    for leaf in leaves:
        rows = sorted(
            (int(r["doc_id"]), float(r[metric]))
            for r in samples.get(leaf, [])
            if r.get("filter", "none") == kept and metric in r
        )
        out[leaf] = ([i for i, _ in rows], [v for _, v in rows])
    return out


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
