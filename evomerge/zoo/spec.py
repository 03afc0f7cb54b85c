"""What a zoo is made of: the one source of truth for the zoo's defaults."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.zoo.skills import DATA_VERSION, EVAL_SEED, GENERAL, SKILLS, SPLIT_SIZES


class ZooSpec(BaseModel):
    """A zoo: one base pretrained on a mixed corpus and one expert fine-tuned from it per skill.

    The base sees the *easy* variant of every skill (short strings, one-digit operands) beside general
    text, so it is partly competent everywhere; each expert fine-tunes on its skill's full variant
    with replay of the base corpus, so its task vector carries the skill's gain and little damage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    architecture: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    #: Skills the experts are fine-tuned on, one expert each, trained in this order: appending a skill
    #: leaves the base and the earlier experts bit for bit as they were (the seeds are drawn in order).
    experts: tuple[str, ...] = ("add", "rev", "sort", "sub", "mul")
    #: Share of each skill's easy variant in the base corpus, relative to each general component (1.0).
    base_skill_share: float = Field(0.5, ge=0.0)
    base_steps: int = Field(2000, ge=1)
    base_lr: float = Field(3e-3, gt=0)
    expert_steps: int = Field(300, ge=1)
    expert_lr: float = Field(1e-3, gt=0)
    #: Base-corpus examples per skill example in an expert's fine-tuning batches.
    replay: float = Field(1.0, ge=0.0)
    batch_size: int = Field(64, ge=1)
    #: Give the tokenizer the zoo's chat template (``evomerge.zoo.tokenizer.CHAT_TEMPLATE``), so that
    #: lm-eval's ``apply_chat_template`` can be tried on the zoo.
    chat_template: bool = True

    @field_validator("experts")
    @classmethod
    def _known_skills(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in value if s not in SKILLS]
        if unknown:
            raise ValueError(f"unknown skill(s) {unknown}; valid: {sorted(SKILLS)}")
        if len(set(value)) != len(value) or not value:
            raise ValueError("experts must be a non-empty list of distinct skills")
        return value

    @field_validator("num_heads")
    @classmethod
    def _heads_divide(cls, value: int, info) -> int:
        hidden = info.data.get("hidden_size")
        if hidden is not None and hidden % value:
            raise ValueError(f"num_heads ({value}) must divide hidden_size ({hidden})")
        return value

    def base_mixture(self) -> dict[str, float]:
        mix = {name: 1.0 for name in GENERAL}
        mix.update({f"{s}_easy": self.base_skill_share for s in SKILLS})
        return mix

    def expert_mixture(self, skill: str) -> dict[str, float]:
        base = self.base_mixture()
        total = sum(base.values())
        mix = {k: v * self.replay / total for k, v in base.items()}
        mix[skill] = mix.get(skill, 0.0) + 1.0
        return mix

    def fingerprint(self) -> str:
        """Hash of the spec: the zoo's cache key. The weights also depend on the machine that builds
        them (``reproducible_on`` in the manifest, see ``evomerge.zoo.build``), which is not keyed on.
        The evaluation pools are: training leaves out every held-out prompt."""
        data = {"eval_seed": EVAL_SEED, "split_sizes": SPLIT_SIZES, "data_version": DATA_VERSION}
        blob = json.dumps({**self.model_dump(mode="json"), "evaluation_data": data}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: Named sizes. "default" (170k parameters per model, five experts, about 3 minutes on 2 cores) is what
#: `make demo` and the quality tests build; "micro" builds in seconds and learns nothing: for smoke
#: tests of the machinery (caching, determinism, architectures), never for quality.
PRESETS: dict[str, ZooSpec] = {
    "default": ZooSpec(),
    "micro": ZooSpec(
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        base_steps=6,
        expert_steps=3,
        batch_size=8,
        experts=("add", "rev"),
    ),
}


class LoraSpec(BaseModel):
    """LoRA experts of a zoo (``evomerge zoo build --lora``): one adapter per expert skill, trained
    with peft from the zoo's base on the same batches as the full expert of that skill (its seed),
    saved beside it as ``lora-<skill>``. Apart from the zoo's spec: adding them changes neither the
    base, the full experts, nor the zoo's fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    #: peft's ``target_modules``: every linear module but the output head
    target_modules: str | tuple[str, ...] = "all-linear"
    #: None: the zoo's ``expert_steps``
    steps: int | None = Field(None, ge=1)
    #: A LoRA learns with a larger rate than a full fine-tune (the zoo's experts: 1e-3)
    lr: float = Field(5e-3, gt=0)

    def fingerprint(self, zoo: ZooSpec) -> str:
        blob = json.dumps({"zoo": zoo.fingerprint(), "lora": self.model_dump(mode="json")}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
