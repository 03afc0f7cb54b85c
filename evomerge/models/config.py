"""A model's config.json: read, the dtype it was saved in, and the parameters it declares."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from evomerge.models.source import ModelLoadError

#: the cached names' format: a new one never reads an older one's files
NAMES_FORMAT = b"parameter-names-1"


def read_config(model_dir: Path) -> dict:
    """``model_dir``'s config.json (a JSON error is raised as it is: callers word it)."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def saved_dtype(config: dict) -> str | None:
    """The torch dtype name a config says its weights are in (``dtype``, else ``torch_dtype``), or None."""
    saved = config.get("dtype") or config.get("torch_dtype")
    return saved if isinstance(saved, str) else None


def parameter_names(model_dir: Path, trust_remote_code: bool = False) -> list[str]:
    """The model's parameter names (tied weights once), from its config on the meta device: no weights.

    Kept in the names cache (``names_cache_dir``) under the config's bytes and the installed
    transformers' version, which are all the list depends on: a later campaign over the same
    architecture reads it without importing transformers (seconds of a controller's start). A model
    whose config names its own code (``auto_map``, or ``trust_remote_code``) is built each time:
    its code can change under the same config."""
    key = _names_key(Path(model_dir), trust_remote_code)
    names = _cached_names(key)
    if names is None:
        names = _built_names(Path(model_dir), trust_remote_code)
        _keep_names(key, names)
    return names


def names_cache_dir() -> Path:
    """Where parameter names are cached: ``$EVOMERGE_CACHE``, else ``$XDG_CACHE_HOME/evomerge``,
    else ``~/.cache/evomerge``."""
    if os.environ.get("EVOMERGE_CACHE"):
        return Path(os.environ["EVOMERGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "evomerge"


def _names_key(model_dir: Path, trust_remote_code: bool) -> str | None:
    """The cache key of ``model_dir``'s parameter names, or None when they must be built each time
    (custom code, or a config or transformers that cannot be read: building says why)."""
    import importlib.metadata

    try:
        raw = (model_dir / "config.json").read_bytes()
        if trust_remote_code or "auto_map" in json.loads(raw):
            return None
        version = importlib.metadata.version("transformers")
    except (OSError, ValueError, TypeError, importlib.metadata.PackageNotFoundError):
        return None
    return hashlib.sha256(b"%s\0%s\0" % (NAMES_FORMAT, version.encode()) + raw).hexdigest()


def _cached_names(key: str | None) -> list[str] | None:
    """The names kept under ``key``, or None (none kept, or a file that is not a list of names)."""
    if key is None:
        return None
    try:
        names = json.loads((names_cache_dir() / "parameter-names" / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    valid = isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    return names if valid else None


def _keep_names(key: str | None, names: list[str]) -> None:
    """Write ``names`` under ``key`` whole or not at all (a temporary file renamed over); a cache
    that cannot be written (a read-only home) is only a slower next start."""
    if key is None:
        return
    folder = names_cache_dir() / "parameter-names"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(names, f)
        os.replace(temporary, folder / f"{key}.json")
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _built_names(model_dir: Path, trust_remote_code: bool) -> list[str]:
    """The parameter names of the model that ``model_dir``'s config builds on the meta device."""
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
