"""The zoo's tokenizer: trained locally with `tokenizers`, saved in Hugging Face format.

Every character is its own pre-token, so BPE learns the alphabet and no merges: digits and letters
stay single tokens, which is what addition, reversal and sorting need to be learnable by a tiny model.
No special token is added around a text (lm-eval's HFLM then sees the same token streams the zoo was
trained on); ``</s>`` ends generation, ``<pad>`` pads batches.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from evomerge.zoo.skills import ALPHABET

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

#: The zoo's chat template: the turns in the zoo's own plain format, without role markers (its models
#: never saw any): a system or assistant turn is its text and a newline, a user turn its text. One user
#: turn renders as itself, so a zero-shot task scores the same with and without apply_chat_template;
#: few-shot examples as turns (fewshot_as_multiturn) become "question answer" lines.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ m['content'] }}"
    "{%- else -%}{{ m['content'] + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
)


def train_tokenizer(corpus: list[str], chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Train the character-level BPE tokenizer on ``corpus`` and wrap it for transformers (with the
    zoo's chat template unless ``chat_template`` is false)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # "[\s\S]": any single character, the newline included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(ALPHABET),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=sorted(set(ALPHABET)),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=64,
    )
    if chat_template:
        out.chat_template = CHAT_TEMPLATE
    return out
