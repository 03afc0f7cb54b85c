"""An objective: a named number a candidate is scored on, the way it is better, and its weight.

The one definition the search (optimizers, journal, front) and the evaluators share. An evaluator
file's objective adds how the number is computed (its kind: ``evomerge.evaluate.kinds``); the search
only ever sees these three fields, and the journal's header records them, so a resumed campaign is
checked against exactly them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Objective(BaseModel):
    """A named objective read from an evaluation's scores."""

    model_config = ConfigDict(extra="forbid")
    #: The objective's name in results, MLflow metrics and the front.
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    direction: Literal["maximize", "minimize"] = "maximize"
    #: Its factor in the weighted sum single-objective optimizers minimize (dimensionless).
    weight: float = 1.0
