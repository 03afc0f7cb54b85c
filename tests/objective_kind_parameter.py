"""A toy objective kind, in a module of its own as a new kind would be: the mean absolute value of
one named parameter of the candidate (hand-computable from the models' files)."""

from __future__ import annotations

from typing import Literal

from evomerge.evaluate.kinds import ObjectiveKind, Scored
from evomerge.objectives import Objective


class ParameterObjective(Objective):
    #: The parameter's name in the model, as in its safetensors file.
    parameter_mean: str
    direction: Literal["maximize", "minimize"] = "minimize"


class ParameterMeanKind(ObjectiveKind):
    name = "parameter_mean"
    Config = ParameterObjective
    noun, nouns = "parameter mean", "parameter means"

    def __init__(self, objectives, evaluator, split, model, tokenizer):
        super().__init__(objectives, evaluator, split, model, tokenizer)
        missing = [o.parameter_mean for o in self.objectives if o.parameter_mean not in dict(model.named_parameters())]
        if missing:
            raise KeyError(f"the model has no parameter {missing[0]}")

    def score(self, model, timings, documents=None, log_samples=False):
        params = dict(model.named_parameters())  # the resident weights, rewritten per candidate
        return Scored({o.name: float(params[o.parameter_mean].detach().abs().double().mean()) for o in self.objectives})
