import math
import random

import pytest

from evomerge.search.pareto import (
    crowding_distances,
    dominates,
    front_indices,
    hypervolume,
    knee,
    pareto_ranks,
    spread,
    weighted_pick,
)

MAXMAX = ["maximize", "maximize"]


def brute_front(points, directions):
    sign = [-1 if d == "maximize" else 1 for d in directions]
    pts = [tuple(s * v for s, v in zip(sign, p)) for p in points]
    ok = [all(math.isfinite(v) for v in p) for p in pts]
    return [
        i
        for i, p in enumerate(pts)
        if ok[i] and not any(ok[j] and dominates(q, p) for j, q in enumerate(pts) if j != i)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_front_and_ranks_agree_with_brute_force(seed):
    rng = random.Random(seed)
    directions = rng.choice([MAXMAX, ["minimize", "maximize"], ["maximize", "minimize", "maximize"]])
    # Rounded values create ties and duplicates, the cases sorting code gets wrong.
    points = [[round(rng.random(), 1) for _ in directions] for _ in range(60)]
    points[3] = [float("nan")] * len(directions)
    points[7][0] = float("inf")
    ranks = pareto_ranks(points, directions)
    assert front_indices(points, directions) == brute_front(points, directions)
    assert ranks[3] is None and ranks[7] is None
    remaining = [i for i, r in enumerate(ranks) if r is not None]
    for rank in range(max(r for r in ranks if r is not None) + 1):
        layer = [i for i in remaining if ranks[i] == rank]
        sub = [points[i] for i in remaining]
        assert layer == [remaining[j] for j in brute_front(sub, directions)]
        remaining = [i for i in remaining if ranks[i] != rank]


def test_hypervolume_by_hand_2d_and_maximize():
    # minimize both, reference (4, 4): points (1,3), (2,2), (3,1) -> staircase area 3 + 2 + 1 = 6
    assert hypervolume([(1, 3), (2, 2), (3, 1)], ["minimize"] * 2, (4, 4)) == pytest.approx(6.0)
    # the same set as maximized accuracies against reference (0, 0)
    assert hypervolume([(3, 1), (2, 2), (1, 3)], MAXMAX, (0, 0)) == pytest.approx(6.0)
    # a dominated point, a point outside the reference box and a failed point add nothing
    assert hypervolume([(3, 1), (2, 2), (1, 3), (1, 1), (5, -1), (float("nan"), 9)], MAXMAX, (0, 0)) == pytest.approx(
        6.0
    )
    assert hypervolume([], MAXMAX, (0, 0)) == 0.0


def test_hypervolume_3d_against_monte_carlo():
    rng = random.Random(1)
    pts = [(rng.random(), rng.random(), rng.random()) for _ in range(12)]
    ref = (1.0, 1.0, 1.0)
    exact = hypervolume(pts, ["minimize"] * 3, ref)
    n = 200_000
    hits = 0
    for _ in range(n):
        x = (rng.random(), rng.random(), rng.random())
        hits += any(all(p[d] <= x[d] for d in range(3)) for p in pts)
    assert exact == pytest.approx(hits / n, abs=0.005)


def inclusion_exclusion(points, ref):
    """Hypervolume (minimization) by inclusion-exclusion over every subset: the union of the boxes
    [p, ref] is the alternating sum of the volumes of their intersections [max of the subset, ref]."""
    from itertools import combinations

    pts = [p for p in points if all(x < r for x, r in zip(p, ref))]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for subset in combinations(pts, k):
            corner = [max(c) for c in zip(*subset)]
            total += (-1) ** (k + 1) * math.prod(r - c for r, c in zip(ref, corner))
    return total


def slicing(points, ref):
    """Hypervolume (minimization) by slicing the last objective, recursively (the earlier exact
    algorithm: slow, O(n^(d-1)), obviously right)."""
    pts = sorted((p for p in points if all(x < r for x, r in zip(p, ref))), key=lambda p: p[-1])
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - pts[0][0]
    total = 0.0
    for k, p in enumerate(pts):
        upper = pts[k + 1][-1] if k + 1 < len(pts) else ref[-1]
        if upper > p[-1]:
            total += slicing([q[:-1] for q in pts[: k + 1]], ref[:-1]) * (upper - p[-1])
    return total


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_hypervolume_equals_inclusion_exclusion(d):
    """Small random sets with dominated points, duplicates, ties on one objective and points outside
    the reference box, some objectives maximized."""
    rng = random.Random(d)
    directions = ["maximize" if j % 2 else "minimize" for j in range(d)]
    signs = [-1 if x == "maximize" else 1 for x in directions]
    for _ in range(40):
        pts = [[round(rng.uniform(0, 1.1), 1) for _ in range(d)] for _ in range(rng.randint(1, 9))]
        pts.append(list(pts[0]))  # a duplicate
        ref = [1.0] * d
        natural = [[s * x for s, x in zip(signs, p)] for p in pts]
        expected = inclusion_exclusion(pts, ref)
        assert hypervolume(natural, directions, [s * r for s, r in zip(signs, ref)]) == pytest.approx(
            expected, abs=1e-12
        )


@pytest.mark.parametrize("d, n", [(3, 120), (4, 60), (5, 30)])
def test_hypervolume_equals_slicing_on_whole_fronts(d, n):
    """Every point on the front (a sphere's positive orthant) and as many again behind it."""
    rng = random.Random(n)
    pts = []
    for _ in range(n):
        v = [abs(rng.gauss(0, 1)) for _ in range(d)]
        norm = math.sqrt(sum(x * x for x in v))
        pts.append([1 - x / norm for x in v])
        pts.append([min(1.0, 1 - x / norm + rng.uniform(0, 0.2)) for x in v])
    ref = [1.0] * d
    assert hypervolume(pts, ["minimize"] * d, ref) == pytest.approx(slicing(pts, ref), rel=1e-12)


def test_crowding_by_hand():
    pts = [(0.0, 1.0), (0.25, 0.7), (0.5, 0.5), (1.0, 0.0)]
    d = crowding_distances(pts, MAXMAX)
    assert d[0] == d[3] == math.inf
    assert d[1] == pytest.approx((0.5 - 0.0) / 1.0 + (1.0 - 0.5) / 1.0)
    assert d[2] == pytest.approx((1.0 - 0.25) / 1.0 + (0.7 - 0.0) / 1.0)
    assert spread(pts, MAXMAX, 3) == [0, 2, 3]


def test_knee_and_weighted_picks():
    pts = [(0.9, 0.1), (0.7, 0.6), (0.1, 0.9), (0.5, 0.5), (float("nan"), 1.0)]
    assert front_indices(pts, MAXMAX) == [0, 1, 2]
    assert knee(pts, MAXMAX) == 1  # the balanced member
    assert weighted_pick(pts, MAXMAX, [1, 0]) == 0
    assert weighted_pick(pts, MAXMAX, [0, 1]) == 2
    with pytest.raises(ValueError, match="weights"):
        weighted_pick(pts, MAXMAX, [0, 0])
    with pytest.raises(ValueError, match="no finished candidate"):
        knee([(float("nan"), 1.0)], MAXMAX)
    with pytest.raises(ValueError, match="directions"):
        front_indices(pts, ["max", "min"])


def plotted(html: str) -> list[dict]:
    """The traces a plotly HTML page draws (the second argument of its Plotly.newPlot call)."""
    import json

    start = html.index("Plotly.newPlot(")
    start = html.index(",", start) + 1
    traces, _ = json.JSONDecoder().raw_decode(html[start:].lstrip())
    return traces


def test_front_plots_show_every_pair_of_objectives_and_mark_the_hand_baselines():
    from evomerge.tracking.mlflow_tracker import front_plots

    ids = [0, 1, 2, 3]
    points = [[0.1, 0.9, 0.5], [0.9, 0.1, 0.5], [0.2, 0.2, 0.2], [0.5, 0.5, 0.9]]
    html, png = front_plots(ids, points, [0, 1, 3], ["a", "b", "c"], ["maximize"] * 3, baselines=[2])
    assert png.shape[:2] == (450, 1080)  # three panels (a-b, a-c, b-c) side by side
    traces = plotted(html)
    assert [t["name"] for t in traces] == ["Pareto front", "hand baseline"]  # no other candidates here
    assert [d["label"] for d in traces[0]["dimensions"]] == ["a", "b", "c"]
    assert traces[1]["dimensions"][0]["values"] == [0.2] and traces[1]["marker"]["symbol"] == "x"
    html, png = front_plots(ids, [p[:2] for p in points], [0, 1], ["a", "b"], ["maximize"] * 2, baselines=[2])
    assert png.shape[:2] == (450, 600)
    assert [(t["type"], t["name"], t["x"], t["y"]) for t in plotted(html)] == [
        ("scatter", "candidates", [0.5], [0.5]),  # trial 3, not on the front given
        ("scatter", "Pareto front", [0.1, 0.9], [0.9, 0.1]),
        ("scatter", "hand baseline", [0.2], [0.2]),
    ]
