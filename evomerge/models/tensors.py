"""What a model's weights are, read from safetensors headers alone (no tensor data is loaded).

Used before a campaign starts: an expert whose tensor shapes differ from the base's would otherwise
be noticed only once a worker had loaded everything. Local directories are read from their
shards' headers; hub ids from their shards in the local hub cache when they are there (offline too),
else through the hub's header-only metadata call (a few kilobytes per shard).
"""

from __future__ import annotations

from pathlib import Path

from evomerge.models.source import cached_snapshot, hub_cache

#: safetensors dtype names that hold floating-point weights (merged); others are copied as they are.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

#: torch's names of safetensors dtype names (torch-free: the checks before a campaign use them).
TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class TensorHeaderError(ValueError):
    """Headers that cannot be read, or models whose tensors do not line up; one line."""


def tensor_specs(ref: str, local: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name -> (shape, safetensors dtype name) of a model directory or hub id.

    Empty for a local directory holding only pickled weights (their headers cannot be read without
    loading them; such a model is checked when a worker loads it)."""
    if local:
        out = {}
        for shard in sorted(Path(ref).glob("*.safetensors")):
            out.update(_read_header(shard))
        return out
    cached = cached_snapshot(ref)
    if cached is not None and any(cached.glob("*.safetensors")):
        return tensor_specs(str(cached), True)
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.constants import is_offline_mode

    from evomerge.errors import first_line

    if is_offline_mode():
        raise TensorHeaderError(f"{ref}: not in the local hub cache ({hub_cache()}), and offline mode forbids the hub")

    try:
        meta = get_safetensors_metadata(ref)
    except Exception as e:  # the hub client raises many types; all mean "cannot read it"
        raise TensorHeaderError(f"{ref}: cannot read its safetensors headers from the hub: {first_line(e)}") from None
    return {
        name: (tuple(info.shape), info.dtype)
        for file in meta.files_metadata.values()
        for name, info in file.tensors.items()
    }


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:  # the format caps headers at 100 MB
                raise ValueError("header too large")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        return {name: (tuple(e["shape"]), str(e["dtype"])) for name, e in header.items()}
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise TensorHeaderError(f"{path}: not a readable safetensors file ({e})") from None


def first_mismatch(base: dict, other: dict) -> str | None:
    """Why ``other``'s tensors cannot be merged with ``base``'s (the first problem), or None.

    Tensors the base has and ``other`` lacks are allowed (the merge keeps the base's); a tensor of
    both must have one shape, and be floating point in both or in neither."""
    if not set(base) & set(other) and base and other:
        return f"shares no tensor name with the base (e.g. '{next(iter(other))}' vs '{next(iter(base))}')"
    for name, (shape, dtype) in base.items():
        if name not in other:
            continue
        o_shape, o_dtype = other[name]
        if o_shape != shape:
            return f"tensor '{name}' has shape {tuple(o_shape)}, the base's is {tuple(shape)}"
        if (o_dtype in FLOAT_DTYPES) != (dtype in FLOAT_DTYPES):
            return f"tensor '{name}' has dtype {o_dtype}, the base's is {dtype}"
    return None
