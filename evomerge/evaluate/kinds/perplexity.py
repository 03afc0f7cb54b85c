"""Perplexity: an objective is the per-token perplexity of the model on a local text file.

Each objective's text is tokenized once per worker (``evomerge.evaluate.perplexity``); a candidate
costs only the forward passes. Its units are a subset drawn once from the evaluator's ``limit``,
which a multi-fidelity rung cannot shrink.
"""

from __future__ import annotations

from typing import Literal

from evomerge.evaluate.kinds import ObjectiveKind, Scored, register
from evomerge.objectives import Objective


class PerplexityObjective(Objective):
    #: Perplexity (per token) of the model on this local text file, instead of a task.
    perplexity: str
    #: Lower is better.
    direction: Literal["maximize", "minimize"] = "minimize"
    #: Perplexity units: ``block`` (running text cut into block_size tokens) or ``line`` (each line
    #: its own sequence, for models trained on short lines like the zoo's).
    unit: Literal["block", "line"] = "block"


@register
class PerplexityKind(ObjectiveKind):
    name = "perplexity"
    Config = PerplexityObjective
    noun = nouns = "perplexity"
    #: ``unit`` on a task objective is ignored, as evaluator files have always been read
    exclusive = ()

    @classmethod
    def files(cls, objective, evaluator, split):
        return [("perplexity", evaluator.resolve(objective.perplexity, split))]

    def __init__(self, objectives, evaluator, split, model, tokenizer):
        from evomerge.evaluate.perplexity import PerplexityScorer

        super().__init__(objectives, evaluator, split, model, tokenizer)
        max_length = getattr(model.config, "max_position_embeddings", None)
        self.scorers = {
            o.name: PerplexityScorer(
                evaluator.resolve(o.perplexity, split),
                tokenizer,
                block_size=evaluator.block_size,
                limit=evaluator.limit_for(split),
                seed=evaluator.seed,
                batch_size=evaluator.batch_size,
                max_length=max_length,
                unit=o.unit,
            )
            for o in self.objectives
        }

    def score(self, model, timings, documents=None, log_samples=False):
        return Scored({name: scorer.score(model) for name, scorer in self.scorers.items()})
