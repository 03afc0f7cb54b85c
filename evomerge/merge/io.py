"""On-disk merges: stream tensors from memory-mapped safetensors shards into sharded safetensors.

Peak memory is a few tensors times the number of inputs: inputs are memory-mapped and read one
tensor at a time, and the writer computes every shard's header up front (shapes and dtypes are
known from the inputs' headers), then appends each merged tensor's bytes as it is produced.
The result is written into a temporary sibling directory and renamed into place at the end, so an
interrupted or failed merge leaves nothing at the target.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import first_line
from evomerge.merge.registry import MergeError
from evomerge.models.loading import ModelLoadError, checked_weight_files, is_local_model

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NAMES = {v: k for k, v in _DTYPES.items()}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


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
            raise MergeError(f"{path}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._start = 8 + size
        self.entries = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> TensorInfo:
        e = self.entries[name]
        return TensorInfo(name, tuple(e["shape"]), _NAMES[e["dtype"]])

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        view = memoryview(buf)
        got = 0
        while got < len(buf):  # pread may return short reads on large ranges
            n = os.preadv(self._fd, [view[got:]], self._start + begin + got)
            if n <= 0:
                raise MergeError(f"{self.path}: truncated tensor '{name}'")
            got += n
        dtype = _NAMES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])

    def close(self) -> None:
        os.close(self._fd)


class ModelSource:
    """A model directory's weights, read lazily tensor by tensor (safetensors shards).

    Pickled checkpoints (``*.bin`` ...) are refused unless ``allow_pickle``; when allowed they are
    loaded whole (``torch.load(weights_only=True)``), since that format cannot be streamed.
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise MergeError(f"{self.path}: not a model directory (no config.json)")
        self.config = json.loads((self.path / "config.json").read_text())
        try:
            files = checked_weight_files(self.path, allow_pickle)
        except ModelLoadError as e:  # merges report MergeError
            raise MergeError(str(e)) from None
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


def resolve_model_dir(ref: str, allow_pickle: bool = False) -> Path:
    """A local model directory for ``ref``: an existing path, or a hub id fetched (weights and
    tokenizer files only; safetensors unless pickle is allowed) into the local hub cache."""
    path = Path(ref).expanduser()
    if is_local_model(ref):
        if not path.is_dir():
            raise MergeError(f"model directory not found: {ref}")
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types; all mean "cannot get it"
        raise MergeError(f"{ref}: not a local directory and cannot be fetched from the hub: {first_line(e)}") from None


# --- the streaming writer ------------------------------------------------------------------------


def _nbytes(info: TensorInfo) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n * torch.empty((), dtype=info.dtype).element_size()


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    shards, current, size = [], [], 0
    for info in infos:
        nbytes = _nbytes(info)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(info)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


class ShardedWriter:
    """Writes tensors, in the planned order, into safetensors shards with an index."""

    def __init__(
        self, out_dir: Path, infos: list[TensorInfo], max_shard_bytes: int, metadata: dict[str, str] | None = None
    ):
        self.out_dir = out_dir
        self.shards = plan_shards(infos, max_shard_bytes)
        n = len(self.shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, info) for i, shard in enumerate(self.shards) for info in shard]
        self._next = 0
        self._fh = None
        self._open_shard = -1

    def _start(self, shard: int) -> None:
        if self._fh:
            self._fh.close()
        header, offset = {"__metadata__": self.metadata}, 0
        for info in self.shards[shard]:
            nbytes = _nbytes(info)
            header[info.name] = {
                "dtype": _DTYPES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self._fh = open(self.out_dir / self.files[shard], "wb")
        self._fh.write(struct.pack("<Q", len(blob)))
        self._fh.write(blob)
        self._open_shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, info = self._order[self._next]
        if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise MergeError(
                f"writer expected {info.name} {info.shape} {info.dtype}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._open_shard:
            self._start(shard)
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._fh.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise MergeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if self._fh:
            self._fh.close()
        elif self._order == []:
            self._start(0)
            self._fh.close()
        if len(self.files) > 1:
            total = sum(_nbytes(info) for _, info in self._order)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {info.name: self.files[s] for s, info in self._order},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- the atomic output directory -----------------------------------------------------------------


class StagedDirectory:
    """A temporary sibling of ``target`` that becomes ``target`` on ``commit`` (else is removed)."""

    def __init__(self, target: str | Path, overwrite: bool = False):
        self.target = Path(target)
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())) and not overwrite:
            raise MergeError(f"{self.target} exists and is not empty (pass --force to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))

    def commit(self) -> Path:
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            self.target.rename(old)
            self.path.rename(self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.rename(self.target)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def iter_with_progress(items: list, label: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=label, unit="tensor", leave=False)
