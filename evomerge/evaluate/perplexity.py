"""Perplexity of a model on a local text file: a cheap objective (did the merge keep the language?).

The text is tokenized once, into units: with ``unit="block"`` non-overlapping blocks of
``block_size`` tokens of the running text (a partial last block is dropped unless it is the only
one), for models trained on long documents; with ``unit="line"`` each line is its own sequence (for
models trained on one line per sequence, like the zoo's). ``limit`` units are kept, a subset drawn
once from ``seed``. Every call then costs only forward passes over the same units: perplexity is
exp(mean next-token negative log-likelihood) over all predicted tokens (padding excluded).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Literal

import torch


class PerplexityScorer:
    def __init__(
        self,
        path: str | Path,
        tokenizer,
        block_size: int = 64,
        limit: int | float | None = None,
        seed: int = 0,
        batch_size: int = 64,
        max_length: int | None = None,
        unit: Literal["block", "line"] = "block",
    ):
        path = Path(path)
        size = min(block_size, max_length or block_size)
        lines = [
            tokenizer(line, add_special_tokens=False)["input_ids"]
            for line in path.read_text().splitlines(keepends=True)
            if line.strip()
        ]
        if unit == "line":  # a line longer than the model's context is cut to it
            units = [ids[:max_length] for ids in lines if len(ids) >= 2]
        elif unit == "block":
            ids = [t for line in lines for t in line]
            units = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)] or [ids[:size]]
        else:
            raise ValueError(f"unknown perplexity unit {unit!r}; expected 'block' or 'line'")
        if not units or len(units[0]) < 2:
            raise ValueError(f"{path}: too little text for perplexity")
        if limit is not None and limit < 1:  # a fraction of the units, rounded up
            limit = max(1, math.ceil(len(units) * limit))
        if limit is not None and limit < len(units):
            keep = sorted(random.Random(f"{seed}:{path.name}").sample(range(len(units)), limit))
            units = [units[i] for i in keep]
        width = max(len(u) for u in units)
        self.ids = torch.zeros(len(units), width, dtype=torch.long)
        self.mask = torch.zeros(len(units), width, dtype=torch.bool)
        for row, u in enumerate(units):
            self.ids[row, : len(u)] = torch.tensor(u)
            self.mask[row, : len(u)] = True
        self.batch_size = batch_size
        self.tokens = int(self.mask[:, 1:].sum())

    @torch.no_grad()
    def score(self, model) -> float:
        """Per-token perplexity; NaN if the model's logits are not finite."""
        device = next(model.parameters()).device
        total = 0.0
        for start in range(0, len(self.ids), self.batch_size):
            batch = self.ids[start : start + self.batch_size].to(device)
            mask = self.mask[start : start + self.batch_size].to(device)
            logits = model(input_ids=batch, attention_mask=mask.long()).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            )
            total += float(nll[mask[:, 1:].reshape(-1)].sum())
        mean = total / self.tokens
        return math.exp(mean) if math.isfinite(mean) and mean < 700 else float("nan" if mean != mean else "inf")
