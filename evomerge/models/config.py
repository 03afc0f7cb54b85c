"""A model's config.json: read, the dtype it was saved in, and the parameters it declares."""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.models.source import ModelLoadError


def read_config(model_dir: Path) -> dict:
    """``model_dir``'s config.json (a JSON error is raised as it is: callers word it)."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def saved_dtype(config: dict) -> str | None:
    """The torch dtype name a config says its weights are in (``dtype``, else ``torch_dtype``), or None."""
    saved = config.get("dtype") or config.get("torch_dtype")
    return saved if isinstance(saved, str) else None


def parameter_names(model_dir: Path, trust_remote_code: bool = False) -> list[str]:
    """The model's parameter names (tied weights once), from its config on the meta device: no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.errors import first_line

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a config it cannot build
        reason = first_line(e, with_type=True)
        raise ModelLoadError(f"{model_dir}: cannot build the model of its config.json: {reason}") from None
    return [n for n, _ in model.named_parameters()]
