"""Anchor-document estimates: the anchors chosen, the estimates against hand-computed values, and the
refusals (k over the pool, scores on documents that are not the anchors, objectives without
per-document scores)."""

import numpy as np
import pytest

from evomerge.search.anchors import DESIGNS, AnchorEstimator, neighbour_estimate, score_matrix
from evomerge.search.records import DocumentRecords

# Four candidates x six documents: documents 0-2 passed by candidates 0 and 1 (document 2 once
# failed by candidate 1), documents 3-5 by candidates 2 and 3 (document 5 once failed by candidate 3).
TWO_CLUSTERS = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 0],
    ]
)


def test_two_clusters_give_one_anchor_each_and_the_size_weighted_mean():
    e = AnchorEstimator(2, "cluster", seed=0).fit(TWO_CLUSTERS, document_ids=[10, 11, 12, 13, 14, 15])
    # each cluster's anchor is the member nearest its centre: document 10 (not 12, failed once) and 13
    assert e.anchors == (10, 13)
    assert e.weights.tolist() == [0.5, 0.5]
    assert e.estimate({10: 1.0, 13: 0.0}) == 0.5
    assert e.estimate({10: 1.0, 13: 1.0}) == 1.0


def test_clusters_of_unequal_size_weigh_by_size():
    # documents 0-3 share one response vector, documents 4-5 another
    matrix = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    e = AnchorEstimator(2, "cluster").fit(matrix)
    assert e.anchors[0] in (0, 1, 2, 3) and e.anchors[1] in (4, 5)
    assert e.weights == pytest.approx([4 / 6, 2 / 6])
    assert e.estimate({e.anchors[0]: 1.0, e.anchors[1]: 0.0}) == pytest.approx(4 / 6)
    # real scores: the same weighted mean
    assert e.estimate({e.anchors[0]: 0.3, e.anchors[1]: 0.9}) == pytest.approx(0.3 * 4 / 6 + 0.9 * 2 / 6)


def test_more_anchors_than_distinct_response_vectors_split_the_largest_group():
    matrix = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    e = AnchorEstimator(3, "cluster").fit(matrix)
    assert len(e.anchors) == 3 and sum(a in (4, 5) for a in e.anchors) == 1
    assert sorted(e.weights) == pytest.approx([2 / 6, 2 / 6, 2 / 6])


# Three candidates scored in full on six documents; anchors at columns 0 and 3, half the pool each.
REFERENCES = np.array(
    [
        [1, 1, 0, 0, 1, 0],
        [1, 0, 0, 1, 1, 1],
        [0, 0, 1, 1, 0, 1],
    ]
)


def test_the_neighbours_estimate_on_hand_values():
    est = lambda scores, n: neighbour_estimate(REFERENCES, [0, 3], [0.5, 0.5], scores, n)  # noqa: E731
    # scores (1, 0) on the anchors: candidate 0 agrees on both, so it alone predicts 3/6, no residual
    assert est([1.0, 0.0], 1) == pytest.approx(0.5)
    # the two nearest (0, then 1 at distance 0.5) predict (1, .5, 0, .5, 1, .5): mean 3.5/6; the
    # residual on anchor 3 is 0 - 0.5, weighted 0.5
    assert est([1.0, 0.0], 2) == pytest.approx(3.5 / 6 - 0.25)
    # (1, 1): candidate 1 is nearest (4/6); with two, candidate 0 wins the tie at 0.5 over candidate 2
    assert est([1.0, 1.0], 1) == pytest.approx(4 / 6)
    assert est([1.0, 1.0], 2) == pytest.approx(3.5 / 6 + 0.25)
    # all three: the mean row (2/3, 1/3, 1/3, 2/3, 2/3, 2/3), residuals (1/3, -2/3)
    assert est([1.0, 0.0], 5) == pytest.approx(10 / 18 - 1 / 6)
    # of seven references the five nearest (0-4; 5 and 6 disagree on both anchors) predict: the mean
    # row (1, .8, .4, .4), 0.65, and the residual .2 on the second anchor, weighted .5
    seven = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    assert neighbour_estimate(seven, [0, 1], [0.5, 0.5], [1.0, 1.0]) == pytest.approx(0.65 + 0.1)
    assert neighbour_estimate(seven, [0, 1], [0.5, 0.5], [1.0, 1.0], neighbours=7) == pytest.approx(15 / 28 + 5 / 14)
    # without references: the strata's weighted mean; a candidate equal to a reference: exact
    assert neighbour_estimate(np.zeros((0, 6)), [0, 3], [0.25, 0.75], [1.0, 0.0]) == 0.25
    assert est([0.0, 1.0], 1) == pytest.approx(REFERENCES[2].mean())


def test_the_neighbours_design_estimates_from_its_fitted_candidates():
    e = AnchorEstimator(2, "neighbours", seed=0).fit(TWO_CLUSTERS, document_ids=[10, 11, 12, 13, 14, 15])
    assert e.anchors == (10, 13) and e.weights.tolist() == [0.5, 0.5]  # the cluster design's anchors
    # passing 10, failing 13: candidates 0 and 1 agree; with all four fitted candidates as
    # neighbours the mean row is (.5, .5, .25, .5, .5, .25), residuals (.5, -.5): 2.5/6
    assert e.estimate({10: 1.0, 13: 0.0}) == pytest.approx(2.5 / 6)
    assert e.estimate({10: 1.0, 13: 0.0}) != AnchorEstimator(2, "cluster").fit(TWO_CLUSTERS).estimate({0: 1.0, 3: 0.0})


def test_cluster_anchors_of_one_seeded_matrix_are_pinned():
    """The anchors the k-means++ start chose when it recomputed every point's distance to every
    centre; keeping each point's distance to its nearest centre must choose the same."""
    rng = np.random.default_rng(11)
    matrix = (rng.random((30, 200)) < rng.random(200)[None]).astype(float)
    e = AnchorEstimator(12, "cluster", seed=5).fit(matrix)
    assert e.anchors == (0, 3, 12, 18, 37, 40, 54, 61, 84, 113, 138, 174)
    assert [round(w * 200) for w in e.weights] == [9, 10, 46, 8, 15, 13, 4, 61, 9, 8, 10, 7]


@pytest.mark.parametrize("design", DESIGNS)
def test_k_equal_to_the_pool_is_the_exact_mean(design):
    rng = np.random.default_rng(1)
    matrix = rng.random((5, 7))
    e = AnchorEstimator(7, design).fit(matrix[:4])
    assert e.anchors == tuple(range(7))
    assert e.estimate(dict(enumerate(matrix[4]))) == pytest.approx(matrix[4].mean())


def test_uniform_is_the_plain_mean_of_its_anchors_and_deterministic_given_the_seed():
    matrix = np.zeros((0, 50))  # the uniform design needs no fitted candidate
    e = AnchorEstimator(5, "uniform", seed=3).fit(matrix)
    assert len(set(e.anchors)) == 5 and list(e.anchors) == sorted(e.anchors)
    assert AnchorEstimator(5, "uniform", seed=3).fit(matrix).anchors == e.anchors
    scores = {d: float(i % 2) for i, d in enumerate(e.anchors)}
    assert e.estimate(scores) == pytest.approx(2 / 5)


def test_cluster_anchors_are_deterministic_given_the_seed():
    matrix = (np.random.default_rng(0).random((12, 60)) < 0.5).astype(float)
    a = AnchorEstimator(8, "cluster", seed=4).fit(matrix)
    assert AnchorEstimator(8, "cluster", seed=4).fit(matrix).anchors == a.anchors
    assert a.weights.sum() == pytest.approx(1.0)


def test_irt_counts_the_anchors_as_scored_and_rises_with_them():
    # a Guttman scale: candidate i passes the documents easier than its ability
    matrix = (np.arange(20)[None, :] < np.arange(0, 21, 2)[:, None]).astype(float)
    e = AnchorEstimator(4, "irt").fit(matrix)
    low = e.estimate(dict.fromkeys(e.anchors, 0.0))
    high = e.estimate(dict.fromkeys(e.anchors, 1.0))
    assert 0.0 <= low < high <= 1.0
    assert high >= 4 / 20  # the four anchors passed count as passed


def test_k_larger_than_the_pool_is_refused():
    with pytest.raises(ValueError, match=r"k = 7 anchor documents is more than the pool of 6 documents"):
        AnchorEstimator(7).fit(TWO_CLUSTERS)
    with pytest.raises(ValueError, match="at least 1"):
        AnchorEstimator(0)
    with pytest.raises(ValueError, match="unknown anchor design"):
        AnchorEstimator(2, "median")


def test_scores_on_documents_other_than_the_anchors_are_refused():
    e = AnchorEstimator(2, "cluster").fit(TWO_CLUSTERS)
    with pytest.raises(ValueError, match=r"not anchors \[1\]"):
        e.estimate({0: 1.0, 3: 0.0, 1: 1.0})
    with pytest.raises(ValueError, match=r"missing \[3\]"):
        e.estimate({0: 1.0})
    with pytest.raises(ValueError, match=r"missing \[3\]; not anchors \[4\]"):
        e.estimate({0: 1.0, 4: 1.0})
    with pytest.raises(ValueError, match="fit the estimator"):
        AnchorEstimator(2).estimate({0: 1.0})


def test_fitting_needs_candidates_and_whole_scores():
    with pytest.raises(ValueError, match="at least one candidate"):
        AnchorEstimator(2, "cluster").fit(np.zeros((0, 6)))
    with pytest.raises(ValueError, match="missing or infinite"):
        AnchorEstimator(2, "cluster").fit([[1, np.nan, 0]])
    with pytest.raises(ValueError, match="2 document ids for a pool of 3"):
        AnchorEstimator(2, "cluster").fit([[1, 0, 0]], document_ids=[4, 5])


def test_score_matrix_reads_full_pool_rows_and_refuses_objectives_without_documents(tmp_path):
    pool = [0, 1, 2, 3]
    records = DocumentRecords(tmp_path, {"t": pool})
    records.append(0, None, {"acc": {"t": (pool, [1.0, 0.0, 1.0, 1.0])}})
    records.append(1, 0, {"acc": {"t": ([1, 3], [1.0, 0.0])}})  # a rung's subset: left out
    records.append(2, None, {"acc": {"t": (pool, [0.0, 0.0, 1.0, 0.0])}})
    trials, ids, matrix = score_matrix(records.read(), "acc", "t")
    assert trials == [0, 2] and ids == pool
    assert matrix.tolist() == [[1, 0, 1, 1], [0, 0, 1, 0]]
    with pytest.raises(ValueError, match="'ppl' has no per-document scores on task 't'.*perplexity"):
        score_matrix(records.read(), "ppl", "t")
