"""Load a causal LM and its tokenizer from a local directory or a hub id, safely.

Safetensors only unless ``allow_pickle`` (a pickled checkpoint can run code when loaded);
``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with the reason in one line."""


def weight_files(model_dir: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickled checkpoint files) directly inside ``model_dir``."""
    safe = sorted(model_dir.glob("*.safetensors"))
    pickled = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return safe, pickled


def load_causal_lm(ref: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False,
                   dtype=None, device: str | None = None):
    """``(model, tokenizer)`` for a local model directory or a hub id; the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(ref)
    is_local = path.exists() or str(ref).startswith((".", "/", "~"))
    if is_local:
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {ref}")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{ref}: not a Hugging Face model directory (no config.json)")
        safe, pickled = weight_files(path)
        if not safe and pickled and not allow_pickle:
            raise ModelLoadError(
                f"{ref}: only pickled weights ({pickled[0].name}); refusing to load them "
                "without an explicit allow_pickle (they can execute code)"
            )
        if not safe and not pickled:
            raise ModelLoadError(f"{ref}: no weight files (*.safetensors)")
    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle else True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(ref), **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{ref}: cannot load model: {first}") from None
    if device:
        model.to(device)
    return model.eval(), tokenizer
