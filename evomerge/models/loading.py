"""Load a causal LM and its tokenizer from a local directory or a hub id, safely.

Safetensors only unless ``allow_pickle`` (``evomerge.models.source``: a pickled checkpoint can run
code when loaded); ``trust_remote_code`` is off unless the caller turns it on.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import first_line
from evomerge.models.source import ModelLoadError, checked_weight_files, is_local_model


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
    _refuse_custom_code(ref, trust_remote_code)
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


def _refuse_custom_code(ref: str | Path, trust_remote_code: bool) -> None:
    """A model whose files ask for code beyond transformers' own is not loaded as the plain
    architecture its model_type names: refused unless ``trust_remote_code`` (a hub id not in the
    local cache is left to transformers, which refuses custom code itself)."""
    from evomerge.models.config import custom_code, read_config
    from evomerge.models.source import cached_snapshot

    folder = Path(ref) if is_local_model(ref) else cached_snapshot(str(ref))
    if folder is None or not (folder / "config.json").is_file():
        return
    try:
        config = read_config(folder)
    except ValueError:
        raise ModelLoadError(f"{ref}: config.json is not valid JSON") from None
    found = custom_code(config, folder) if isinstance(config, dict) else None
    if found and not (found[1] and trust_remote_code):
        runs = ", which runs only with trust_remote_code (--trust-remote-code)" if found[1] else ""
        raise ModelLoadError(f"{ref}: {found[0]}{runs}")


#: torch dtypes a model may be loaded in for scoring (``--dtype``); None: as saved.
SCORING_DTYPES = ("float32", "bfloat16", "float16")


def scoring_device(requested: str | None = None) -> str:
    """Where to score a model: ``requested`` (``cpu``, ``cuda``, ``cuda:1``) checked against this
    machine, or, for None and ``auto``, CUDA when present, else the CPU. ModelLoadError (one line,
    naming what was asked) when the device does not exist here."""
    import torch

    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device '{requested}' (cpu, cuda, cuda:N, auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device '{requested}': CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device '{requested}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ModelLoadError(f"device '{requested}': only cpu and cuda are supported")
    return str(device)
