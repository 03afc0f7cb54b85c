"""Load a causal LM and its tokenizer from a local directory or a hub id, safely.

Safetensors only unless ``allow_pickle`` (a pickled checkpoint can run code when loaded);
``trust_remote_code`` is off unless the caller turns it on.
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


def load_causal_lm(
    ref: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False, dtype=None, device: str | None = None
):
    """``(model, tokenizer)`` for a local model directory or a hub id; the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(ref)
    if is_local_model(ref):
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {ref}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{ref}: not a Hugging Face model directory (no config.json)")
        checked_weight_files(path, allow_pickle)
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{ref}: cannot load model: {first_line(e)}") from None
    if device:
        model.to(device)
    return model.eval(), tokenizer
