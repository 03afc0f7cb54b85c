"""Where a model comes from: a local directory or a hub id (fetched into, or found in, the local hub
cache), and which of its weight files may be read.

Safetensors only unless ``allow_pickle`` (a pickled checkpoint can run code when loaded). Every
model that cannot be had or read is reported as ``ModelLoadError``, one line.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import first_line

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with the reason in one line."""


def is_local_model(ref: str | Path, relative_to: Path | None = None) -> bool:
    """True if ``ref`` names a local model directory rather than a hub id: it is written as a path
    (starts with '.', '/' or '~') or exists (relative to ``relative_to`` when given)."""
    path = Path(ref).expanduser()
    return str(ref).startswith((".", "/", "~")) or (relative_to / path if relative_to else path).exists()


def weight_files(model_dir: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickled checkpoint files) directly inside ``model_dir``."""
    safe = sorted(model_dir.glob("*.safetensors"))
    pickled = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return safe, pickled


def checked_weight_files(model_dir: Path, allow_pickle: bool) -> list[Path]:
    """The weight files to load from ``model_dir``: its safetensors files, else (only with
    ``allow_pickle``) its pickled checkpoints. Raises ModelLoadError when there are none to load."""
    safe, pickled = weight_files(model_dir)
    if safe:
        return safe
    if not pickled:
        raise ModelLoadError(f"{model_dir}: no weight files (*.safetensors)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{model_dir}: only pickled weights ({pickled[0].name}), which can execute "
            "code when loaded; refusing them unless pickle is allowed "
            "(--allow-pickle, or allow_pickle: true in an experiment)"
        )
    return pickled


def resolve_model_dir(ref: str, allow_pickle: bool = False) -> Path:
    """A local model directory for ``ref``: an existing path, or a hub id fetched (weights and
    tokenizer files only; safetensors unless pickle is allowed) into the local hub cache."""
    path = Path(ref).expanduser()
    if is_local_model(ref):
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {ref}")
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "README.md"]  # the card: its license
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types; all mean "cannot get it"
        raise ModelLoadError(
            f"{ref}: not a local directory and cannot be fetched from the hub: {first_line(e)}"
        ) from None


def hub_cache() -> str:
    """Where huggingface_hub keeps downloaded models (``HF_HUB_CACHE``, else ``HF_HOME``/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(ref: str) -> Path | None:
    """The folder of the snapshot of hub id ``ref`` that its ``main`` ref points to in the local hub
    cache, or None; never contacts the hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises a few types for it)
        return None
