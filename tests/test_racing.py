"""Racing on anchor documents: the decision rule on hand values, and a search raced on synthetic
per-document scores that resumes exactly."""

import json
import math
import random

import numpy as np
import pytest
from test_search import TWO, bowl, genome

from evomerge.search.anchors import neighbour_estimate, score_matrix
from evomerge.search.journal import JOURNAL, JournalError
from evomerge.search.racing import (
    Racer,
    Racing,
    behind,
    errors,
    estimate,
    fit_anchors,
    gain,
    refit_weights,
    settle,
    stopped,
)
from evomerge.search.records import DocumentRecords
from evomerge.search.study import Search


def test_the_estimate_its_error_and_the_stopping_rule_on_hand_values():
    fitted = {"a": {"t": ([2, 5, 9], [0.5, 0.3, 0.2])}}
    scored = {"a": {"t": ([2, 5, 9], [1.0, 0.0, 1.0])}}
    value, se = estimate(fitted, {"t": 40}, scored, "a")
    assert value == pytest.approx(0.7)
    assert se == pytest.approx(math.sqrt((0.25 + 0.09 + 0.04) * 0.7 * 0.3))
    # two tasks of one objective weigh by their pools: 30 and 10 documents
    two = {"a": {"t": ([1], [1.0]), "u": ([3], [1.0])}}
    assert estimate(two, {"t": 30, "u": 10}, {"a": {"t": ([1], [1.0]), "u": ([3], [0.0])}}, "a")[0] == 0.75

    # the neighbours estimate: three candidates scored in full on the pool 10..15, anchors 10 and 13
    # at half the pool each; all three (fewer than NEIGHBOURS) predict the mean row (2/3, 1/3, 1/3,
    # 2/3, 2/3, 2/3), and the residuals on the anchors (1/3, -2/3) correct it: 7/18; the standard
    # error is the strata's bound at that mean
    rows = np.array([[1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 1]])
    half = {"a": {"t": ([10, 13], [0.5, 0.5])}}
    anchored = {"a": {"t": ([10, 13], [1.0, 0.0])}}
    value, se = estimate(half, {"t": 6}, anchored, "a", {"t": (list(range(10, 16)), rows)})
    assert value == pytest.approx(7 / 18) and se == pytest.approx(math.sqrt(0.5 * 7 / 18 * 11 / 18))
    assert estimate(half, {"t": 6}, anchored, "a", {})[0] == 0.5  # no references: the weighted mean

    full = [[0.6, 0.6]]
    up = ["maximize", "maximize"]
    assert stopped([0.4, 0.5], [0.1, 0.05], full, up)  # optimistic corner (0.5, 0.55): dominated
    assert not stopped([0.4, 0.5], [0.25, 0.0], full, up)  # (0.65, 0.5): not dominated
    assert not stopped([0.5, 0.6], [0.1, 0.0], full, up)  # (0.6, 0.6) equals it: not dominated
    mixed = ["maximize", "minimize"]  # the corner moves down on a minimized objective
    assert stopped([0.4, 0.9], [0.1, 0.2], [[0.6, 0.6]], mixed)
    assert not stopped([0.4, 0.9], [0.1, 0.4], [[0.6, 0.6]], mixed)

    # the mean rule: behind when the mean's optimistic end is below the best mean in full (0.55)
    assert behind([0.4, 0.5], 0.05, [[0.6, 0.5], [0.2, 0.2]], up)
    assert not behind([0.4, 0.5], 0.11, [[0.6, 0.5]], up)
    assert behind([0.7, 0.8], 0.05, [[0.6, 0.5]], ["minimize", "minimize"])  # minimized: 0.75 - 0.05 > 0.55
    assert not behind([0.4, 0.5], 0.0, [], up)  # nothing in full yet

    # the hypervolume rule: the share of the front's volume (0.5 x 0.5 = 0.25 from the origin) that
    # the optimistic corner adds: (0.6, 0.3) adds 0.1 x 0.3 = 0.03, a share of 0.12; (0.52, 0.3) adds
    # 0.006, 0.024; a dominated corner nothing; nothing in full yet: infinite; at the reference: 0
    origin = [0.0, 0.0]
    assert gain([0.55, 0.25], [0.05, 0.05], full_half := [[0.5, 0.5]], up, origin) == pytest.approx(0.12)
    assert gain([0.5, 0.25], [0.02, 0.05], full_half, up, origin) == pytest.approx(0.024)
    assert gain([0.3, 0.3], [0.1, 0.1], full_half, up, origin) == 0.0
    assert (
        gain([0.3, 0.3], [0.0, 0.0], [], up, origin) == math.inf and gain([0.0, 0.3], [0.0, 0.0], [], up, origin) == 0
    )
    # a minimized objective: reference (0, 1), the front's box 0.5 x (1 - 0.5); the corner (0.6, 0.7)
    assert gain([0.55, 0.75], [0.05, 0.05], full_half, mixed, [0.0, 1.0]) == pytest.approx(0.03 / 0.25)

    found = errors([(0.1, 0.2), (0.5, 0.4), (0.3, 0.3), (0.9, 0.7)])
    assert found["mae"] == pytest.approx(0.1) and found["rmse"] == pytest.approx(math.sqrt(0.06 / 4))
    assert found["spearman"] == pytest.approx(1.0)
    assert "spearman" not in errors([(0.1, 0.2), (0.5, 0.4)])

    # fixed anchors 0 and 2 re-learn their weights: documents 1 and 3 answer like anchor 0
    matrix = np.array([[1, 1, 0, 1], [0, 0, 1, 0]])
    assert refit_weights(matrix, [10, 11, 12, 13], [10, 12]) == [0.75, 0.25]

    racing = Racing(0.1, 0.25, 2.0, 4, 4, seed=7)
    # the header names the estimate unless it is the strata's (what journals before it were raced on)
    assert racing.header()["estimate"] == "neighbours"
    assert "estimate" not in Racing(0.1, 0.25, 2.0, 4, 4, seed=7, estimate="strata").header()
    assert racing.count(40) == 4 and racing.count(5) == 1 and Racing(12, 0.1, 2, 4, 4, 0).count(8) == 8
    assert all(racing.checked(i, before) for i, before in ((30, 0), (31, 1), (32, 2)))  # the first 3
    drawn = [racing.checked(i, 3) for i in range(2000)]
    assert 0.2 < sum(drawn) / 2000 < 0.3 and drawn == [racing.checked(i, 3) for i in range(2000)]


POOL = list(range(40))


def answers(trial, documents):
    """Per-document scores of ``trial`` (objective -> task -> (ids, scores)) on ``documents`` (task ->
    ids, or None: the pool): document d is passed when the trial's skill exp(bowl / 2) exceeds its
    difficulty (d % 8) / 8, flipped at random one time in 20: documents of one difficulty answer
    alike, as documents of one kind do."""
    out = {}
    for j, (objective, task) in enumerate((("a", "ta"), ("b", "tb"))):
        skill = math.exp(bowl(trial.genome)[j] / 2)
        ids = POOL if documents is None else documents[task]
        flip = [random.Random(f"{trial.id}:{task}:{d}").random() < 0.05 for d in ids]
        out[objective] = {task: (list(ids), [float((skill > (d % 8) / 8) != f) for d, f in zip(ids, flip)])}
    return out


def run_race(search, racer, records, n, crash_at=None):
    """One worker, as the campaign's loop: fit when due, evaluate what ``ask`` hands out on its
    documents, record and tell them (``settle``); stop at n told (or return the trial in flight)."""
    told = lambda: sum(t.status != "running" for t in search.trials)
    while told() < n:
        racer.maybe_fit()
        t = search.ask()
        if crash_at is not None and told() >= crash_at:
            return t
        scores = answers(t, racer.documents_for(t))
        info = {"documents": sum(len(ids) for o in scores.values() for ids, _ in o.values())}
        values = {o: sum(s) / len(s) for o, tasks in scores.items() for _, s in tasks.values()}
        settle(search, racer, records, t, values, scores, info)  # a promoted one's rest joined to its anchors
    return search


def make(directory, rule="dominance", estimate="neighbours"):
    racing = Racing(0.1, 0.2, 2.0, min_full=6, refit=5, seed=3, rule=rule, estimate=estimate)
    search = Search(genome(), "random", TWO, 5, directory, racing=racing)
    records = DocumentRecords(directory, {"ta": POOL, "tb": POOL})
    return search, Racer(search, records, records.full_ids, first_fit=2), records


def test_a_raced_search_stops_dominated_candidates_on_their_anchors_and_resumes_exactly(tmp_path):
    whole, racer, records = make(tmp_path / "whole")
    for point in (whole.genome.uniform_average(), whole.genome.expert_alone("expert-add")):
        whole.enqueue(point)
    run_race(whole, racer, records, 40)
    events = [json.loads(line) for line in (tmp_path / "whole" / JOURNAL).read_text().splitlines()]
    fits = [e for e in events if e["event"] == "anchors"]
    assert [e["fitted"] for e in fits][:3] == [6, 11, 16]  # the first fit at min_full, then every 5 more
    assert all(e["anchors"] == fits[0]["anchors"] for e in fits)  # anchors fixed, weights refitted
    assert fits[0]["weights"] != fits[-1]["weights"]
    assert {t: len(ids) for t, ids in fits[0]["anchors"]["a"].items()} == {"ta": 4}
    # the fit on the racer's rows (read once each) is the cluster design on the records' matrix
    first = {t.id for t in whole.trials[:6]}  # the results in full at the first fit
    fitted_on = {key: rows for key, rows in records.read().items() if key[0] in first}
    for objective, tasks in fits[0]["anchors"].items():
        for task, ids in tasks.items():
            _, pool, matrix = score_matrix(fitted_on, objective, task, POOL)
            assert len(matrix) == 6 and fit_anchors(matrix, pool, 4, 3)[0] == ids
    assert sorted(e["id"] for e in events if e["event"] == "tell") == list(range(40))

    first_raced = next(i for i, e in enumerate(events) if e["event"] == "anchors")
    asked_before = sum(e["event"] == "ask" for e in events[:first_raced])
    assert all(t.top is None and t.full for t in whole.trials[:asked_before])  # in full until the fit
    raced = whole.raced
    assert [t.id for t in raced] == list(range(asked_before, 40))
    stopped_ = whole.stopped_early
    assert stopped_ and all(t.documents == 8 and t.values == t.estimate for t in stopped_)  # anchors only
    promoted = [t for t in raced if t.full]
    # a promoted candidate scores only the rest of its pools: its anchors' scores are re-used, and its
    # result is what scoring the whole pools gives
    assert promoted and all(t.documents == 8 + 72 and t.estimate is not None for t in promoted)
    whole_pools = lambda t: [sum(s) / len(s) for o in answers(t, None).values() for _, s in o.values()]
    assert all(t.values == pytest.approx(whole_pools(t), abs=1e-12) for t in promoted)
    assert all(records.read()[(t.id, 1)]["a"]["ta"][0] == POOL for t in promoted)
    assert all(racer.checked(t) <= t.full for t in raced)  # the check sample is always scored in full
    assert [t.id for t in raced if racer.checked(t)][:3] == [t.id for t in raced[:3]]
    assert all(t.full for t in whole.front()) and {t.id for t in whole.finished}.isdisjoint(t.id for t in stopped_)
    # a task no searched objective reads is scored on the first anchors' count of its pool, not in full
    extra = Racer(whole, records, {**records.full_ids, "tc": list(range(100, 120))})
    assert extra.documents_for(stopped_[0]) == {**whole.anchor_documents(), "tc": [100, 101]}
    # documents: 80 per full evaluation, 8 per anchor evaluation (a promoted candidate 72 more)
    assert whole.documents == 80 * (40 - len(raced)) + 80 * len(promoted) + 8 * len(stopped_)
    # re-use only where full results are the mean of their per-document scores
    assert racer.reuses()
    tampered = DocumentRecords(tmp_path / "tampered", records.full_ids)
    tampered.path.parent.mkdir()
    for (trial, rung), scores in records.read().items():
        if trial == 0:
            ids, values = scores["b"]["tb"]
            scores["b"]["tb"] = (ids, [1.0 - values[0], *values[1:]])
        tampered.append(trial, rung, scores)
    doubtful = Racer(whole, tampered, records.full_ids)
    doubtful.scores[promoted[0].id] = {"a": {}}
    assert not doubtful.reuses() and doubtful.documents_for(promoted[0]) is None  # scored in full
    assert promoted[0].id not in doubtful.scores  # its anchors' scores are not kept for nothing
    metrics = racer.metrics()
    assert metrics["anchors.checked"] >= 3 and {"anchors.mae.a", "anchors.spearman.b"} <= set(metrics)
    assert metrics["anchors.mae.a"] < 0.2
    part, racer2, records2 = make(tmp_path / "part")
    for point in (part.genome.uniform_average(), part.genome.expert_alone("expert-add")):
        part.enqueue(point)
    flying = run_race(part, racer2, records2, 40, crash_at=25)
    with open(tmp_path / "part" / JOURNAL, "a") as f:
        f.write('{"event": "anchors", "fitted": ')  # a torn last write
    resumed, racer3, records3 = make(tmp_path / "part")
    assert [t.id for t in resumed.trials if t.status == "running"] == [flying.id]
    assert resumed.trials[flying.id].rung == flying.rung and resumed.anchors == part.anchors
    run_race(resumed, racer3, records3, 40)
    final = lambda s: [(t.id, t.unit, t.status, t.rung, t.values, t.estimate, t.documents) for t in s.trials]
    assert final(resumed) == final(whole)
    # a raced trial's estimate: the neighbours estimate over every candidate scored in full so far
    t = whole.ask()
    scores = answers(t, racer.documents_for(t))
    values, _, _ = racer.judge(t, scores)
    references = racer.references()
    in_full = [x for x in whole.finished if "repeat_of" not in x.info]
    # read incrementally through the run, they equal the matrices read from the records at once
    every = {k: v for k, v in records.read().items() if k[0] in {x.id for x in in_full}}
    for objective, task in (("a", "ta"), ("b", "tb")):
        _, _, matrix = score_matrix(every, objective, task, POOL)
        assert np.array_equal(references[objective][task][1], matrix.astype(np.float32))
    for j, (objective, task) in enumerate((("a", "ta"), ("b", "tb"))):
        anchors, weights = (whole.anchors[key][objective][task] for key in ("anchors", "weights"))
        pool, rows = references[objective][task]
        assert pool == POOL and len(rows) == len(in_full)
        y = dict(zip(*scores[objective][task]))
        expected = neighbour_estimate(rows, [pool.index(a) for a in anchors], weights, [y[a] for a in anchors])
        assert values[j] == pytest.approx(expected, abs=1e-12)


def test_the_strata_estimate_is_the_anchors_weighted_mean_and_reads_no_references(tmp_path):
    search, racer, records = make(tmp_path, estimate="strata")
    run_race(search, racer, records, 20)
    t = search.ask()
    scores = answers(t, racer.documents_for(t))
    values, _, _ = racer.judge(t, scores)
    for j, (objective, task) in enumerate((("a", "ta"), ("b", "tb"))):
        anchors, weights = (search.anchors[key][objective][task] for key in ("anchors", "weights"))
        y = dict(zip(*scores[objective][task]))
        assert values[j] == pytest.approx(sum(w * y[a] for a, w in zip(anchors, weights)), abs=1e-12)
    assert racer._references == (-1, {})  # never read
    # a records file without the full rows (lost): the neighbours estimate falls back to the strata's
    lost = Racer(search, DocumentRecords(tmp_path / "elsewhere", records.full_ids), records.full_ids)
    assert lost.references() == {}


def test_anchors_events_are_checked_on_replay(tmp_path):
    search, racer, records = make(tmp_path)
    run_race(search, racer, records, 12)
    lines = (tmp_path / JOURNAL).read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if '"event": "anchors"' in line)
    event = json.loads(lines[n])
    bad = {
        "weights": {**event, "weights": {"a": {"ta": [0.5]}, "b": event["weights"]["b"]}},
        "objective": {**event, "anchors": {"c": event["anchors"]["a"]}, "weights": {"c": event["weights"]["a"]}},
        "type": {**event, "fitted": "six"},
    }
    for mutated in bad.values():
        (tmp_path / JOURNAL).write_text("\n".join([*lines[:n], json.dumps(mutated), *lines[n + 1 :]]) + "\n")
        with pytest.raises(JournalError, match=rf"{JOURNAL}:{n + 1}: anchors event"):
            make(tmp_path)
    (tmp_path / JOURNAL).write_text("\n".join(lines) + "\n")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / JOURNAL).write_text("\n".join(lines) + "\n")
    with pytest.raises(JournalError, match="written by a different search"):  # the header names racing
        Search(genome(), "random", TWO, 5, plain)


def test_the_mean_rule_stops_what_cannot_reach_the_best_mean(tmp_path):
    """``rule: mean`` stops a raced candidate whose estimated mean, plus its interval, stays behind
    the best mean scored in full: every one it stopped was so when judged, none on the front."""
    search, racer, records = make(tmp_path / "mean", rule="mean")
    run_race(search, racer, records, 40)
    stopped_ = search.stopped_early
    assert stopped_ and all(not t.full for t in stopped_) and all(t.full for t in search.front())
    best_when = lambda t: max(sum(f.values) / 2 for f in search.finished if f.id < t.id)  # noqa: E731
    assert all(sum(t.estimate) / 2 < best_when(t) for t in stopped_)
    header = json.loads((tmp_path / "mean" / JOURNAL).read_text().splitlines()[0])
    assert header["racing"]["rule"] == "mean"
    dominance, racer2, records2 = make(tmp_path / "dominance")
    run_race(dominance, racer2, records2, 40)
    assert "rule" not in json.loads((tmp_path / "dominance" / JOURNAL).read_text().splitlines()[0])["racing"]
    assert len(stopped_) > len(dominance.stopped_early)  # the front is wide; the best mean is one point


def test_the_hypervolume_rule_stops_what_adds_too_little_to_the_front(tmp_path):
    """``rule: hypervolume`` stops a raced candidate whose estimate could add less than ``gain`` of
    the hypervolume of the results in full (reference: their worst on each objective), so it stops
    more than the dominance rule on the same problem; the header names rule and gain."""
    search, racer, records = make(tmp_path / "hv", rule="hypervolume")
    run_race(search, racer, records, 40)
    stopped_ = search.stopped_early
    assert stopped_
    up = search.directions
    for t in stopped_:
        before = [f.values for f in search.finished if f.id < t.id]
        worst = [min(v[j] for v in before) for j in range(2)]
        assert gain(t.estimate, [0.0, 0.0], before, up, worst) < 0.05  # so too with its interval's widths
    dominance, racer2, records2 = make(tmp_path / "dominance")
    run_race(dominance, racer2, records2, 40)
    assert len(stopped_) > len(dominance.stopped_early)  # small gains stop too, not only dominated corners
    header = json.loads((tmp_path / "hv" / JOURNAL).read_text().splitlines()[0])
    assert header["racing"]["rule"] == "hypervolume" and header["racing"]["gain"] == 0.05
    # the reference: the worst in full on each objective, or the one the racer is given
    assert racer._reference([[0.2, 0.4], [0.3, 0.1]]) == [0.2, 0.1]
    assert Racer(search, records, records.full_ids, reference=lambda: [0.0, 0.0])._reference([[0.2, 0.4]]) == [0, 0]


def test_gain_is_a_setting_of_the_hypervolume_rule_only_and_survives_the_experiment_copy():
    from evomerge.experiment import RacingConfig

    for rule in ("dominance", "mean", "hypervolume"):  # a campaign re-reads the copy model_dump wrote
        assert RacingConfig.model_validate(RacingConfig(rule=rule).model_dump()).gain is None
    assert RacingConfig.model_validate(RacingConfig(rule="hypervolume", gain=0.1).model_dump()).gain == 0.1
    with pytest.raises(ValueError, match=r"gain applies to rule: hypervolume only \(this rule is mean\)"):
        RacingConfig(rule="mean", gain=0.1)


@pytest.mark.parametrize(
    "key, default, before",
    [("estimate", "neighbours", "strata"), ("rule", "hypervolume", "dominance")],
)
def test_a_search_raced_before_a_default_changed_resumes_on_what_its_journal_raced_with(tmp_path, key, default, before):
    """``estimate`` (strata before neighbours existed) and ``rule`` (dominance before hypervolume was
    the default): where the experiment names none, a campaign races as its journal's header says."""
    from evomerge import campaign
    from evomerge.experiment import RacingConfig

    resolve = lambda racing, directory: campaign.raced_setting(racing, directory, key)  # noqa: E731
    settings = {"anchors": 0.1, "check": 0.2, "z": 2.0, "min_full": 6, "refit": 5}
    racing = lambda value: Racing(**settings, seed=3, **{key: value})  # noqa: E731
    assert resolve(RacingConfig(**settings), tmp_path) == default  # a new campaign
    Search(genome(), "random", TWO, 5, tmp_path, racing=racing(before))  # its header names none
    with pytest.raises(JournalError, match="different search"):
        Search(genome(), "random", TWO, 5, tmp_path, racing=racing(default))
    # the experiment (copied before the setting existed) names none: the journal's it is
    resumed = resolve(RacingConfig(**settings), tmp_path)
    assert resumed == before and Search(genome(), "random", TWO, 5, tmp_path, racing=racing(resumed))
    # named in the experiment: as named (and that journal then refuses it, as above)
    assert resolve(RacingConfig(**settings, **{key: default}), tmp_path) == default
    # a journal that is empty, not a header, or a header without racing: the default
    for first in ("", "[1]\n", '{"event": "header"}\n', "{not json\n"):
        odd = tmp_path / f"odd{len(first)}"
        odd.mkdir()
        (odd / JOURNAL).write_text(first)
        assert resolve(RacingConfig(**settings), odd) == default
    newer = tmp_path / "newer"
    Search(genome(), "random", TWO, 5, newer, racing=racing(default))
    assert resolve(RacingConfig(**settings), newer) == default
    if key == "rule":  # a journal raced on the mean rule says so
        Search(genome(), "random", TWO, 5, tmp_path / "mean", racing=racing("mean"))
        assert resolve(RacingConfig(**settings), tmp_path / "mean") == "mean"


def test_the_reference_point_is_fixed_from_the_first_results_in_full_in_the_journals_order(tmp_path):
    """The campaign's hypervolume reference (which the hypervolume rule races from) is the worst of
    the first n results in full in the order they were told, read back alike from the journal: a
    campaign killed before it saved the reference fixes the same one when resumed."""
    from evomerge.campaign import worst

    search = Search(genome(), "random", TWO, 5, tmp_path)
    a, b, c = search.ask(), search.ask(), search.ask()
    search.tell(c.id, [0.1, 0.2])
    search.tell(a.id, None)  # failed: not a result in full
    search.tell(b.id, [0.3, 0.05])
    assert search.full_order == [c.id, b.id]
    replayed = Search(genome(), "random", TWO, 5, tmp_path)
    assert replayed.full_order == [c.id, b.id]
    assert worst(replayed, replayed.directions, 1) == [0.1, 0.2]
    assert worst(replayed, replayed.directions, 2) == [0.1, 0.05]
