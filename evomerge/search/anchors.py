"""Anchor documents: estimate a candidate's score on a task's whole pool from its scores on k of them.

The candidates scored in full so far give a matrix of per-document scores (candidates x documents,
0/1 or real, from ``per_document.jsonl``). :class:`AnchorEstimator` chooses k anchor documents from
it and estimates a new candidate's full-pool mean from that candidate's scores on the anchors alone;
refit it as full results arrive (a fit costs milliseconds at the zoo's sizes). Three designs:

``uniform``
    k documents drawn at random (the seed), estimate = their plain mean: unbiased, no model; the
    baseline the others must beat.
``cluster``
    documents grouped by their response vectors across the fitted candidates (k-means on the
    matrix's columns, k clusters): the anchor of a cluster is its member nearest the centre, and the
    estimate is the cluster-size-weighted mean of the candidate's anchor scores (stratified sampling
    with the strata learnt from the candidates; the anchor points of tinyBenchmarks).
``neighbours``
    the cluster anchors and their strata, and a model-assisted (difference) estimate: the
    candidate's per-document scores on the whole pool are predicted by the mean row of the
    ``NEIGHBOURS`` fitted candidates that agree most with it on the anchors, and the estimate is
    that prediction's mean over the pool plus the strata-weighted mean of what the prediction got
    wrong on the anchors (:func:`neighbour_estimate`). A search's candidates are near one another,
    so the nearest ones answer most documents alike and only the residual is left to the anchors:
    on the zoo's 1,000-document pools its error is 8-18% below the cluster design's
    (``benchmarks/anchors.py``).
``irt``
    the cluster anchors, and a one-dimensional item response model (two-parameter logistic: document
    j is passed with probability sigmoid(a_j * ability + b_j)) fitted to the matrix; a new candidate's
    ability is the maximum a posteriori one given its anchor scores, and the estimate is its anchor
    scores plus the model's probabilities for every other document, over the pool size.

Deterministic given the seed. Scores on documents other than the anchors are refused, so that an
estimate is never credited with documents it did not pay for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DESIGNS = ("uniform", "cluster", "neighbours", "irt")

#: ``neighbours``: how many fitted candidates, the nearest on the anchors, predict a candidate's
#: scores on the rest of the pool (3-5 measured alike on the zoo's pools; 1 is noisier).
NEIGHBOURS = 5


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 4, steps: int = 50):
    """Lloyd's k-means with k-means++ starts; points: (n, dims). Returns the labels (n,) of the
    restart with the least within-cluster squared distance; every cluster non-empty."""
    best, best_cost = None, np.inf
    sq = (points**2).sum(1)
    for _ in range(restarts):
        centres = [points[rng.integers(len(points))]]
        d = ((points - centres[0]) ** 2).sum(1)  # each point's squared distance to its nearest centre
        for _ in range(1, k):
            p = d / d.sum() if d.sum() > 0 else np.full(len(points), 1 / len(points))
            centres.append(points[rng.choice(len(points), p=p)])
            d = np.minimum(d, ((points - centres[-1]) ** 2).sum(1))
        c = np.array(centres, dtype=float)
        labels = None
        for _ in range(steps):
            dist = sq[:, None] - 2 * points @ c.T + (c**2).sum(1)[None]
            new = dist.argmin(1)
            # an emptied cluster takes the point farthest from its own centre
            for j in np.setdiff1d(np.arange(k), new):
                far = dist[np.arange(len(points)), new].argmax()
                new[far] = j
                dist[far] = -1.0
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            c = np.array([points[labels == j].mean(0) for j in range(k)])
        cost = ((points - c[labels]) ** 2).sum()
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return best


def _cluster_anchors(matrix: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(anchor column indices, weights): one anchor per cluster of columns, weight = cluster share."""
    columns = matrix.T.astype(float)
    distinct = np.unique(columns, axis=0)
    if len(distinct) <= k:
        # fewer distinct response vectors than anchors: each distinct vector is a stratum, and the
        # anchors left over split the largest strata (proportional allocation)
        labels = np.unique(columns, axis=0, return_inverse=True)[1].ravel()
        labels = _split_largest(labels, k, rng)
    else:
        labels = _kmeans(columns, k, rng)
    anchors, weights = [], []
    for j in range(k):
        members = np.flatnonzero(labels == j)
        centre = columns[members].mean(0)
        anchors.append(members[((columns[members] - centre) ** 2).sum(1).argmin()])
        weights.append(len(members) / len(columns))
    order = np.argsort(anchors)
    return np.array(anchors)[order], np.array(weights)[order]


def _split_largest(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Relabel so that there are k groups: the largest group is halved at random until there are k."""
    labels = labels.copy()
    groups = labels.max() + 1
    while groups < k:
        sizes = np.bincount(labels, minlength=groups)
        big = sizes.argmax()
        members = rng.permutation(np.flatnonzero(labels == big))
        labels[members[: len(members) // 2]] = groups
        groups += 1
    return labels


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def fit_irt(matrix: np.ndarray, steps: int = 300, lr: float = 0.05, prior: float = 1.0):
    """A two-parameter logistic model fitted by Adam on the Bernoulli log-likelihood (soft labels for
    real scores in [0, 1]) with Gaussian priors (ability ~ N(0, 1), discrimination ~ N(1, prior),
    easiness ~ N(0, 3 prior)). Returns (discrimination a, easiness b) per document (columns)."""
    n, d = matrix.shape
    theta = np.zeros(n)
    a, b = np.ones(d), np.zeros(d)
    # start each ability from its candidate's mean score, so the sign of the axis is "better"
    rate = np.clip(matrix.mean(1), 0.02, 0.98)
    theta = np.log(rate / (1 - rate))
    theta = (theta - theta.mean()) / (theta.std() + 1e-9)
    params = [theta, a, b]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        resid = matrix - _sigmoid(theta[:, None] * a[None] + b[None])  # d loglik / d logit
        grads = [
            resid @ a - theta,
            resid.T @ theta - (a - 1) / prior,
            resid.sum(0) - b / (3 * prior),
        ]
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] += lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    return a, b


def irt_ability(scores: np.ndarray, a: np.ndarray, b: np.ndarray, steps: int = 30) -> float:
    """The maximum a posteriori ability (prior N(0, 1)) given scores on the documents (a, b): Newton."""
    theta = 0.0
    for _ in range(steps):
        p = _sigmoid(a * theta + b)
        grad = ((scores - p) * a).sum() - theta
        hess = -(p * (1 - p) * a * a).sum() - 1.0
        step = grad / hess
        theta -= step
        if abs(step) < 1e-9:
            break
    return theta


def neighbour_estimate(
    references: np.ndarray,
    columns: Sequence[int],
    weights: Sequence[float],
    scores: Sequence[float],
    neighbours: int = NEIGHBOURS,
) -> float:
    """A candidate's mean over a task's pool from its ``scores`` on the anchors (the pool's
    ``columns``, in anchor order, with their strata's ``weights``, summing to 1), assisted by
    ``references`` (fitted candidates x the pool's documents, each scored in full).

    The ``neighbours`` references whose anchor scores are nearest the candidate's (weighted
    absolute difference; ties to the earlier reference) predict its score on every document by
    their mean; the estimate is the prediction's mean over the pool plus the weighted mean of the
    candidate's residuals on the anchors. Exact when the prediction is; the strata's weighted
    mean when there are no references."""
    y, w = np.asarray(scores, dtype=float), np.asarray(weights, dtype=float)
    rows = np.asarray(references)  # any numeric dtype: only the anchors' columns and the nearest rows are read
    if rows.size == 0:
        return float(w @ y)
    cols = np.asarray(columns, dtype=int)
    distance = np.abs(rows[:, cols].astype(float) - y[None]) @ w
    prediction = rows[np.argsort(distance, kind="stable")[:neighbours]].astype(float).mean(0)
    return float(prediction.mean() + w @ (y - prediction[cols]))


class AnchorEstimator:
    """Choose k anchor documents of one task's pool and estimate full-pool means from them.

    ``k``: anchors per task, 1 <= k <= pool size (k equal to the pool makes the estimate the exact
    mean). ``design``: one of :data:`DESIGNS`. ``seed``: the only source of randomness.
    """

    def __init__(self, k: int, design: str = "cluster", seed: int = 0):
        if design not in DESIGNS:
            raise ValueError(f"unknown anchor design {design!r}; choose one of {', '.join(DESIGNS)}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k (anchor documents per task) must be a whole number of at least 1, not {k!r}")
        self.k, self.design, self.seed = int(k), design, seed
        self.document_ids: tuple = ()
        self.anchors: tuple = ()  #: the anchor documents' ids, in pool order
        self.weights = np.zeros(0)  #: each anchor's share of the pool (sums to 1)
        self._irt = None
        self._references = None  # neighbours: (the fitted matrix, the anchors' columns)

    def fit(self, matrix: Sequence[Sequence[float]], document_ids: Sequence | None = None) -> AnchorEstimator:
        """Choose the anchors from ``matrix`` (candidates x documents: each row one candidate scored in
        full, each column one document of the pool, in ``document_ids`` order, default 0..n-1). The
        uniform design needs no rows; the others need at least one. Returns self."""
        y = np.asarray(matrix, dtype=float)
        if y.ndim != 2:
            raise ValueError(f"the score matrix must be candidates x documents (2-D), not shape {y.shape}")
        pool = y.shape[1]
        ids = tuple(range(pool)) if document_ids is None else tuple(document_ids)
        if len(ids) != pool or len(set(ids)) != pool:
            raise ValueError(f"{len(ids)} document ids for a pool of {pool} documents (ids must be distinct)")
        if self.k > pool:
            raise ValueError(f"k = {self.k} anchor documents is more than the pool of {pool} documents")
        if not np.isfinite(y).all():
            raise ValueError("the score matrix holds a missing or infinite score")
        if self.design != "uniform" and len(y) == 0:
            raise ValueError(f"the {self.design} design needs at least one candidate scored in full to fit")
        rng = np.random.default_rng(self.seed)
        if self.k == pool:
            anchors, weights = np.arange(pool), np.full(pool, 1 / pool)
        elif self.design == "uniform":
            anchors = np.sort(rng.choice(pool, self.k, replace=False))
            weights = np.full(self.k, 1 / self.k)
        else:
            anchors, weights = _cluster_anchors(y, self.k, rng)
        self.document_ids = ids
        self.anchors = tuple(ids[i] for i in anchors)
        self.weights = weights
        self._irt = None
        self._references = (y, anchors) if self.design == "neighbours" and self.k < pool else None
        if self.design == "irt" and self.k < pool:
            a, b = fit_irt(np.clip(y, 0.0, 1.0))
            rest = np.setdiff1d(np.arange(pool), anchors)
            self._irt = (a[anchors], b[anchors], a[rest], b[rest])
        return self

    def estimate(self, scores: Mapping) -> float:
        """The full-pool mean estimated from ``scores``: anchor document id -> the candidate's score
        on it, for exactly the anchors (fewer or other documents are refused)."""
        if not self.anchors:
            raise ValueError("fit the estimator before estimating")
        given = set(scores)
        if given != set(self.anchors):
            missing = sorted(set(self.anchors) - given, key=str)
            other = sorted(given - set(self.anchors), key=str)
            raise ValueError(
                "an estimate needs the candidate's scores on exactly the anchor documents"
                + (f"; missing {missing[:5]}" if missing else "")
                + (f"; not anchors {other[:5]}" if other else "")
            )
        y = np.array([float(scores[d]) for d in self.anchors])
        if self._references is not None:
            return neighbour_estimate(self._references[0], self._references[1], self.weights, y)
        if self._irt is None:
            return float(self.weights @ y)
        a_anchor, b_anchor, a_rest, b_rest = self._irt
        theta = irt_ability(np.clip(y, 0.0, 1.0), a_anchor, b_anchor)
        return float((y.sum() + _sigmoid(a_rest * theta + b_rest).sum()) / len(self.document_ids))


def score_matrix(records: Mapping, objective: str, task: str, pool: Sequence[int] | None = None):
    """The rows of ``per_document.jsonl`` (``DocumentRecords.read()``) that scored ``task`` of
    ``objective`` on the whole pool, as (trial ids, document ids, matrix candidates x documents).
    ``pool``: the task's search documents (default: the largest set any record scored); subsets (a
    multi-fidelity rung) are left out. An objective without per-document scores (perplexity) is
    refused: its value is not a mean over documents, so there is nothing to anchor."""
    rows = {}
    for (trial, _rung), scored in records.items():
        if task in scored.get(objective, {}):
            ids, values = scored[objective][task]
            rows.setdefault(trial, []).append((list(ids), list(values)))
    if not rows:
        raise ValueError(
            f"objective {objective!r} has no per-document scores on task {task!r} (a perplexity "
            "objective has none): anchor estimates need a score per document"
        )
    if pool is None:
        pool = max((ids for found in rows.values() for ids, _ in found), key=len)
    pool = list(pool)
    full = {t: v for t, found in sorted(rows.items()) for ids, v in found if ids == pool}
    trials = sorted(full)
    return trials, pool, np.array([full[t] for t in trials], dtype=float).reshape(len(trials), len(pool))
