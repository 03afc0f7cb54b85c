"""A model's config.json: read, the dtype it was saved in, and the parameters it declares."""

from __future__ import annotations

import functools
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


@functools.cache
def known_model_types() -> frozenset[str]:
    """The ``model_type`` values the installed transformers implements, read from its generated
    mapping file on its own (importing transformers' auto classes imports torch: seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    mappings = Path(next(iter(spec.submodule_search_locations))) / "models" / "auto" / "auto_mappings.py"
    try:
        module_spec = importlib.util.spec_from_file_location("_evomerge_transformers_mappings", mappings)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return frozenset(module.CONFIG_MAPPING_NAMES)
    except (OSError, AttributeError):  # another layout of transformers: ask it (slower)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return frozenset(CONFIG_MAPPING_NAMES)


def custom_code(config: dict, model_dir: Path | None = None) -> tuple[str, bool] | None:
    """What code beyond transformers' own a model's files ask for, as (a phrase naming the class,
    whether ``trust_remote_code`` would run it), or None for a plain model: ``auto_map`` in its
    config.json (or in ``model_dir``'s tokenizer_config.json), or a ``model_type`` the installed
    transformers does not know (without ``auto_map``, nothing could run it)."""
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and auto_map:
        wanted = auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()))
        return f"its config.json asks for custom code: {_class_name(wanted)} (auto_map)", True
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in known_model_types():
        architectures = config.get("architectures")
        wanted = architectures[0] if isinstance(architectures, list) and architectures else "no class"
        return (
            f"its model_type {model_type!r} is not one transformers knows (it asks for {_class_name(wanted)}) "
            "and its config.json gives no code for it (auto_map)",
            False,
        )
    tokenizer = Path(model_dir) / "tokenizer_config.json" if model_dir is not None else None
    try:
        auto_map = json.loads(tokenizer.read_text()).get("auto_map") if tokenizer and tokenizer.is_file() else None
    except (OSError, ValueError, AttributeError):
        auto_map = None  # an unreadable tokenizer config is the tokenizer checks' to report
    if isinstance(auto_map, dict) and auto_map:
        wanted = auto_map.get("AutoTokenizer") or next(iter(auto_map.values()))
        return f"its tokenizer_config.json asks for custom code: {_class_name(wanted)} (auto_map)", True
    return None


def _class_name(wanted) -> str:
    """An auto_map entry (``module.Class``, ``repo--module.Class``, or a [slow, fast] pair) in a few words."""
    if isinstance(wanted, list):
        wanted = next((w for w in wanted if isinstance(w, str)), None)
    return str(wanted)[:120] if wanted else "an unnamed class"
