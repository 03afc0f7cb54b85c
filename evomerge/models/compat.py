"""Whether an expert can be merged with its base, from their configs and tokenizers alone.

Hard differences change what the tensors mean (their shapes, the architecture, the activation, the
vocabulary): the merge is refused. Soft ones change how the merged model runs but not what its
weights are (RoPE base and scaling, norm epsilon, context length, special token ids, an added special
token): the merge goes ahead, with one warning line each, since a merged model takes the base's.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Config keys whose difference makes the weights incompatible, checked first in this order.
HARD_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "layer_types",
)
#: Config keys that say nothing about the weights (bookkeeping, the runtime's own settings).
IGNORED_KEYS = (
    "_name_or_path",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "pretraining_tp",
)


def config_differences(base: dict, other: dict) -> tuple[list[str], list[str]]:
    """(hard, soft) differences of ``other``'s config from the base's, one ``key is X, the base's
    is Y`` phrase each."""
    hard, soft = [], []
    keys = [*HARD_KEYS, *sorted((set(base) | set(other)) - set(HARD_KEYS) - set(IGNORED_KEYS))]
    for key in keys:
        if other.get(key) != base.get(key):
            phrase = f"{key} is {other.get(key)!r}, the base's is {base.get(key)!r}"
            (hard if key in HARD_KEYS else soft).append(phrase)
    return hard, soft


def _tokenizer(folder: Path | None) -> dict | None:
    path = None if folder is None else Path(folder) / "tokenizer.json"
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tokenizer_differences(base_dir: Path | None, other_dir: Path | None) -> tuple[list[str], list[str]]:
    """(hard, soft) differences of the tokenizers (``tokenizer.json``; nothing when either is not
    here to read): a vocabulary mapping tokens to other ids is hard, other added or special tokens soft."""
    base, other = _tokenizer(base_dir), _tokenizer(other_dir)
    if base is None or other is None:
        return [], []
    hard, soft = [], []
    vocab, theirs = (base.get("model") or {}).get("vocab"), (other.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and isinstance(theirs, dict):
        moved = sorted(t for t, i in vocab.items() if theirs.get(t) != i)
        if moved:
            hard.append(f"its tokenizer gives {len(moved)} of the base's tokens other ids (e.g. {moved[0]!r})")
    added = {a.get("content"): a.get("id") for a in base.get("added_tokens", [])}
    their_added = {a.get("content"): a.get("id") for a in other.get("added_tokens", [])}
    differing = sorted(t for t in set(added) | set(their_added) if added.get(t) != their_added.get(t))
    if differing:
        soft.append(f"its tokenizer's added tokens differ from the base's ({', '.join(map(repr, differing[:3]))})")
    return hard, soft
