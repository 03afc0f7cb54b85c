"""Racing on anchor documents: a candidate is scored on a few anchor documents per task first, and
in full only when the estimate cannot tell that it does not matter (by the rule below).

The anchors come from :class:`evomerge.search.anchors.AnchorEstimator` (the cluster design) fitted
on the per-document scores of the candidates scored in full so far. The rule, stated once:

* each objective's estimate per task is, with ``estimate: neighbours`` (the default), the
  model-assisted estimate of :func:`evomerge.search.anchors.neighbour_estimate`: the candidates
  scored in full that agree most with it on the anchors predict its score on every document, and
  the anchors correct that prediction by their strata-weighted residual; with ``estimate: strata``
  the anchors' weighted mean (each anchor weighs its stratum's share of the task's pool); tasks of
  one objective weighed by their pool sizes;
* its interval is ``estimate +- z * rmse``, ``rmse`` the estimate's root mean squared error on the
  check sample so far (raced candidates also scored in full, drawn at random); until that sample
  holds ``CHECK_FIRST`` candidates, ``z * se`` instead, ``se = sqrt(sum w^2 p (1 - p))`` the standard
  error of a weighted mean of independent scores in [0, 1] with mean p (a bound far wider than the
  measured error, since the anchors' strata answer alike: a safe start, not the rule);
* the candidate is stopped (its estimate told as its final result, never on the front) when a
  candidate scored in full dominates the interval's optimistic corner (``rule: dominance``); when its
  mean over the objectives, plus its interval, stays behind the best mean in full (``rule: mean``); or
  when that optimistic corner would add less than ``gain`` of the hypervolume of the results in full
  (``rule: hypervolume``). Otherwise, and whenever the check draw picks it, it is scored again in full.

Anchors are chosen once, at the first fit; later refits keep them (candidates raced on other anchors
would not be comparable) and re-learn their weights: each document of the pool goes to the anchor
whose response vector across the candidates scored in full is nearest its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evomerge.search.anchors import AnchorEstimator, neighbour_estimate
from evomerge.search.pareto import _as_min, dominates, hypervolume

#: ``rule: hypervolume``'s least share of the front's hypervolume, where the experiment gives none.
GAIN = 0.05

#: The values ``Racing.header`` leaves out (journals written before those settings existed raced so).
UNWRITTEN = {"rule": "dominance", "estimate": "strata"}

#: Raced candidates scored in full whatever their estimate, before the random check share applies:
#: the interval's measured error needs a few points from the start.
CHECK_FIRST = 3


@dataclass(frozen=True)
class Racing:
    """``anchors``: per task, a fraction (< 1) of its search pool or a count; ``check``: the share
    of raced candidates also scored in full; ``z``: the interval's half-width in errors;
    ``min_full``: candidates scored in full before the first fit; ``refit``: refit the weights
    after this many more full results; ``seed``: the check draw's seed; ``rule``: when a candidate
    stops on its anchors (``dominance``: a full result dominates its interval's optimistic corner;
    ``mean``: its mean over the objectives, plus its interval, stays behind the best mean in full;
    ``hypervolume``: its optimistic corner would add less than ``gain`` of the front's hypervolume);
    ``estimate``: ``neighbours`` (the candidates scored in full nearest on the anchors predict the
    rest of the pool) or ``strata`` (the anchors' weighted mean); ``gain``: the hypervolume rule's
    least share."""

    anchors: float
    check: float
    z: float
    min_full: int
    refit: int
    seed: int
    rule: str = "dominance"
    estimate: str = "neighbours"
    gain: float = GAIN

    def header(self) -> dict:
        """What the journal's header records (a search resumed with other settings is refused)."""
        out = {k: getattr(self, k) for k in ("anchors", "check", "z", "min_full", "refit")}
        for key, unwritten in UNWRITTEN.items():  # journals written before these settings stay readable
            if getattr(self, key) != unwritten:
                out[key] = getattr(self, key)
        if self.rule == "hypervolume":
            out["gain"] = self.gain
        return out

    @staticmethod
    def raced_with(header: dict | None, key: str) -> str | None:
        """The ``rule`` or ``estimate`` a journal's header says its search raced with (``header``: its
        first event; None: not raced). A racing header without one was written when that setting's
        value was the one ``header()`` leaves out (:data:`UNWRITTEN`)."""
        racing = header.get("racing") if header else None
        return racing.get(key, UNWRITTEN[key]) if isinstance(racing, dict) else None

    def count(self, pool: int) -> int:
        """Anchors for a task of ``pool`` documents (at most the pool)."""
        k = math.ceil(self.anchors * pool) if self.anchors < 1 else int(self.anchors)
        return max(1, min(k, pool))

    def checked(self, trial_id: int, raced_before: int) -> bool:
        """Whether raced trial ``trial_id`` (``raced_before`` raced trials asked before it) is scored
        in full whatever its estimate: the first ``CHECK_FIRST``, then a seeded draw per trial."""
        return raced_before < CHECK_FIRST or random.Random(f"{self.seed}:check:{trial_id}").random() < self.check


def fit_anchors(matrix: np.ndarray, ids: Sequence[int], k: int, seed: int) -> tuple[list[int], list[float]]:
    """(anchor ids, weights) of one task: the cluster design on ``matrix`` (candidates x documents)."""
    est = AnchorEstimator(k, "cluster", seed).fit(matrix, ids)
    return [int(a) for a in est.anchors], [float(w) for w in est.weights]


def refit_weights(matrix: np.ndarray, ids: Sequence[int], anchors: Sequence[int]) -> list[float]:
    """Weights of fixed ``anchors``: the share of the pool whose column of ``matrix`` is nearest
    each anchor's (ties to the first anchor; an anchor is nearest to itself)."""
    position = {d: i for i, d in enumerate(ids)}
    columns = matrix.T.astype(float)
    centres = columns[[position[a] for a in anchors]]
    nearest = ((columns[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(anchors))
    return [float(c) / len(ids) for c in counts]


def estimate(
    fitted: Mapping[str, Mapping[str, tuple[list[int], list[float]]]],
    pools: Mapping[str, int],
    scored: Mapping[str, Mapping[str, tuple[list[int], list[float]]]],
    objective: str,
    references: Mapping[str, tuple[Sequence[int], np.ndarray]] | None = None,
) -> tuple[float, float]:
    """(estimate, standard error) of ``objective`` from a candidate's anchor scores ``scored``
    (objective -> task -> (ids, scores)); ``fitted``: objective -> task -> (anchor ids, weights);
    ``pools``: task -> its pool size; ``references``: task -> (its pool's ids, the per-document
    scores of the candidates scored in full, candidates x those ids), for the neighbours estimate
    (without them, or for a task they lack, the strata's weighted mean). The standard error is the
    strata's bound either way (wider than the neighbours estimate's error: the start of the rule)."""
    total = sum(pools[t] for t in fitted[objective])
    value, variance = 0.0, 0.0
    for task, (anchors, weights) in fitted[objective].items():
        ids, scores = scored[objective][task]
        by_id = dict(zip(ids, scores))
        y = np.array([by_id[a] for a in anchors], dtype=float)
        w = np.asarray(weights, dtype=float)
        share = pools[task] / total
        if references and task in references:
            pool, rows = references[task]
            position = {d: i for i, d in enumerate(pool)}
            mean = neighbour_estimate(rows, [position[a] for a in anchors], w, y)
        else:
            mean = float(w @ y)
        p = min(max(mean, 0.0), 1.0)
        value += share * mean
        variance += share**2 * float((w**2).sum()) * p * (1 - p)
    return value, math.sqrt(variance)


def pooled_mean(tasks: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> float:
    """The mean score over every document of an objective's tasks (task -> (ids, scores))."""
    total = sum(len(scores) for _, scores in tasks.values())
    return sum(sum(scores) for _, scores in tasks.values()) / total if total else float("nan")


def optimistic(values: Sequence[float], widths: Sequence[float], directions: Sequence[str]) -> list[float]:
    """The interval's corner that is best on every objective."""
    return [v + w if d == "maximize" else v - w for v, w, d in zip(values, widths, directions)]


def stopped(
    values: Sequence[float], widths: Sequence[float], full: Sequence[Sequence[float]], directions: Sequence[str]
) -> bool:
    """Whether a candidate estimated at ``values`` +- ``widths`` is clearly dominated: some result
    scored in full (``full``) dominates its optimistic corner."""
    corner, *others = _as_min([optimistic(values, widths, directions), *full], directions)
    return any(dominates(f, corner) for f in others)


def behind(values: Sequence[float], width: float, full: Sequence[Sequence[float]], directions: Sequence[str]) -> bool:
    """Whether a candidate estimated at ``values`` (objectives of one direction) is clearly behind on
    their mean: its mean's optimistic end (``width`` from it) is worse than the best mean in ``full``."""
    sign = 1.0 if directions[0] == "maximize" else -1.0
    mean = lambda v: sign * sum(v) / len(v)  # noqa: E731
    return bool(full) and mean(values) + width < max(mean(f) for f in full)


def gain(
    values: Sequence[float],
    widths: Sequence[float],
    full: Sequence[Sequence[float]],
    directions: Sequence[str],
    reference: Sequence[float],
) -> float:
    """The share of the hypervolume of the results in ``full`` (from ``reference``) that a candidate
    estimated at ``values`` +- ``widths`` would add at its interval's optimistic corner: 0 where the
    corner is dominated or not beyond the reference, infinite where ``full`` has no volume yet."""
    before = hypervolume(full, directions, reference)
    after = hypervolume([*full, optimistic(values, widths, directions)], directions, reference)
    return (after - before) / before if before > 0 else (math.inf if after > 0 else 0.0)


def errors(pairs: Sequence[tuple[float, float]]) -> dict[str, float]:
    """``mae``, ``rmse`` and (from 3 pairs on) ``spearman`` of (estimate, full score) pairs."""
    if not pairs:
        return {}
    est, full = np.array(pairs, dtype=float).T
    out = {"mae": float(np.abs(est - full).mean()), "rmse": float(np.sqrt(((est - full) ** 2).mean()))}
    if len(pairs) >= 3:
        ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (est, full)]
        a, b = (r - r.mean() for r in ranks)
        denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
        out["spearman"] = float((a * b).sum() / denominator) if denominator else 0.0
    return out


class Racer:
    """The controller's side of racing on a :class:`~evomerge.search.study.Search` whose ``racing``
    is set: fits the anchors on the per-document records (``records``: a ``DocumentRecords``) of the
    candidates scored in full, refits their weights, judges each raced result, and measures the
    estimate's error on the check sample. Every decision goes through the search's journal (the
    ``anchors`` event, ``promote`` or ``tell``), so a resumed campaign replays it exactly.
    ``pools``: task -> its search documents; ``first_fit``: full results needed before the first fit
    (at least ``racing.min_full``); ``reference``: the hypervolume's reference point for ``rule:
    hypervolume`` (or a function giving it, None while unknown: then the worst result in full on each
    objective)."""

    def __init__(
        self,
        search,
        records,
        pools: Mapping[str, Sequence[int]],
        first_fit: int = 0,
        reference: Sequence[float] | Callable[[], Sequence[float] | None] | None = None,
    ):
        self.search, self.records, self.racing = search, records, search.racing
        self.reference = reference
        self.pools = {t: list(ids) for t, ids in pools.items()}
        self.first_fit = max(self.racing.min_full, first_fit)
        self.rest: set[int] = set()  # promoted trials sent to score the rest of their pools only
        self.scores: dict[int, dict] = {}  # raced trial -> its anchor scores, until its full result
        self._reuses: bool | None = None
        self._references: tuple[int, dict] = (-1, {})  # (full results read, objective -> task -> rows)
        self._rows: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # whole-pool rows read so far
        self._offset = 0  # of the records file: each line is parsed once

    def _full(self) -> list:
        """The trials scored in full whose records can be fitted (a repeat has no records of its own)."""
        return [t for t in self.search.finished if "repeat_of" not in t.info]

    def fit_due(self) -> bool:
        fitted = self.search.anchors
        n = len(self._full())
        return n >= self.first_fit if fitted is None else n >= fitted["fitted"] + self.racing.refit

    def maybe_fit(self) -> bool:
        """Fit (or refit the weights) when due, on the whole-pool rows of the results in full (read
        from the records' new lines only, as ``references`` reads them); whether it did."""
        if not self.fit_due():
            return False
        self._sync()
        full = self._full()
        ids = sorted(t.id for t in full)
        previous = self.search.anchors
        anchors, weights = {}, {}
        for o in self.search.objectives:
            for task in sorted(t for objective, t in self._rows if objective == o.name):
                rows = self._rows[(o.name, task)]
                found = [rows[i] for i in ids if i in rows]
                if not found:
                    continue
                pool, matrix = self.pools[task], np.stack(found).astype(float)
                if previous is None:
                    a, w = fit_anchors(matrix, pool, self.racing.count(len(pool)), self.racing.seed)
                else:
                    a = previous["anchors"][o.name][task]
                    w = refit_weights(matrix, pool, a)
                anchors.setdefault(o.name, {})[task], weights.setdefault(o.name, {})[task] = a, w
        self.search.set_anchors(anchors, weights, len(full))
        return True

    def _sync(self) -> None:
        """The records' lines written since the last call, parsed once each: every whole-pool row
        kept in ``_rows`` (float32; the last line of a trial wins)."""
        new, self._offset = self.records.read_new(self._offset)
        for (trial, _rung), scored in new.items():
            for objective, tasks in scored.items():
                for task, (ids, values) in tasks.items():
                    if ids == self.pools.get(task):
                        self._rows.setdefault((objective, task), {})[trial] = np.asarray(values, np.float32)

    def references(self) -> dict[str, dict[str, tuple[list[int], np.ndarray]]]:
        """For the neighbours estimate: objective -> task -> (the pool's ids, the per-document
        scores of every candidate scored in full so far, in trial order, float32; kept twice, as rows
        and stacked: 8 bytes a document a candidate); the records' new lines are read when that set
        grew, each line once. A task
        whose full rows the records lack (a records file lost or cut) has none: its estimate falls
        back to the strata's weighted mean."""
        full = self._full()
        if self._references[0] != len(full):
            self._sync()
            ids = sorted(t.id for t in full)
            out: dict[str, dict] = {}
            for objective, tasks in self.search.anchors["anchors"].items():
                for task in tasks:
                    rows = self._rows.get((objective, task), {})
                    found = [rows[i] for i in ids if i in rows]
                    if found:
                        out.setdefault(objective, {})[task] = (self.pools[task], np.stack(found))
            self._references = (len(full), out)
        return self._references[1]

    def _anchor_set(self) -> dict[str, list[int]]:
        """Task -> the documents a raced trial's anchor evaluation scores: the anchors of its
        searched objectives, and of a task no searched objective reads (the workers score every
        objective of the evaluator) the first anchors' count of its pool, so that it costs what a
        searched task's anchors cost."""
        documents = self.search.anchor_documents()
        for task, pool in self.pools.items():
            documents.setdefault(task, pool[: self.racing.count(len(pool))])
        return documents

    def documents_for(self, trial):
        """``search.documents_for(trial)``: a raced trial's anchors (``_anchor_set``); a promoted one,
        where its anchor scores can be re-used (``reuses``), only the rest of each pool."""
        documents = self.search.documents_for(trial)
        if isinstance(documents, dict):
            return self._anchor_set()
        if documents is None and trial.top is not None and trial.rung == trial.top and trial.estimate is not None:
            anchors = self._anchor_set()
            rest = {t: sorted(set(pool) - set(anchors.get(t, ()))) for t, pool in self.pools.items()}
            if all(rest.values()) and self.reuses():
                self.rest.add(trial.id)
                return rest
            self.scores.pop(trial.id, None)  # scored whole again: its anchors' scores are not needed
        return documents

    def reuses(self) -> bool:
        """Whether a promoted trial's anchor scores are re-used in its full evaluation: where every
        result scored in full so far equals, on each objective, the mean of its per-document scores
        over its tasks' pooled documents (a metric averaged over documents, tasks of one objective
        weighed by their sizes); an objective aggregated otherwise is scored in full again. Decided
        once, on the results in full at the first fit."""
        if self._reuses is None:
            records = self.records.read()
            checked = 0
            for t in self._full():
                scored = records.get((t.id, t.rung))
                if scored is None or any(o.name not in scored for o in self.search.objectives):
                    continue
                pooled = [pooled_mean(scored[o.name]) for o in self.search.objectives]
                if any(abs(p - v) > 1e-9 for p, v in zip(pooled, t.values)):
                    self._reuses = False
                    return False
                checked += 1
            self._reuses = checked > 0
        return self._reuses

    def completes(self, trial) -> bool:
        """Whether ``trial``'s evaluation in hand scored the rest of its pools only (``complete``)."""
        return trial.id in self.rest and trial.rung == trial.top

    def complete(self, trial, rest: Mapping) -> tuple[dict[str, float], dict]:
        """A promoted trial's full result from the scores of the rest of its pools and those of its
        anchor evaluation (objective -> task -> (ids, scores)): (objective -> value, the per-document
        scores over the whole pools)."""
        anchors = self.scores.get(trial.id) or self.records.read()[(trial.id, 0)]
        whole: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        for objective, tasks in rest.items():
            for task, (ids, values) in tasks.items():
                a_ids, a_values = anchors.get(objective, {}).get(task, ([], []))
                pairs = sorted(zip([*ids, *a_ids], [*values, *a_values]))
                whole.setdefault(objective, {})[task] = ([d for d, _ in pairs], [v for _, v in pairs])
        self.scores.pop(trial.id, None)
        self.rest.discard(trial.id)
        return {objective: pooled_mean(tasks) for objective, tasks in whole.items()}, whole

    def checked(self, trial) -> bool:
        """Whether raced ``trial`` is in the check sample (scored in full whatever its estimate). The
        raced trials asked before it are counted as asked (a repeat, or one waiting for a twin,
        included), so that the answer never changes once given."""
        before = sum(t.top is not None and t.id < trial.id for t in self.search.trials)
        return self.racing.checked(trial.id, before)

    def errors(self) -> list[dict[str, float]]:
        """Per objective, the estimate's error on the check sample scored in full so far (``errors``)."""
        sample = [t for t in self.search.raced if t.status == "done" and t.full and t.estimate and self.checked(t)]
        return [errors([(t.estimate[j], t.values[j]) for t in sample]) for j in range(len(self.search.objectives))]

    def mean_error(self) -> dict[str, float]:
        """The error of the estimated mean over the objectives on the check sample (``errors``)."""
        sample = [t for t in self.search.raced if t.status == "done" and t.full and t.estimate and self.checked(t)]
        return errors([(sum(t.estimate) / len(t.estimate), sum(t.values) / len(t.values)) for t in sample])

    def metrics(self) -> dict[str, float]:
        """The check sample's size and each objective's MAE, RMSE and Spearman, for MLflow."""
        out = {}
        for o, found in zip(self.search.objectives, self.errors()):
            out.update({f"anchors.{name}.{o.name}": v for name, v in found.items()})
        out["anchors.checked"] = sum(t.status == "done" and t.full and self.checked(t) for t in self.search.raced)
        return out

    def judge(self, trial, per_document) -> tuple[list[float], list[float], bool]:
        """A raced trial's anchor scores (objective -> task -> (ids, scores)) judged: (estimate per
        objective, the interval's half-widths, whether it goes on to the full evaluation)."""
        fitted = self.search.anchors
        pools = {t: len(ids) for t, ids in self.pools.items()}
        found, measured = self.errors(), self.metrics()["anchors.checked"] >= CHECK_FIRST
        references = self.references() if self.racing.estimate == "neighbours" else {}
        values, ses = [], []
        for o in self.search.objectives:
            value, se = estimate(_pairs(fitted, o.name), pools, per_document, o.name, references.get(o.name))
            values.append(value)
            ses.append(se)
        widths = [self.racing.z * (f["rmse"] if measured else se) for f, se in zip(found, ses)]
        full, directions = [t.values for t in self.search.finished], self.search.directions
        if self.racing.rule == "mean":
            error = self.mean_error()["rmse"] if measured else math.sqrt(sum(se * se for se in ses)) / len(ses)
            out = behind(values, self.racing.z * error, full, directions)
        elif self.racing.rule == "hypervolume":
            out = gain(values, widths, full, directions, self._reference(full)) < self.racing.gain
        else:
            out = stopped(values, widths, full, directions)
        promote = self.checked(trial) or not out
        if promote:  # its anchor scores join the rest of its pools' (``complete``)
            self.scores[trial.id] = per_document
        return values, widths, promote

    def _reference(self, full: Sequence[Sequence[float]]) -> list[float]:
        """The hypervolume rule's reference point: ``reference``'s, else the worst of ``full``."""
        given = self.reference() if callable(self.reference) else self.reference
        if given is not None:
            return list(given)
        pick = [min if d == "maximize" else max for d in self.search.directions]
        return [f(v[j] for v in full) for j, f in enumerate(pick)]


def _pairs(fitted: dict, objective: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """The ``anchors`` event's anchors and weights as objective -> task -> (ids, weights)."""
    return {
        objective: {
            task: (ids, fitted["weights"][objective][task]) for task, ids in fitted["anchors"][objective].items()
        }
    }


def settle(search, racer: Racer | None, records, trial, values: Mapping[str, float] | None, per_document, info: dict):
    """One evaluation's result of ``trial`` recorded and told, as the campaign's controller does it:
    a promoted raced trial's rest of its pools joined with its anchors' scores (``Racer.complete``);
    the per-document scores appended to ``records`` before anything is told; an anchor result
    judged (``Search.race``), any other reported (``Search.report``). ``values``: objective name ->
    value (None: failed). Returns what those return: the trial once its result is final, else None."""
    if racer is not None and values is not None and racer.completes(trial):
        values, per_document = racer.complete(trial, per_document)
    if per_document:  # before the result is told: a told trial always has its line
        records.append(trial.id, trial.rung, per_document)
    ordered = [values[o.name] for o in search.objectives] if values is not None else None
    if racer is not None and trial.rung == 0 and ordered is not None:  # scored on its anchors
        estimate_, _, promote = racer.judge(trial, per_document)
        return search.race(trial.id, estimate_, info, promote)
    return search.report(trial.id, ordered, info)
