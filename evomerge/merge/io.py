"""Model files as merges read and write them: the models (read through ``evomerge.models``, their
errors reported as MergeError), and sharded safetensors written as a merge streams its tensors.

Peak memory is a few tensors times the number of inputs: inputs are memory-mapped and read one
tensor at a time, and the writer computes every shard's header up front (shapes and dtypes are
known from the inputs' headers), then appends each merged tensor's bytes as it is produced.
The result is written into a temporary sibling directory and renamed into place at the end, so an
interrupted or failed merge leaves nothing at the target.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from evomerge.merge.registry import MergeError
from evomerge.models import source, weights
from evomerge.models.source import ModelLoadError
from evomerge.models.weights import SAFETENSORS_NAMES, TensorInfo
from evomerge.staging import staging_dir, swap_into_place, sweep_stale_staging

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


@contextmanager
def as_merge_error():
    """A model that cannot be read (``ModelLoadError``) reported as the MergeError a merge's callers catch."""
    try:
        yield
    except ModelLoadError as e:
        raise MergeError(str(e)) from None


class ModelSource(weights.ModelSource):
    """``evomerge.models.weights.ModelSource`` for merges: its errors are MergeError."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        with as_merge_error():
            super().__init__(path, allow_pickle)

    def tensor(self, name: str) -> torch.Tensor:
        with as_merge_error():
            return super().tensor(name)


def resolve_model_dir(ref: str, allow_pickle: bool = False) -> Path:
    """``evomerge.models.source.resolve_model_dir`` for merges: its errors are MergeError."""
    with as_merge_error():
        return source.resolve_model_dir(ref, allow_pickle)


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
                "dtype": SAFETENSORS_NAMES[info.dtype],
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
    """A hidden sibling of ``target`` (``.NAME.partial-PID``) that becomes ``target`` on ``commit``
    (else is removed); what killed merges of the same target left beside it is swept first
    (``evomerge.staging``: an old copy moved aside by a replace that never finished is restored)."""

    def __init__(self, target: str | Path, overwrite: bool = False):
        self.target = Path(target)
        sweep_stale_staging(self.target)
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())) and not overwrite:
            raise MergeError(f"{self.target} exists and is not empty (pass --force to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = staging_dir(self.target)
        self.path.mkdir()

    def commit(self) -> Path:
        swap_into_place(self.path, self.target)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def iter_with_progress(items: list, label: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=label, unit="tensor", leave=False)
