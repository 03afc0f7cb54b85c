"""A model's layout: which transformer layer a tensor is in."""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
_PRE = ("embed", "wte", "wpe", "word_embeddings")


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), or None."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def is_pre_layer(tensor_name: str) -> bool:
    """True for a tensor before the layers (embeddings); a tensor of no layer that is not is after them."""
    return any(key in tensor_name for key in _PRE)
