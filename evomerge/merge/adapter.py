"""A merge of LoRA experts written as a LoRA adapter itself (``evomerge merge --as-adapter``).

Only where the merged task vector is a weighted sum of the experts' (linear, task_arithmetic): per
tensor, ``sum_i c_i B_i A_i s_i`` is one LoRA of rank ``sum_i r_i`` with ``B = [c_1 s_1 B_1 | ...]``
and ``A = [A_1; ...]`` (the ranks concatenated), scaling 1 (lora_alpha = r per module). The
coefficients ``c_i`` are the method's, resolved per tensor (gradients and filters included), with
LiNeS folded in. Other methods mask, elect signs or normalize per entry: their merge is not low
rank, and is refused in one line. The files are peft's format (float32 factors), loadable by
``PeftModel.from_pretrained`` onto the base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from evomerge import __version__
from evomerge.merge.io import StagedDirectory
from evomerge.merge.ondisk import _check_merge
from evomerge.merge.plan import RecipePlan
from evomerge.merge.registry import MergeError
from evomerge.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from evomerge.recipe import Recipe

#: Methods whose merged task vector is a weighted sum of the inputs' task vectors.
LOW_RANK_METHODS = ("linear", "task_arithmetic")


def coefficients(plan: RecipePlan, name: str) -> list[float]:
    """Each input's coefficient in tensor ``name``'s merged task vector, in ``plan.inputs`` order.
    MergeError where the merge of this tensor is not a weighted sum of task vectors."""
    params = plan.resolve(name)
    weights = [float(p["weight"]) for p in params.per_model]
    total, lines = sum(weights), params.lines_scale if params.lines_scale is not None else 1.0
    if plan.method.name == "task_arithmetic":
        divisor = total if params.shared.get("normalize") and abs(total) >= 1e-8 else 1.0
        return [w * float(params.shared["lambda"]) * lines / divisor for w in weights]
    if params.shared.get("normalize", True):  # linear: base + sum_i w_i d_i / sum_i w_i
        return [w * lines / total for w in weights]
    if abs(total - 1.0) > 1e-6:
        raise MergeError(
            f"linear without normalize, weights summing to {total:g}: the merge scales the base, not a low-rank delta"
        )
    return [w * lines for w in weights]


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _combined(m, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of tensor ``name``'s merged task vector (float32, ranks concatenated), or None."""
    a_parts, b_parts = [], []
    for ref, c in zip(m.plan.inputs, coefficients(m.plan, name)):
        delta = m.factors[ref].get(name) if ref in m.factors else None
        if delta is None or c == 0.0:
            continue
        a_parts.append(delta.a.float())
        b_parts.append(delta.b.float() * (c * delta.scaling))
    return (torch.cat(a_parts), torch.cat(b_parts, dim=1)) if a_parts else None


def _check_low_rank(recipe: Recipe, m) -> None:
    if recipe.merge_method not in LOW_RANK_METHODS:
        raise MergeError(
            f"--as-adapter: merge_method {recipe.merge_method} is not low rank; "
            f"only {' and '.join(LOW_RANK_METHODS)} merges of LoRA experts are"
        )
    full = [r for r in m.plan.inputs if r != m.base_ref and r not in m.factors]
    if full:
        raise MergeError(f"--as-adapter: model {full[0]} is a full checkpoint; every expert must be a LoRA adapter")


def adapter_config(base_ref: str, ranks: dict[str, int]) -> dict:
    """peft's adapter_config.json for modules of ``ranks`` (module -> rank), scaling 1 in each."""
    top = max(ranks.values())
    pattern = {re.escape(mod): r for mod, r in ranks.items() if r != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def check_adapter(recipe: Recipe):
    """The checked merge inputs of ``recipe`` if it can be written as one LoRA adapter (linear or
    task_arithmetic over LoRA experts of its base); MergeError otherwise."""
    m = _check_merge(recipe, allow_pickle=False)
    _check_low_rank(recipe, m)
    return m


def write_adapter(recipe: Recipe, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``recipe`` (linear or task_arithmetic over LoRA experts of its base) as a LoRA adapter
    directory at ``out``; returns its path. Everything is checked before anything is written."""
    from safetensors.torch import save_file

    m = check_adapter(recipe)
    tensors, ranks = {}, {}
    for info in m.infos:
        if not info.dtype.is_floating_point:
            continue
        combined = _combined(m, info.name)
        if combined is None:
            continue
        module = _module(info.name)
        tensors[f"base_model.model.{module}.lora_A.weight"] = combined[0].contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = combined[1].contiguous()
        ranks[module] = combined[0].shape[0]
    if not ranks:
        raise MergeError("--as-adapter: the merge changes no tensor of the base")
    staged = StagedDirectory(out, overwrite=overwrite)
    try:
        metadata = {"format": "pt", "evomerge_version": __version__, "merge_method": recipe.merge_method}
        save_file(tensors, staged.path / ADAPTER_WEIGHTS, metadata=metadata)
        config = adapter_config(m.base_ref, ranks)
        (staged.path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (staged.path / "evomerge_recipe.yaml").write_text(recipe.to_yaml())
        return staged.commit()
    except BaseException:
        staged.discard()
        raise
