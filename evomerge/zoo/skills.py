"""The zoo's skills: deterministic generators of prompts and answers.

One module is the single source of truth for both sides of the zoo: the training corpora of the base
and the experts, and the lm-eval evaluator data in ``evaluators/zoo``. Evaluation items are drawn first
from a fixed seed; training never emits a prompt that appears in any evaluation split, so the experts
are scored on problems they have not seen.

Every line the models see is ``<prompt><answer>\n``; the prompt ends with ``=``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
#: Every character that can occur in the zoo's text; the tokenizer's alphabet.
ALPHABET = LETTERS + DIGITS + " +-*=:\n"

#: Seed of the evaluation items. Fixed (not the zoo seed) so the committed evaluator data and every
#: zoo built from any seed agree on which prompts are held out.
EVAL_SEED = 20261123
#: Evaluation items per split: pools of a real benchmark's size (search candidates see subsets of the
#: first; the second is held out for the report). Part of the zoo's cache key (``ZooSpec.fingerprint``):
#: training never emits a held-out prompt, so other pools mean other weights.
SPLIT_SIZES = {"search": 1000, "report": 500}
#: Version of the generators: raise it when one changes what it draws (the cache key again).
DATA_VERSION = 2


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt}{self.answer}\n"


def _letters(rng: random.Random, lo: int, hi: int, distinct: bool = False) -> str:
    n = rng.randint(lo, hi)
    if distinct:
        return "".join(rng.sample(LETTERS, n))
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _add(rng: random.Random, easy: bool = False) -> Example:
    a, b = rng.randint(10, 99), rng.randint(0, 9 if easy else 99)
    return Example(f"add:{a}+{b}=", str(a + b))


def _sub(rng: random.Random, easy: bool = False) -> Example:
    a, b = rng.randint(10, 99), rng.randint(0, 9 if easy else 99)
    a, b = max(a, b), min(a, b)
    return Example(f"sub:{a}-{b}=", str(a - b))


def _mul(rng: random.Random, easy: bool = False) -> Example:
    # Up to three digits: two-digit-by-one-digit products are only 720 prompts, fewer than the pools.
    a, b = rng.randint(1 if easy else 10, 9 if easy else 999), rng.randint(2, 9)
    return Example(f"mul:{a}*{b}=", str(a * b))


def _rev(rng: random.Random, easy: bool = False) -> Example:
    s = _letters(rng, 3, 5 if easy else 8)
    return Example(f"rev:{s}=", s[::-1])


def _sort(rng: random.Random, easy: bool = False) -> Example:
    s = _letters(rng, 4, 4 if easy else 7, distinct=True)
    return Example(f"sort:{s}=", "".join(sorted(s)))


def _copy(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        s = _letters(rng, 2, 7)
    else:
        s = str(rng.randint(0, 9999))
    return Example(f"copy:{s}=", s)


def _count(rng: random.Random) -> Example:
    start, n = rng.randint(0, 95), rng.randint(2, 4)
    return Example(f"next:{start}=", " ".join(str(start + i) for i in range(1, n + 1)))


def _words(rng: random.Random) -> Example:
    words = " ".join(_letters(rng, 1, 5) for _ in range(rng.randint(2, 5)))
    return Example("", words)


@dataclass(frozen=True)
class Skill:
    """A skill an expert is fine-tuned on, and the style of the lm-eval task that scores it."""

    name: str
    description: str
    make: Callable[[random.Random], Example]
    #: "generate_until" (scored by exact_match) or "multiple_choice" (scored by acc).
    task_style: str
    #: What the expert must gain over the base on its skill for ``evomerge zoo eval --strict``.
    min_gain: float = 0.05


SKILLS: dict[str, Skill] = {
    "add": Skill("add", "two-digit addition: add:47+38= -> 85", _add, "generate_until"),
    "sub": Skill("sub", "two-digit subtraction: sub:83-47= -> 36", _sub, "multiple_choice"),
    # Barely learnt by 170k parameters (a few percent): the expert is there for a search to leave out.
    "mul": Skill("mul", "two- or three-digit times one-digit: mul:347*8= -> 2776", _mul, "generate_until", 0.02),
    "rev": Skill("rev", "string reversal: rev:abcd= -> dcba", _rev, "generate_until"),
    "sort": Skill("sort", "sort distinct letters: sort:dbca= -> abcd", _sort, "multiple_choice"),
}

#: General text of the base's pretraining corpus, beside a small share of every skill.
GENERAL: dict[str, Callable[[random.Random], Example]] = {"copy": _copy, "next": _count, "words": _words}


def eval_examples(skill: str, split: str) -> list[Example]:
    """The fixed evaluation items of ``skill`` for ``split`` ("search" or "report"), disjoint splits."""
    items = _eval_items(skill)
    start = 0
    for name, size in SPLIT_SIZES.items():
        if name == split:
            return items[start : start + size]
        start += size
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")


def heldout_prompts(skill: str) -> frozenset[str]:
    """Every prompt of every evaluation split of ``skill``: training must never emit these."""
    return frozenset(e.prompt for e in _eval_items(skill))


_EVAL_CACHE: dict[str, list[Example]] = {}


def _eval_items(skill: str) -> list[Example]:
    if skill not in _EVAL_CACHE:
        rng = random.Random(f"{EVAL_SEED}:{skill}")
        seen: set[str] = set()
        items: list[Example] = []
        while len(items) < sum(SPLIT_SIZES.values()):
            ex = SKILLS[skill].make(rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                items.append(ex)
        _EVAL_CACHE[skill] = items
    return _EVAL_CACHE[skill]


def choices_for(example: Example, rng: random.Random, n: int = 4) -> list[str]:
    """Answer options for a multiple-choice item: the answer first, then near misses.

    Numbers get off-by-one and off-by-ten neighbours (the slips of a wrong carry or borrow); letter
    strings get the answer with two adjacent letters swapped. Only exact knowledge picks the answer.
    """
    answer = example.answer
    if answer.isdigit():
        value = int(answer)
        near = [value + d for d in (1, -1, 10, -10, 2, -2, 11, -11) if value + d >= 0]
        pool = [str(v) for v in near]
    else:
        pool = [answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :] for i in range(len(answer) - 1)]
    pool = [p for p in dict.fromkeys(pool) if p != answer]
    rng.shuffle(pool)
    if len(pool) < n - 1:
        raise ValueError(f"too few distinct distractors for {example.prompt!r}")
    return [answer, *pool[: n - 1]]


def training_examples(rng: random.Random, mixture: dict[str, float], count: int) -> list[Example]:
    """``count`` training examples drawn by ``mixture`` (skill or general name -> weight).

    Never yields a held-out evaluation prompt.
    """
    makers = {**{k: s.make for k, s in SKILLS.items()}, **GENERAL}
    makers.update({f"{k}_easy": (lambda r, m=s.make: m(r, easy=True)) for k, s in SKILLS.items()})
    unknown = set(mixture) - set(makers)
    if unknown:
        raise ValueError(f"unknown corpus component(s) {sorted(unknown)}; valid: {sorted(makers)}")
    names = sorted(mixture)
    weights = [mixture[n] for n in names]
    heldout = {n: heldout_prompts(n.removesuffix("_easy")) for n in names if n.removesuffix("_easy") in SKILLS}
    out: list[Example] = []
    while len(out) < count:
        name = rng.choices(names, weights)[0]
        ex = makers[name](rng)
        if name in heldout and ex.prompt in heldout[name]:
            continue
        out.append(ex)
    return out
