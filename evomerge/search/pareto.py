"""Pareto fronts over finished candidates: non-dominated sets, ranks, hypervolume, crowding, picks.

Objectives are given with directions; everything is computed internally on minimization form
(maximized objectives are negated), so callers keep their natural signs. Failed candidates (any
non-finite objective) are never in a front and get no rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Direction = str  # "maximize" | "minimize"


def _as_min(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[tuple[float, ...]]:
    if any(d not in ("maximize", "minimize") for d in directions):
        raise ValueError(f"directions must be 'maximize' or 'minimize', got {list(directions)}")
    signs = [-1.0 if d == "maximize" else 1.0 for d in directions]
    out = []
    for p in points:
        if len(p) != len(signs):
            raise ValueError(f"point {list(p)} has {len(p)} objectives, expected {len(signs)}")
        out.append(tuple(s * float(v) for s, v in zip(signs, p)))
    return out


def _finite(p: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in p)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b (minimization): no worse everywhere, strictly better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_ranks(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[int | None]:
    """Non-domination rank of each point (0 = the front); None for failed (non-finite) points.

    Fast non-dominated sorting (Deb et al., NSGA-II, 2002): O(M N^2).
    """
    pts = _as_min(points, directions)
    idx = [i for i, p in enumerate(pts) if _finite(p)]
    dominated_by = {i: 0 for i in idx}
    dominating: dict[int, list[int]] = {i: [] for i in idx}
    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            i, j = idx[a], idx[b]
            if dominates(pts[i], pts[j]):
                dominating[i].append(j)
                dominated_by[j] += 1
            elif dominates(pts[j], pts[i]):
                dominating[j].append(i)
                dominated_by[i] += 1
    ranks: list[int | None] = [None] * len(pts)
    current = [i for i in idx if dominated_by[i] == 0]
    rank = 0
    while current:
        nxt = []
        for i in current:
            ranks[i] = rank
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        current = nxt
        rank += 1
    return ranks


def front_indices(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[int]:
    """Indices of the non-dominated finite points, in input order."""
    return [i for i, r in enumerate(pareto_ranks(points, directions)) if r == 0]


def hypervolume(
    points: Sequence[Sequence[float]], directions: Sequence[Direction], reference: Sequence[float]
) -> float:
    """Volume dominated by the finite points and bounded by ``reference`` (given in the objectives'
    natural signs: the worst acceptable value of each). Points not strictly better than the reference
    in every objective add nothing. Exact: a sweep for two and three objectives, WFG (While,
    Bradstreet and Barone, IEEE TEC 2012) for more; on the non-dominated points only. 400 points on a
    four-objective front take well under a second (``benchmarks/pareto.py``)."""
    ref = _as_min([reference], directions)[0]
    pts = [p for p in _as_min(points, directions) if _finite(p) and all(x < r for x, r in zip(p, ref))]
    if not pts:
        return 0.0
    import numpy as np

    front, r = _nondominated(np.asarray(pts, dtype=float)), np.asarray(ref, dtype=float)
    if len(ref) == 1:
        return float(r[0] - front[0, 0])
    return {2: _hv2, 3: _hv3}.get(len(ref), _wfg)(front, r)


def _nondominated(pts):
    """The distinct non-dominated rows of ``pts`` (minimization): in lexicographic order a row can only
    be weakly dominated by an earlier one, so one pass against the rows kept so far decides."""
    import numpy as np

    if len(pts) <= 1:
        return pts
    pts = pts[np.lexsort(pts.T[::-1])]
    kept = np.empty_like(pts)
    k = 0
    for row in pts:
        if k and (kept[:k] <= row).all(axis=1).any():
            continue
        kept[k] = row
        k += 1
    return kept[:k]


def _hv2(front, ref) -> float:
    """Two objectives, non-dominated ``front``: sorted by the first, the second falls; a sum of strips."""
    import numpy as np

    front = front[np.argsort(front[:, 0], kind="stable")]
    right = np.append(front[1:, 0], ref[0])
    return float(((right - front[:, 0]) * (ref[1] - front[:, 1])).sum())


def _hv3(front, ref) -> float:
    """Three objectives: sweep the third; between consecutive values the slab's area is the
    two-objective volume of the points below it, updated only when a point enters that front."""
    import numpy as np

    front = front[np.argsort(front[:, 2], kind="stable")]
    total, area, plane = 0.0, 0.0, np.empty((0, 2))
    for k, p in enumerate(front):
        q = p[:2]
        if not (plane <= q).all(axis=1).any():
            plane = np.vstack([plane[~(q <= plane).all(axis=1)], q])
            area = _hv2(plane, ref[:2])
        upper = front[k + 1, 2] if k + 1 < len(front) else ref[2]
        total += area * (upper - p[2])
    return total


def _wfg(front, ref) -> float:
    """WFG: the sum of each point's exclusive volume, its box less the volume of the later points
    limited to that box (their non-dominated part, recursively). Points go worst-first on the last
    objective, which keeps the limited sets small."""
    import numpy as np

    n, d = front.shape
    if n == 1:
        return float(np.prod(ref - front[0]))
    if d == 2:
        return _hv2(front, ref)
    front = front[np.argsort(-front[:, -1], kind="stable")]
    total = 0.0
    for i in range(n):
        box = float(np.prod(ref - front[i]))
        if i + 1 < n:
            box -= _wfg(_nondominated(np.maximum(front[i + 1 :], front[i])), ref)
        total += box
    return total


def crowding_distances(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[float]:
    """NSGA-II crowding distance of each point within the given set (boundary points: inf)."""
    pts = _as_min(points, directions)
    n = len(pts)
    dist = [0.0] * n
    if n <= 2:
        return [math.inf] * n
    for m in range(len(directions)):
        order = sorted(range(n), key=lambda i: pts[i][m])
        lo, hi = pts[order[0]][m], pts[order[-1]][m]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for k in range(1, n - 1):
            dist[order[k]] += (pts[order[k + 1]][m] - pts[order[k - 1]][m]) / (hi - lo)
    return dist


def spread(points: Sequence[Sequence[float]], directions: Sequence[Direction], k: int) -> list[int]:
    """Indices of up to ``k`` front members chosen for spread: largest crowding distance first."""
    front = front_indices(points, directions)
    dist = crowding_distances([points[i] for i in front], directions)
    order = sorted(range(len(front)), key=lambda j: (-dist[j], front[j]))
    return sorted(front[j] for j in order[:k])


def _normalized(points, directions, idx):
    pts = _as_min([points[i] for i in idx], directions)
    m = len(directions)
    lo = [min(p[d] for p in pts) for d in range(m)]
    hi = [max(p[d] for p in pts) for d in range(m)]
    return [tuple((p[d] - lo[d]) / (hi[d] - lo[d]) if hi[d] > lo[d] else 0.0 for d in range(m)) for p in pts]


def weighted_pick(points: Sequence[Sequence[float]], directions: Sequence[Direction], weights: Sequence[float]) -> int:
    """The front member minimizing the weighted sum of its objectives normalized to [0, 1] over the
    front (0 = best on that objective). Ties go to the earliest candidate."""
    front = front_indices(points, directions)
    if not front:
        raise ValueError("no finished candidate to pick from")
    if len(weights) != len(directions) or any(w < 0 for w in weights) or not any(weights):
        raise ValueError("weights: one non-negative value per objective, not all zero")
    norm = _normalized(points, directions, front)
    scores = [sum(w * v for w, v in zip(weights, p)) for p in norm]
    return front[min(range(len(front)), key=lambda j: (scores[j], front[j]))]


def knee(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> int:
    """The front member closest (Euclidean, objectives normalized over the front) to the ideal point:
    the balanced compromise when no weights are given."""
    front = front_indices(points, directions)
    if not front:
        raise ValueError("no finished candidate to pick from")
    norm = _normalized(points, directions, front)
    dist = [math.sqrt(sum(v * v for v in p)) for p in norm]
    return front[min(range(len(front)), key=lambda j: (dist[j], front[j]))]
