"""`evomerge merge RECIPE --out DIR`: a recipe merged from disk to disk, streaming.

Everything is validated before any tensor is computed: models resolve, share the base's
architecture, tensor names and shapes (the first mismatch is named), and every tensor's parameters
resolve and lie in range. A merged tensor holding NaN or inf aborts the merge with its name;
nothing is written at the target unless the whole merge succeeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evomerge import __version__
from evomerge.merge.apply import compute_tensor
from evomerge.merge.checkpoint import DEFAULT_SHARD_BYTES, write_model_files
from evomerge.merge.chunks import all_finite
from evomerge.merge.io import (
    DTYPE_NAMES,
    ModelSource,
    ShardedWriter,
    StagedDirectory,
    TensorInfo,
    as_merge_error,
    iter_with_progress,
    resolve_model_dir,
)
from evomerge.merge.lowrank import kept as lowrank_kept
from evomerge.merge.lowrank import load_factors
from evomerge.merge.plan import RecipePlan
from evomerge.merge.registry import MergeError
from evomerge.models.layout import num_layers
from evomerge.models.lora import check_adapter, is_adapter_dir
from evomerge.models.source import ModelLoadError
from evomerge.recipe import Recipe


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1024' -> bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    s = text.strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit) and s[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * factor)
    if s.isdigit():
        return int(s)
    raise MergeError(f"cannot read size '{text}' (use e.g. 500MB, 2GB)")


def num_layers_of(config: dict) -> int:
    """The base's layer count (``models.layout.num_layers``), as a merge error when it names none."""
    try:
        return num_layers(config)
    except ModelLoadError:
        raise MergeError("the base config names no layer count (num_hidden_layers)") from None


def _check_compatible(base_ref: str, base: ModelSource, others: dict[str, ModelSource]) -> list[TensorInfo]:
    infos = [base.info(n) for n in base.names()]
    shapes = {i.name: i.shape for i in infos}
    arch = (base.config.get("model_type"), tuple(base.config.get("architectures") or ()))
    for ref, src in others.items():
        other_arch = (src.config.get("model_type"), tuple(src.config.get("architectures") or ()))
        if other_arch[0] != arch[0]:
            raise MergeError(f"{ref}: model_type '{other_arch[0]}' differs from the base's '{arch[0]}'")
        names = set(src.names())
        for info in infos:
            if info.name not in names:
                raise MergeError(f"{ref}: has no tensor '{info.name}' (the base {base_ref} has)")
            shape = src.info(info.name).shape
            if shape != info.shape:
                raise MergeError(
                    f"{ref}: tensor '{info.name}' has shape {list(shape)}, the base has {list(info.shape)}"
                )
        extra = sorted(names - set(shapes))
        if extra:
            raise MergeError(f"{ref}: tensor '{extra[0]}' is not in the base {base_ref}")
    return infos


def _refuse_custom_code(sources: dict[str, ModelSource], dirs: dict[str, Path], trust_remote_code: bool) -> None:
    from evomerge.models.config import custom_code

    for ref, src in sources.items():
        found = custom_code(src.config, dirs[ref])
        if found and not (found[1] and trust_remote_code):
            runs = ", which runs only with trust_remote_code" if found[1] else ""
            raise MergeError(f"{ref}: {found[0]}{runs}")


@dataclass
class _MergeInputs:
    """A recipe's merge checked before any compute: its models, tensors, plan and output dtypes."""

    recipe: Recipe
    dirs: dict[str, Path]
    sources: dict[str, ModelSource]
    base_ref: str
    tok_ref: str
    infos: list[TensorInfo]
    out_infos: list[TensorInfo]
    plan: RecipePlan
    out_dtype: torch.dtype | None
    #: LoRA experts' factors (ref -> ``LoraFactors``), checked against the base
    factors: dict = field(default_factory=dict)

    @property
    def base(self) -> ModelSource:
        return self.sources[self.base_ref]


def _check_merge(recipe: Recipe, allow_pickle: bool, trust_remote_code: bool = False) -> _MergeInputs:
    """Models resolve and share the base's tensors, the output dtype is known, and every tensor's
    parameters resolve and lie in range."""
    refs = recipe.model_names()
    base_ref = recipe.base_model or refs[0]
    dirs = {ref: resolve_model_dir(ref, allow_pickle) for ref in refs}
    if is_adapter_dir(dirs[base_ref]):
        raise MergeError(f"{base_ref}: a LoRA adapter cannot be the base; name the model it adapts as base_model")
    sources = {ref: ModelSource(d, allow_pickle) for ref, d in dirs.items() if not is_adapter_dir(d)}
    base = sources[base_ref]
    _refuse_custom_code(sources, dirs, trust_remote_code)
    infos = _check_compatible(base_ref, base, {r: s for r, s in sources.items() if r != base_ref})
    factors = _lora_experts(base_ref, dirs, infos)
    plan = RecipePlan(recipe, num_layers_of(base.config))
    out_dtype = DTYPE_NAMES.get(recipe.out_dtype or recipe.dtype or "")
    if (recipe.out_dtype or recipe.dtype) and out_dtype is None:
        raise MergeError(f"dtype '{recipe.out_dtype or recipe.dtype}' is not one of {', '.join(DTYPE_NAMES)}")
    out_infos = [
        TensorInfo(i.name, i.shape, out_dtype if out_dtype and i.dtype.is_floating_point else i.dtype) for i in infos
    ]
    for info in infos:  # every parameter resolves and is in range before any compute
        if info.dtype.is_floating_point:
            plan.resolve(info.name)
    tok_ref = recipe.tokenizer_source if recipe.tokenizer_source not in (None, "base") else base_ref
    if tok_ref not in dirs:
        dirs[tok_ref] = resolve_model_dir(tok_ref, allow_pickle)
    return _MergeInputs(recipe, dirs, sources, base_ref, tok_ref, infos, out_infos, plan, out_dtype, factors)


def _lora_experts(base_ref: str, dirs: dict[str, Path], infos: list[TensorInfo]) -> dict:
    """The LoRA adapters among the models, checked against the base and their factors loaded."""
    specs = {i.name: (i.shape, str(i.dtype)) for i in infos}
    shapes = {i.name: i.shape for i in infos if i.dtype.is_floating_point}
    out = {}
    for ref, folder in dirs.items():
        if ref != base_ref and is_adapter_dir(folder):
            with as_merge_error():
                out[ref] = load_factors(check_adapter(folder, specs, base_ref, dirs[base_ref]), shapes)
    return out


def _input(m: _MergeInputs, ref: str, name: str, base_f: torch.Tensor, device: str):
    """Input ``ref``'s tensor ``name`` for ``compute_tensor``: the base's, a full model's (float32 on
    ``device``), or a LoRA expert's ``LowRankDelta`` (float32 factors there)."""
    if ref == m.base_ref:
        return base_f
    if ref in m.factors:
        return lowrank_kept(m.factors[ref].get(name), base_f.shape, torch.float32, base_f.device).to(base_f.device)
    return m.sources[ref].tensor(name).to(device=device, dtype=torch.float32)


def _write_merged(m: _MergeInputs, writer: ShardedWriter, device: str, progress: bool) -> None:
    """Merge tensor by tensor (each input read once, in float32 on ``device``) into ``writer``."""
    for info, out_info in zip(iter_with_progress(m.infos, "merging", progress), m.out_infos):
        base_t = m.base.tensor(info.name)
        if not info.dtype.is_floating_point:
            writer.write(info.name, base_t)
            continue
        base_f = base_t.to(device=device, dtype=torch.float32)
        tensors = [_input(m, r, info.name, base_f, device) for r in m.plan.inputs]
        merged = compute_tensor(m.plan, info.name, base_f, inputs=tensors)
        if not all_finite(merged):
            raise MergeError(f"merged tensor '{info.name}' contains NaN or inf; nothing was written")
        writer.write(info.name, merged.to(out_info.dtype).cpu())
        del base_f, tensors, merged


def merge_to_disk(
    recipe: Recipe,
    out: str | Path,
    *,
    allow_pickle: bool = False,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    device: str = "cpu",
    scores: dict[str, float] | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge ``recipe`` into a Hugging Face model directory at ``out``; returns its path. Models whose
    files ask for custom code are refused unless ``trust_remote_code`` (the merged model would carry
    their ``auto_map`` and be taken for the plain architecture)."""
    if recipe.is_path:  # a layer path: stacked, not merged
        from evomerge.merge.path import write_path

        return write_path(recipe, out, allow_pickle=allow_pickle, overwrite=overwrite, progress=progress, scores=scores)
    m = _check_merge(recipe, allow_pickle, trust_remote_code)
    staged = StagedDirectory(out, overwrite=overwrite)
    try:
        metadata = {"evomerge_version": __version__, "merge_method": recipe.merge_method}
        writer = ShardedWriter(staged.path, m.out_infos, shard_bytes, metadata=metadata)
        started = time.perf_counter()
        _write_merged(m, writer, device, progress)
        writer.close()
        config = dict(m.base.config)
        if m.out_dtype is not None:
            name = next(k for k, v in DTYPE_NAMES.items() if v == m.out_dtype)
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = name
        write_model_files(staged.path, config, m.dirs[m.base_ref], m.dirs[m.tok_ref], recipe, scores, m.dirs, started)
        return staged.commit()
    except BaseException:
        staged.discard()
        raise
