import random

from transformers import AutoTokenizer

from evomerge.zoo import skills
from evomerge.zoo.tokenizer import SPECIAL_TOKENS, train_tokenizer


def _tokenizer():
    corpus = skills.training_examples(random.Random(0), {"copy": 1, "add": 1, "rev": 1}, 300)
    return train_tokenizer([e.text for e in corpus])


def test_every_character_is_one_token_and_decodes_back():
    tok = _tokenizer()
    assert len(tok) == len(SPECIAL_TOKENS) + len(skills.ALPHABET)
    text = skills.ALPHABET + "add:47+38=85\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no BOS/EOS added
    assert tok.decode(ids) == text


def test_round_trip_through_save_and_load(tmp_path):
    tok = _tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    sample = "rev:abcdef=fedcba\nsort:dcba=abcd\n"
    assert again(sample)["input_ids"] == tok(sample)["input_ids"]
    assert again.decode(again(sample)["input_ids"]) == sample
    assert (again.pad_token, again.eos_token, again.padding_side) == ("<pad>", "</s>", "left")
