"""Multi-fidelity evaluation: asynchronous successive halving, with a stopping rule at each rung.

A candidate is first scored on a few documents per task (rung 0); a result that ranks well among
the results at its rung so far goes on to the next, larger rung, up to the full evaluation; one that
does not is told to the optimizer as the candidate's final result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.search.pareto import pareto_ranks


@dataclass(frozen=True)
class Fidelity:
    """Multi-fidelity evaluation (asynchronous successive halving, stopping rule at each rung).

    ``rungs``: documents per task scored at each rung before the full evaluation (ascending, each
    below the evaluator's ``limit``); rung ``top`` = ``len(rungs)`` is the full evaluation.
    ``promote``: a result at a rung goes on to the next one when it ranks within this fraction of the
    results at that rung so far (non-domination rank, ties broken by mean rank per objective);
    otherwise the optimizer is told that result as the candidate's final one."""

    rungs: tuple[int, ...]
    promote: float

    @property
    def top(self) -> int:
        return len(self.rungs)

    def promotes(self, earlier: Sequence[Sequence[float]], values: list[float], directions: Sequence[str]) -> bool:
        """Whether ``values`` rank within the promoted fraction of a rung's results: ``earlier`` (the
        results at that rung so far, one value per objective each) with ``values`` itself."""
        table = [*earlier, values]
        ranks = pareto_ranks(table, directions)
        per_objective = []
        for j, d in enumerate(directions):  # 0 = best, per objective
            order = sorted(range(len(table)), key=lambda i: table[i][j], reverse=d == "maximize")
            position = [0] * len(table)
            for p, i in enumerate(order):
                position[i] = p
            per_objective.append(position)
        key = [(ranks[i], sum(p[i] for p in per_objective)) for i in range(len(table))]
        me = key[-1]
        better = sum(k < me for k in key[:-1])
        return better < max(1, math.ceil(self.promote * len(table)))
