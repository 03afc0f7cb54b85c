"""The random-weight Llama the merge and memory benchmarks measure on (seeded, so runs compare)."""

from __future__ import annotations


def random_llama(vocab: int, hidden: int, layers: int, seed: int = 0):
    """A ``LlamaForCausalLM`` in eval mode: 12 heads, MLP width 8/3 x hidden, untied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=hidden * 8 // 3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()
