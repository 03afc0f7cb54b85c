"""Layer paths (the data-flow space): a model whose layers are other models' layers, in any order.

A path is a list of ``(model, layer, scale)``: the hidden state enters the embedding of the path's
first model, is multiplied by ``scale`` as it enters each listed decoder layer, and leaves through
the final norm and head of the path's last model (mergekit's rule for ``passthrough`` slices; with
tied embeddings the head is the first model's embedding, as a saved model ties it). Its recipe form
is mergekit's ``passthrough``: one slice per run of consecutive layers of one model, the input
scales under ``evomerge.scales``.

In memory (``ResidentPath``) a candidate is a shell of the first model's class whose layer list
holds references to the resident layers of the source models: no weight is copied, whatever the
path. Each slot is a shallow copy of its layer with its own ``layer_idx``, so a layer that appears
twice writes two KV-cache entries, and carries its input scale as a forward pre-hook.

On disk (``write_path``) the same path becomes a standard checkpoint of the same architecture:
``num_hidden_layers`` = path length, repeated layers written out, and the scales folded into the
weights. Scaling the residual stream by ``s`` as it enters layer k is the same as dividing every
later write into it by ``s``: with ``P_k`` the product of the first k+1 scales, layer k's ``o_proj``
and ``down_proj`` (weights and biases) are multiplied by ``1 / P_k``; since RMSNorm ignores the
stream's scale (up to its eps), every layer and the head see the same normalized inputs, and the
logits agree up to that eps and the rounding of the folded weights (tests/test_path.py states the
tolerance). ``fold_scales`` writes that as mergekit ``scale`` parameters, so ``mergekit-yaml``
reproduces an export even when its scales are not 1.

Supported: the decoder-only families whose causal LM is ``model.embed_tokens``, ``model.layers``,
``model.norm``, ``lm_head`` with RMSNorm (Llama, Mistral, Qwen2, Qwen3); tested on Llama and Qwen2.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from evomerge.merge.checkpoint import DEFAULT_SHARD_BYTES, write_model_files
from evomerge.merge.registry import MergeError
from evomerge.models.layout import LAYER_COUNT_KEYS, num_layers
from evomerge.models.source import ModelLoadError
from evomerge.recipe import PASSTHROUGH, FilterValue, Recipe, fold_scales

#: model_type values whose module layout and RMSNorm the path model and its export rely on.
PATH_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: Config keys every model of a path must share (a hidden state passes through layers of each).
SHARED_KEYS = (
    "hidden_size",
    "model_type",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "max_position_embeddings",
)
#: Config keys that hold one entry per layer; rebuilt for the path from each layer's source.
PER_LAYER_KEYS = ("layer_types",)
#: The tensors through which a layer writes into the residual stream (folded scales go there).
WRITES = ("self_attn.o_proj.", "mlp.down_proj.")
LAYERS = "model.layers."


class PathError(ValueError):
    """Models or a path that cannot make a layer-path model; one line naming what is wrong."""


def check_path_configs(configs: dict[str, dict]) -> None:
    """Every model can share one hidden state with the first: one family and the same shapes.

    ``configs``: model name -> config.json mapping. Raises ``PathError`` naming the model and key."""
    names = list(configs)
    first = configs[names[0]]
    for name, config in configs.items():
        kind = config.get("model_type")
        if kind not in PATH_FAMILIES:
            raise PathError(
                f"{name}: model_type '{kind}' is not supported in a layer path (supported: {', '.join(PATH_FAMILIES)})"
            )
        for key in SHARED_KEYS:
            if config.get(key) != first.get(key):
                why = " (a layer path passes one hidden state through layers of every model)"
                raise PathError(
                    f"{name}: {key} is {config.get(key)!r}, '{names[0]}' has {first.get(key)!r}"
                    + (why if key == "hidden_size" else "")
                )
        n = num_layers(config) if any(k in config for k in LAYER_COUNT_KEYS) else 0
        for key, value in config.items():
            if isinstance(value, list) and len(value) == n and n > 1 and key not in PER_LAYER_KEYS:
                raise PathError(f"{name}: config key '{key}' holds one value per layer, which a path cannot rebuild")


def path_config(configs: dict[str, dict], path: list[tuple[str, int, float]]) -> dict:
    """The config.json of a path model: the first model's, with the path's layer count and per-layer keys."""
    config = copy.deepcopy(configs[path[0][0]])
    config["num_hidden_layers"] = len(path)
    for key in PER_LAYER_KEYS:
        if key in config:
            config[key] = [configs[m][key][i] for m, i, _ in path]
    if "max_window_layers" in config:  # Qwen2: sliding layers are named by layer_types above
        config["max_window_layers"] = len(path)
    return config


def check_path(recipe: Recipe, layer_counts: dict[str, int]) -> list[tuple[str, int, float]]:
    """The recipe's path, every layer within its model; ``layer_counts``: model -> its layers."""
    if not recipe.is_path:
        raise PathError(f"merge method '{recipe.merge_method}' is not a layer path ({PASSTHROUGH})")
    path = recipe.path()
    for i, sl in enumerate(recipe.slices):
        src = sl.sources[0]
        if src.model not in layer_counts:
            raise PathError(f"slices[{i}]: model '{src.model}' is not one of {', '.join(layer_counts)}")
        if src.layer_range[1] > layer_counts[src.model]:
            raise PathError(
                f"slices[{i}]: layer_range {list(src.layer_range)} leaves '{src.model}' "
                f"({layer_counts[src.model]} layers)"
            )
    return path


def _tensor_scale(setting, name: str) -> float:
    if setting is None:
        return 1.0
    if isinstance(setting, (int, float)):
        return float(setting)
    for entry in setting:
        assert isinstance(entry, FilterValue)
        if entry.filter in (None, "*") or entry.filter in name:
            return float(entry.value)
    return 1.0


# --- in memory ---------------------------------------------------------------------------------


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing ``module``'s parameters, buffers and submodules, with its own
    containers (replacing a submodule or registering a hook on it leaves ``module`` untouched)."""
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    return clone


def _input_scale(scale: float):
    def hook(_module, args, kwargs):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale
        return args, kwargs

    return hook


@dataclass
class Assembled:
    """What ``ResidentPath.materialize`` did: seconds, and (always empty) non-finite tensors."""

    seconds: float
    layers: int
    nonfinite: list[str] = field(default_factory=list)


class ResidentPath:
    """The source models, resident once, and one shell model rebuilt per path by reference.

    ``models``: name -> a loaded causal LM (eval mode, one device and dtype, configs accepted by
    ``check_path_configs``). ``model`` is the shell: the same object for every candidate, so an
    evaluation wrapper built around it once sees each new path."""

    shared_tensors = 0  # the interface of ResidentMerge: nothing here comes from a shared store

    def __init__(self, models: dict[str, torch.nn.Module]):
        check_path_configs({n: m.config.to_dict() for n, m in models.items()})
        self.models = models
        first = next(iter(models.values()))
        self.model = _shallow(first)
        self.model.model = _shallow(first.model)
        self.model.config = copy.deepcopy(first.config)
        self.model.model.config = self.model.config
        self.layer_counts = {n: len(m.model.layers) for n, m in models.items()}
        self.current: list[tuple[str, int, float]] | None = None

    def materialize(self, recipe: Recipe) -> Assembled:
        """Point the shell at ``recipe``'s path (see the module docstring); copies no weights."""
        started = time.perf_counter()
        if recipe.is_path and any(sl.sources[0].parameters for sl in recipe.slices):
            raise MergeError("per-tensor 'scale' parameters change weights; in memory give evomerge.scales instead")
        try:
            path = check_path(recipe, self.layer_counts)
        except PathError as e:
            raise MergeError(str(e)) from None
        slots = []
        for k, (name, i, scale) in enumerate(path):
            source = self.models[name].model.layers[i]
            slot = _shallow(source)
            slot.self_attn = _shallow(source.self_attn)
            slot.self_attn.layer_idx = k  # its own KV-cache entry, also when the layer repeats
            if hasattr(slot, "layer_idx"):
                slot.layer_idx = k
            if scale != 1.0:
                slot.register_forward_pre_hook(_input_scale(scale), with_kwargs=True)
            slots.append(slot)
        shell, config = self.model, self.model.config
        shell.model.layers = torch.nn.ModuleList(slots)
        config.num_hidden_layers = len(path)
        for key in PER_LAYER_KEYS:
            if getattr(config, key, None) is not None:
                setattr(config, key, [getattr(self.models[m].config, key)[i] for m, i, _ in path])
        first, last = self.models[path[0][0]], self.models[path[-1][0]]
        shell.model.embed_tokens = first.model.embed_tokens
        shell.model.norm = last.model.norm
        shell.lm_head = first.lm_head if config.tie_word_embeddings else last.lm_head
        self.current = path
        return Assembled(time.perf_counter() - started, len(path))


# --- on disk -----------------------------------------------------------------------------------


def _tensor_plan(folded: Recipe, path, sources: dict, tied: bool) -> list[tuple[str, str, str, object]]:
    """(output name, model, its tensor name, scale setting) of every tensor of the path's model: the
    first model's embedding, each slot's layer renumbered, the last model's norm and head."""
    params = [sl.sources[0].parameters or {} for sl in folded.slices for _ in range(*sl.sources[0].layer_range)]
    first, last = path[0][0], path[-1][0]
    plan: list[tuple[str, str, str, object]] = []
    for name in sources[first].names():
        if not name.startswith(LAYERS) and "embed_tokens" in name:
            plan.append((name, first, name, params[0].get("scale")))
    for k, (model, i, _) in enumerate(path):
        prefix = f"{LAYERS}{i}."
        for name in sources[model].names():
            if name.startswith(prefix):
                plan.append((f"{LAYERS}{k}.{name[len(prefix) :]}", model, name, params[k].get("scale")))
    for name in sources[last].names():
        if not name.startswith(LAYERS) and "embed_tokens" not in name and not (tied and name.startswith("lm_head")):
            plan.append((name, last, name, params[-1].get("scale")))
    return plan


def write_path(
    recipe: Recipe,
    out,
    *,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    scores: dict[str, float] | None = None,
):
    """Write ``recipe``'s path as a standard model directory at ``out`` (scales folded, see
    ``fold_scales``), streaming one tensor at a time; returns its path. Nothing is written at
    ``out`` unless the whole model is."""
    from evomerge import __version__
    from evomerge.merge.io import (
        ModelSource,
        ShardedWriter,
        StagedDirectory,
        TensorInfo,
        iter_with_progress,
        resolve_model_dir,
    )

    folded = fold_scales(recipe)
    dirs = {ref: resolve_model_dir(ref, allow_pickle) for ref in folded.model_names()}
    sources = {ref: ModelSource(d, allow_pickle) for ref, d in dirs.items()}
    configs = {ref: s.config for ref, s in sources.items()}
    try:
        check_path_configs(configs)
        path = check_path(folded, {r: num_layers(c) for r, c in configs.items()})
    except (PathError, ModelLoadError) as e:
        raise MergeError(str(e)) from None
    first = path[0][0]
    plan = _tensor_plan(folded, path, sources, tied=bool(configs[first].get("tie_word_embeddings")))
    held = [sources[model].info(name) for _, model, name, _ in plan]
    infos = [TensorInfo(out_name, info.shape, info.dtype) for (out_name, *_), info in zip(plan, held)]
    staged = StagedDirectory(out, overwrite=overwrite)
    try:
        started = time.perf_counter()
        metadata = {"evomerge_version": __version__, "merge_method": PASSTHROUGH}
        writer = ShardedWriter(staged.path, infos, DEFAULT_SHARD_BYTES, metadata=metadata)
        for (out_name, model, name, setting), info in zip(iter_with_progress(plan, "writing", progress), infos):
            tensor = sources[model].tensor(name)
            factor = _tensor_scale(setting, name)
            if factor != 1.0 and tensor.dtype.is_floating_point:
                tensor = (tensor.to(torch.float32) * factor).to(info.dtype)
            writer.write(out_name, tensor)
        writer.close()
        layer_path = [[m, i, s] for m, i, s in recipe.path()]
        config = path_config(configs, path)
        write_model_files(
            staged.path, config, dirs[first], dirs[first], folded, scores, dirs, started, layer_path=layer_path
        )
        return staged.commit()
    except BaseException:
        staged.discard()
        raise
