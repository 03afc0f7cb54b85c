"""Evaluator files (``evaluators/*.yaml``): what a candidate is scored on.

An evaluator names its objectives. Each is of one kind (``evomerge.evaluate.kinds``): an lm-eval
task with the metric read from it, or the perplexity of a local text file, with a direction, a
weight (for single-objective optimizers) and, for tasks, a number of few-shot examples.
``{split}`` in a task or text path is replaced by the split being scored: ``search`` during a
campaign, ``report`` (held out) when a winner is exported. ``limit`` documents per task are scored,
a subset drawn once from ``seed``, the same for every candidate so fitness is comparable (``limit``
below 1 is a fraction of each task's documents). Paths are relative to the evaluator file; a task
that is not a ``.yaml`` path is a built-in lm-eval task name. ``lm_eval`` passes lm-eval's own
model and prompt options through (``LmEvalOptions``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from evomerge.configfile import describe, read_yaml
from evomerge.evaluate.kinds import ObjectiveSpec, by_kind, kind_of

SPLITS = ("search", "report")


class EvaluatorError(ValueError):
    """An evaluator file that cannot be used; the message names the file and the field."""


class LmEvalOptions(BaseModel):
    """What lm-eval's ``HFLM`` and ``evaluate`` accept, passed through as the lm-eval CLI's flags of
    the same names would be."""

    model_config = ConfigDict(extra="forbid")
    #: HFLM batch size: a number, or ``auto``: the largest that fits (up to ``max_batch_size``),
    #: detected once per worker on its resident model (lm-eval alone re-detects it on every call).
    #: Default: the evaluator's ``batch_size``.
    batch_size: int | Literal["auto"] | None = None
    max_batch_size: int = Field(64, ge=1)
    #: Tokens of context kept (lm-eval truncates longer prompts from the left). Default: the model's.
    max_length: int | None = Field(None, ge=2)
    #: Render prompts with the tokenizer's chat template (``true``), or with the named one of its
    #: templates; a tokenizer without a chat template is refused before the campaign starts.
    apply_chat_template: bool | str = False
    #: With a chat template: few-shot examples as alternating user/assistant turns.
    fewshot_as_multiturn: bool = False
    #: A system prompt put before every prompt (a system turn with a chat template).
    system_instruction: str | None = None
    #: Overrides of the generation settings of every generating task (``until``, ``max_gen_toks``,
    #: ``do_sample``, ``temperature``, ...): keys of transformers' GenerationConfig or lm-eval's own.
    gen_kwargs: dict[str, Any] | None = None

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("a number >= 1, or auto")
        return value

    @field_validator("gen_kwargs")
    @classmethod
    def _generation_keys(cls, value):
        from evomerge.evaluate.lmeval import check_generation_keys

        return check_generation_keys(value)

    @model_validator(mode="after")
    def _multiturn(self):
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn: needs apply_chat_template (the turns are the chat template's)")
        return self

    def evaluate_kwargs(self) -> dict[str, Any]:
        """The keywords of ``lm_eval.evaluator.evaluate`` these options set."""
        return {
            "apply_chat_template": self.apply_chat_template,
            "fewshot_as_multiturn": self.fewshot_as_multiturn,
            "system_instruction": self.system_instruction,
        }


class EvaluatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Each of one kind (``evomerge.evaluate.kinds``), named by its key: ``task:``, ``perplexity:``.
    objectives: list[ObjectiveSpec] = Field(min_length=1)
    #: Split scored during the search; export scores the held-out ``report`` split.
    split: Literal["search", "report"] = "search"
    #: Documents per task (a fixed seeded subset); text blocks for perplexity. None: all of them.
    #: A number below 1 is a fraction of each task's documents (of the text's blocks), rounded up.
    limit: int | float | None = Field(default=None, gt=0)
    #: Documents per task (text blocks) on the report split, which scores the exported merge and what
    #: it is compared with: a count, a fraction below 1, or ``all``. Default: as on the search split
    #: (``limit`` and the objectives' own). Tasks without ``{split}`` use their ``report_docs`` instead.
    report_limit: int | float | Literal["all"] | None = None
    #: Seed of the subsets (documents, text blocks) and of few-shot example draws.
    seed: int = 0
    batch_size: int = Field(default=64, ge=1)
    #: Tokens per perplexity block (capped by the model's maximum length).
    block_size: int = Field(default=64, ge=2)
    #: lm-eval's model and prompt options (batch size, chat template, system prompt, generation).
    lm_eval: LmEvalOptions = Field(default_factory=LmEvalOptions)
    _source: Path | None = PrivateAttr(default=None)

    @field_validator("limit")
    @classmethod
    def _limit(cls, value):
        if isinstance(value, float) and not (value < 1 or value.is_integer()):
            raise ValueError("a number of documents (a whole number >= 1) or a fraction below 1")
        return int(value) if isinstance(value, float) and value >= 1 else value

    @field_validator("report_limit")
    @classmethod
    def _report_limit(cls, value):
        if isinstance(value, str) or value is None:
            return value
        if value <= 0 or not (value < 1 or float(value).is_integer()):
            raise ValueError("a number of documents (a whole number >= 1), a fraction below 1, or 'all'")
        return int(value) if value >= 1 else value

    def limit_for(self, split: str) -> int | float | None:
        """Documents per task scored on ``split`` (None: all of them)."""
        if split == "report" and self.report_limit is not None:
            return None if self.report_limit == "all" else self.report_limit
        return self.limit

    def own_limits_apply(self, split: str) -> bool:
        """Whether objectives' own ``limit`` apply on ``split`` (``report_limit`` replaces them)."""
        return not (split == "report" and self.report_limit is not None)

    @property
    def hflm_batch_size(self) -> int | str:
        """The batch size of lm-eval's model wrapper: ``lm_eval.batch_size``, else ``batch_size``."""
        return self.lm_eval.batch_size if self.lm_eval.batch_size is not None else self.batch_size

    @model_validator(mode="after")
    def _unique(self):
        names = [o.name for o in self.objectives]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"objective names must be unique; repeated: {', '.join(dup)}")
        return self

    @property
    def source(self) -> Path | None:
        return self._source

    def resolve(self, ref: str, split: str) -> str:
        """A task or text reference for ``split``: ``{split}`` filled in, local paths made absolute."""
        ref = ref.replace("{split}", split)
        local = ref.endswith((".yaml", ".yml", ".txt", ".jsonl")) or "/" in ref
        if local and self._source is not None and not Path(ref).is_absolute():
            return str((self._source.parent / ref).resolve())
        return ref

    def chat_templates_asked(self) -> list[tuple[str, bool | str]]:
        """(field, value) of every chat template the evaluator asks for: ``lm_eval``'s and objectives' own."""
        asked = [("lm_eval.apply_chat_template", self.lm_eval.apply_chat_template)]
        asked += [
            (f"objectives[{i}].apply_chat_template", getattr(o, "apply_chat_template", None))
            for i, o in enumerate(self.objectives)
        ]
        return [(field, value) for field, value in asked if value]

    def check_files(self, split: str) -> None:
        """Every local file of ``split`` an objective reads exists (before any compute starts)."""
        for i, o in enumerate(self.objectives):
            for key, path in kind_of(o).files(o, self, split):
                if not Path(path).is_file():
                    where = f"{self._source}: " if self._source else ""
                    raise EvaluatorError(f"{where}objectives[{i}].{key}: file not found: {path}")

    def check_sources(self, split: str) -> None:
        """Each kind's checks before compute, on its objectives of ``split``: every task loads and
        reports the metric its objective reads (a task load, seconds; no model)."""
        for kind, objectives in by_kind(self.objectives):
            kind.check(objectives, self, split)


def parse_evaluator(data, source: str | Path | None = None) -> EvaluatorConfig:
    where = f"{source}: " if source else ""
    try:
        config = EvaluatorConfig.model_validate(data)
    except ValidationError as e:
        raise EvaluatorError(f"{where}{describe(e)}") from None
    config._source = Path(source).resolve() if source else None
    return config


def load_evaluator(path: str | Path, check_split: str | None = None) -> EvaluatorConfig:
    """Read and validate an evaluator file; with ``check_split``, also check its local files."""
    config = parse_evaluator(read_yaml(path, EvaluatorError), path)
    if check_split:
        config.check_files(check_split)
    return config
