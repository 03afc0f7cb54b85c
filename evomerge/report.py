"""What the search added, on held-out documents: the export against the best hand baseline and the
best expert alone, all scored on the report split, with standard errors.

A model's report score is the mean over the objectives of each objective's mean over its documents.
Its standard error treats the objectives' documents as independent samples: SE = sqrt(sum_j s_j^2 /
n_j) / J, with s_j the standard deviation of objective j's per-document scores over its n_j
documents. Two models scored on the same documents are compared paired: the difference of their
report scores has the standard error of the per-document differences, computed the same way, which
is smaller than the two SEs together whenever the models get the same documents right. ``margin`` is
the difference in those standard errors.
"""

from __future__ import annotations

import math

#: objective -> task -> (document ids, scores), as ``Score.per_document``
PerDocument = dict[str, dict[str, tuple[list[int], list[float]]]]


def _flat(per_document: PerDocument, objective: str) -> dict[tuple[str, int], float]:
    return {(task, i): v for task, (ids, values) in per_document[objective].items() for i, v in zip(ids, values)}


def _mean_se(columns: list[list[float]]) -> tuple[float, float]:
    """Mean over objectives of their means, and its standard error (see the module docstring)."""
    means, variances = [], []
    for values in columns:
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        means.append(mean)
        variances.append(var / n)
    return sum(means) / len(means), math.sqrt(sum(variances)) / len(columns)


def summary(per_document: PerDocument, objectives: list[str]) -> dict[str, float]:
    """``{"mean": ..., "se": ...}`` of one model's report score."""
    mean, se = _mean_se([list(_flat(per_document, o).values()) for o in objectives])
    return {"mean": mean, "se": se}


def paired(first: PerDocument, second: PerDocument, objectives: list[str]) -> dict[str, float]:
    """``first`` minus ``second`` on the documents both were scored on: the difference of their report
    scores, its paired standard error, and the margin in standard errors (None when the SE is 0)."""
    columns = []
    for o in objectives:
        a, b = _flat(first, o), _flat(second, o)
        shared = sorted(set(a) & set(b))
        if not shared:
            raise ValueError(f"objective {o}: the two models were scored on no common document")
        columns.append([a[k] - b[k] for k in shared])
    difference, se = _mean_se(columns)
    return {"difference": difference, "difference_se": se, "margin_se": difference / se if se > 0 else None}


def line(comparison: dict) -> str:
    """The comparison in one line, as export prints it and ``make demo`` ends with."""
    if "error" in comparison:
        return f"report comparison not made: {comparison['error']} (the export is complete; --no-compare skips it)"
    export = comparison["export"]
    parts = [f"export {export['mean']:.4f} ± {export['se']:.4f}"]
    for key, title in (("best_baseline", "best hand baseline"), ("best_expert", "best expert alone")):
        other = comparison.get(key)
        if not other:
            continue
        margin = other["margin_se"]
        by = f"{other['difference']:+.4f}" + (f" = {margin:+.1f} SE" if margin is not None else "")
        parts.append(
            f"{title} ({other['label']}, trial {other['trial']}) {other['mean']:.4f} ± {other['se']:.4f}, export {by}"
        )
    n = len(comparison["objectives"])
    return f"report split, mean over {n} objectives ± standard error: " + "; ".join(parts)
