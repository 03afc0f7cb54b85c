"""A model directory's weights read tensor by tensor: ``ModelSource`` over its safetensors shards
(``SafetensorsFile``), or its pickled checkpoints loaded whole where pickle is allowed."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.models.config import read_config
from evomerge.models.source import ModelLoadError, checked_weight_files, weight_files
from evomerge.models.tensors import TORCH_NAMES

#: torch dtype -> safetensors dtype name, and back.
SAFETENSORS_NAMES = {getattr(torch, name): st for st, name in TORCH_NAMES.items()}
TORCH_DTYPES = {st: dtype for dtype, st in SAFETENSORS_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class SafetensorsFile:
    """One safetensors file read tensor by tensor with plain reads (no memory map), so a streamed
    merge holds only the tensors in flight, not the pages of every input it has touched."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, size, 8))
        except (struct.error, ValueError) as e:
            os.close(self._fd)
            raise ModelLoadError(f"{path}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._start = 8 + size
        self.entries = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> TensorInfo:
        e = self.entries[name]
        return TensorInfo(name, tuple(e["shape"]), TORCH_DTYPES[e["dtype"]])

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        view = memoryview(buf)
        got = 0
        while got < len(buf):  # pread may return short reads on large ranges
            n = os.preadv(self._fd, [view[got:]], self._start + begin + got)
            if n <= 0:
                raise ModelLoadError(f"{self.path}: truncated tensor '{name}'")
            got += n
        dtype = TORCH_DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])

    def close(self) -> None:
        os.close(self._fd)


class ModelSource:
    """A model directory's config and weights, read lazily tensor by tensor (safetensors shards).

    Pickled checkpoints (``*.bin`` ...) are refused unless ``allow_pickle``; when allowed they are
    loaded whole (``torch.load(weights_only=True)``), since that format cannot be streamed.
    Raises ModelLoadError (a config.json that is not JSON: the JSON error).
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"{self.path}: not a model directory (no config.json)")
        self.config = read_config(self.path)
        files = checked_weight_files(self.path, allow_pickle)
        self._handles = {}
        self._where: dict[str, str] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        if files[0].suffix != ".safetensors":  # pickled, allowed: loaded whole, it cannot be streamed
            self._pickled = {}
            for p in files:
                self._pickled.update(torch.load(p, map_location="cpu", weights_only=True))
            return
        for f in files:
            handle = SafetensorsFile(f)
            self._handles[f.name] = handle
            for key in handle.keys():
                self._where[key] = f.name

    def names(self) -> list[str]:
        return list(self._pickled) if self._pickled is not None else list(self._where)

    def info(self, name: str) -> TensorInfo:
        if self._pickled is not None:
            t = self._pickled[name]
            return TensorInfo(name, tuple(t.shape), t.dtype)
        return self._handles[self._where[name]].info(name)

    def tensor(self, name: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[name]
        return self._handles[self._where[name]].tensor(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}


def stored_names(model_dirs: dict[str, Path], base: str, allow_pickle: bool = False) -> tuple[str, ...] | None:
    """The tensors every model's safetensors files hold (``model_dirs``: name -> directory), in the
    order of ``base``'s, from the headers alone (no transformers). None when a model holds pickled
    checkpoints, which cannot be listed without loading them."""
    if not all(weight_files(d)[0] for d in model_dirs.values()):  # pickled (or none: ModelSource says which)
        return None
    sources = {n: ModelSource(d, allow_pickle) for n, d in model_dirs.items()}
    try:
        held = [set(s.names()) for s in sources.values()]
        return tuple(n for n in sources[base].names() if all(n in h for h in held))
    finally:
        for s in sources.values():
            s.close()


def stored_bytes(ref: str) -> int | None:
    """Bytes of a model's weight files on this machine (a local directory, or a hub id's snapshot in
    the local cache), or None where they are not here to measure."""
    from evomerge.models.source import PICKLE_SUFFIXES, cached_snapshot, is_local_model

    folder = Path(ref) if is_local_model(ref) else cached_snapshot(ref)
    if folder is None or not folder.is_dir():
        return None
    suffixes = (".safetensors", *PICKLE_SUFFIXES)
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(suffixes) and f.is_file())
