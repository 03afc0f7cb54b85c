"""A model's layout: how many transformer layers its config declares, and which layer a tensor is in."""

from __future__ import annotations

import re

from evomerge.models.source import ModelLoadError

#: config.json keys that hold the layer count, in the order they are looked up (Llama-style, GPT-2, others).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
_PRE = ("embed", "wte", "wpe", "word_embeddings")


def num_layers(config: dict) -> int:
    """The layer count a model's config (config.json as a dict) declares under the first of
    ``LAYER_COUNT_KEYS`` it has; ModelLoadError when it has none."""
    for key in LAYER_COUNT_KEYS:
        if key in config:
            return int(config[key])
    raise ModelLoadError("config.json names no layer count (num_hidden_layers)")


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def is_pre_layer(tensor_name: str) -> bool:
    """True for a tensor before the layers (embeddings); a tensor of no layer that is not is after them."""
    return any(key in tensor_name for key in _PRE)
