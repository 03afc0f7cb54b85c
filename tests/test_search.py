import json
import random
from collections import defaultdict

import pytest
from conftest import REPO

from evomerge.objectives import Objective
from evomerge.search.journal import JOURNAL, JournalError
from evomerge.search.optimizers import OPTIMIZERS, check_options, make_optimizer
from evomerge.search.optuna_view import OPTUNA_VIEW, STUDY
from evomerge.search.space import Genome, load_space
from evomerge.search.study import Search

TWO = [Objective(name="a"), Objective(name="b")]
ONE = [Objective(name="a")]


def genome():
    return Genome(load_space(REPO / "search_spaces" / "two_experts_layer_groups.yaml"), num_layers=4)


def bowl(x):
    """Two maximized objectives with a known trade-off: closeness to 0.3 and to 1.1 in every gene."""
    return [-sum((v - 0.3) ** 2 for v in x), -sum((v - 1.1) ** 2 for v in x)]


def run(search, n, workers=2, crash_at=None, noise=0.0):
    """The controller's policy: keep `workers` candidates in flight, tell the oldest result first,
    stop at n told. With crash_at, die (return) right after filling the workers once crash_at
    results are in, leaving candidates in flight. Failures: every 7th trial from the 4th. With noise,
    each trial's values get a gaussian of that scale, drawn from the trial's id (so reproducible)."""
    flying = []
    told = lambda: sum(t.status != "running" for t in search.trials)
    while told() < n:
        while len(flying) < workers and told() + len(flying) < n:
            flying.append(search.ask())
        if crash_at is not None and told() >= crash_at:
            return flying
        t = flying.pop(0)
        values = [v + noise * random.Random(t.id).gauss(0, 1) for v in bowl(t.genome)[: len(search.objectives)]]
        search.tell(t.id, None if t.id % 7 == 3 else values)
    return search


@pytest.mark.parametrize("name", ["random", "cma", "tpe", "nsga2"])
def test_same_seed_same_search_and_bounds(tmp_path, name):
    objectives = ONE if name == "cma" else TWO
    a = run(Search(genome(), name, objectives, 3, tmp_path / "a"), 16)
    b = run(Search(genome(), name, objectives, 3, tmp_path / "b"), 16)
    c = run(Search(genome(), name, objectives, 4, tmp_path / "c"), 16)
    assert [t.genome for t in a.trials] == [t.genome for t in b.trials]
    assert [t.genome for t in a.trials] != [t.genome for t in c.trials]
    lo, hi = genome().bounds
    assert all(l <= v <= h for t in a.trials for v, l, h in zip(t.genome, lo, hi))


@pytest.mark.parametrize("name", ["random", "cma", "cma-noise", "tpe", "nsga2"])
def test_interrupted_then_resumed_search_equals_an_uninterrupted_one(tmp_path, name):
    objectives = TWO if name in ("random", "tpe", "nsga2") else ONE
    options, noise = ({"noise": True, "popsize": 6}, 1.0) if name == "cma-noise" else ({}, 0.0)
    name, n = name.split("-")[0], 60 if noise else 30
    make = lambda d: Search(genome(), name, objectives, 7, tmp_path / d, options)
    whole = run(make("whole"), n, noise=noise)

    part = make("part")
    in_flight = run(part, n, crash_at=n // 3, noise=noise)  # the controller dies with work in flight ...
    assert len(in_flight) == 2
    with open(tmp_path / "part" / JOURNAL, "a") as f:
        f.write('{"event": "tell", "id": ')  # ... and its last write is torn
    resumed = make("part")
    assert [t.id for t in resumed.trials if t.status == "running"] == [t.id for t in in_flight]
    run(resumed, n, noise=noise)  # in-flight work is handed out again first, then the search goes on

    told = lambda s: [(t.id, t.unit, t.replicate, t.status) for t in s.trials if t.status != "running"]
    assert told(resumed) == told(whole)
    if noise:
        assert any(t.replicate for t in whole.trials)
    assert sorted(t.id for t in resumed.trials if t.status != "running") == list(range(n))
    assert len(resumed.finished) == len(whole.finished) and resumed.front()


def test_journal_of_another_search_is_refused(tmp_path):
    run(Search(genome(), "random", TWO, 1, tmp_path), 3)
    with pytest.raises(JournalError, match="different search"):
        Search(genome(), "random", TWO, 2, tmp_path)


def test_failed_trials_never_enter_the_front_and_cannot_be_told_twice(tmp_path):
    s = Search(genome(), "nsga2", TWO, 0, tmp_path)
    t1, t2 = s.ask(), s.ask()
    s.tell(t1.id, None, {"reason": "worker crashed"})
    s.tell(t2.id, [float("nan"), 1.0])
    s.tell(s.ask().id, [0.5, 0.5])
    assert [t.status for t in s.trials] == ["failed", "failed", "done"]
    assert [t.id for t in s.front()] == [2]
    with pytest.raises(JournalError, match="already told"):
        s.tell(t1.id, [1.0, 1.0])
    events = [json.loads(l) for l in (tmp_path / JOURNAL).read_text().splitlines()]
    assert [e["info"] for e in events if e["event"] == "tell"][0] == {"reason": "worker crashed"}


def test_known_recipes_are_evaluated_first(tmp_path):
    g = genome()
    for name in ("cma", "tpe"):
        s = Search(g, name, ONE, 0, tmp_path / name)
        s.enqueue(g.uniform_average())
        first = s.ask()
        assert [m.parameters["weight"] for m in first.recipe.models[1:]] == [[0.5] * 4] * 2
        s.tell(first.id, bowl(first.genome)[:1])
        assert s.ask().genome != first.genome


def test_cma_beats_random_on_a_bowl(tmp_path):
    error = {}
    for name in ("cma", "random"):
        s = run(Search(genome(), name, ONE, 0, tmp_path / name), 200, workers=1)
        error[name] = -max(bowl(t.genome)[0] for t in s.finished)
    assert error["cma"] < error["random"] / 10, error


def test_multi_objective_front_and_hypervolume(tmp_path):
    s = run(Search(genome(), "nsga2", TWO, 0, tmp_path), 40)
    assert len(s.front()) >= 3
    assert s.hypervolume([-10.0, -10.0]) > 0


def test_unknown_optimizer_and_option():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; valid: random, cma"):
        make_optimizer("sgd", 3, ONE, 0)
    with pytest.raises(ValueError, match="popsze: not an option of optimizer 'cma'; valid: popsize, sigma0"):
        make_optimizer("cma", 3, ONE, 0, popsze=4)
    with pytest.raises(ValueError, match="popsize: Input should be greater than or equal to 2"):
        make_optimizer("cma", 3, ONE, 0, popsize=1)
    with pytest.raises(ValueError, match="restart_strategy: Input should be 'ipop' or 'bipop'"):
        make_optimizer("cma", 3, ONE, 0, restart_strategy="pop")
    with pytest.raises(ValueError, match="NSGAIISampler takes no option.s. population_siz; valid: .*population_size"):
        make_optimizer("nsga2", 3, ONE, 0, sampler_options={"population_siz": 4})
    with pytest.raises(ValueError, match="x: not an option of optimizer 'random'; valid: none"):
        make_optimizer("random", 3, ONE, 0, x=1)
    assert set(OPTIMIZERS) >= {"random", "cma", "tpe", "nsga2", "nsga3", "gp", "cmaes"}
    # every registered optimizer builds from its defaults, and its options model is what it holds
    for name, kind in OPTIMIZERS.items():
        assert isinstance(make_optimizer(name, 3, ONE, 0).options, kind.Options)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("tpe", {"sampler_options": {"n_startup_trials": [[1] * 9] * 9}}, "n_startup_trials: TPESampler takes int"),
        ("tpe", {"sampler_options": {"n_startup_trials": -1}}, "TPESampler takes a value >= 0 for this option, got -1"),
        ("tpe", {"sampler_options": {"gamma": "lambda n: n"}}, "gamma: TPESampler takes a Python object (Callable"),
        ("tpe", {"sampler_options": {"consider_prior": 1}}, "consider_prior: TPESampler takes bool or None"),
        ("tpe", {"sampler_options": {"n_ei_candidates": 10**9}}, "takes a value in [1, 100000] for this option"),
        ("nsga2", {"sampler_options": {"population_size": 4.5}}, "population_size: NSGAIISampler takes int"),
        ("nsga2", {"sampler_options": {"population_size": True}}, "NSGAIISampler takes int for this option, got True"),
        ("nsga2", {"sampler_options": {"mutation_prob": 2}}, "mutation_prob: NSGAIISampler takes a value in [0, 1]"),
        ("nsga2", {"sampler_options": {"crossover_prob": float("nan")}}, "crossover_prob: NSGAIISampler takes float"),
        ("gp", {"sampler_options": {"deterministic_objective": "yes"}}, "GPSampler takes bool for this option"),
        ("cma", {"popsize": "8"}, "popsize: Input should be a valid integer"),
        ("cma", {"popsize": 10**7}, "popsize: Input should be less than or equal to 10000"),
        ("cma", {"noise": "yes"}, "noise: Input should be a valid boolean"),
        ("cma", {"tolfun": float("inf")}, "tolfun: Input should be a finite number"),
    ],
)
def test_option_values_are_checked_by_type_and_range(name, options, message):
    with pytest.raises(ValueError) as e:
        check_options(name, options)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, e.value


def test_sampler_options_a_file_can_give_are_taken():
    check_options("tpe", {"sampler_options": {"n_startup_trials": 5, "gamma": None, "prior_weight": 0.5}})
    check_options("nsga2", {"sampler_options": {"mutation_prob": None, "crossover_prob": 1}})
    check_options("cma", {"popsize": 8, "sigma0": 1, "noise": True})


@pytest.mark.parametrize("strategy", ["ipop", "bipop"])
def test_cma_restarts(strategy):

    opt = make_optimizer("cma", 3, ONE, 0, popsize=4, restarts=3, restart_strategy=strategy, tolfun=1e-2)
    popsizes = []
    for _ in range(2000):
        x = opt.ask()
        opt.tell(x, [-sum((v - 0.5) ** 2 for v in x)])
        popsizes.append(opt.es.popsize)
    assert opt.runs == 4  # the first run and three restarts
    if strategy == "ipop":
        assert sorted(set(popsizes)) == [4, 8, 16, 32]
    else:
        assert 8 in popsizes and opt.budget["small"] > 0  # both regimes ran


def test_cma_can_start_at_the_best_seed():
    seeds = [[0.1, 0.9, 0.2], [0.8, 0.3, 0.7], [0.4, 0.4, 0.4]]
    values = {tuple(x): v for x, v in zip(seeds, [0.2, 0.9, 0.5])}  # maximized: the second is best
    for start, mean in (("middle", [0.5] * 3), ("best_seed", seeds[1])):
        opt = make_optimizer("cma", 3, ONE, 0, start=start)
        for x in seeds:
            opt.enqueue(x)
        asked = [opt.ask() for _ in range(4)]  # the three seeds, then one from the first distribution
        assert asked[:3] == seeds and asked[3] not in seeds
        for x in asked[:3]:
            opt.tell(x, [values[tuple(x)]])
        assert opt.es.mean.tolist() == pytest.approx(mean)
        assert opt.runs == 1  # starting at a seed is not a restart


@pytest.mark.parametrize("name", ["nsga3", "gp", "cmaes", "optuna-random"])
def test_other_samplers_run(tmp_path, name):
    objectives = ONE if name == "cmaes" else TWO
    s = run(Search(genome(), name, objectives, 0, tmp_path), 12)
    assert len(s.finished) >= 9 and s.front()


def noisy_cma(noise_scale, evals=600, **options):
    """CMA with noise handling on a 4-gene bowl plus gaussian noise; the asks' replicates per point."""

    opt, rng = make_optimizer("cma", 4, ONE, 0, noise=True, noise_max_evaluations=4, **options), random.Random(1)
    replicates, sigmas = defaultdict(list), []
    for _ in range(evals):
        x, r = opt.ask_replicate()
        replicates[tuple(x)].append(r)
        opt.tell(x, [-sum((v - 0.5) ** 2 for v in x) + noise_scale * rng.gauss(0, 1)])
        sigmas.append(opt.es.sigma)
    return opt, replicates, sigmas


def test_cma_noise_handling_replicates_and_adapts():
    # no noise: re-evaluations agree with the originals, so one evaluation per point and no sigma boost
    opt, replicates, _ = noisy_cma(0.0)
    assert opt.noise.evaluations == 1 and opt.noise.noiseS < 0
    assert all(len(set(r)) == len(r) for r in replicates.values())  # a point's replicates all differ
    reevaluated = [r for r in replicates.values() if len(r) > 1]
    assert reevaluated and all(r == [0, 4] for r in reevaluated)  # re-evaluations start past the max (4)
    # pure noise: measured, the evaluations per point rise to the maximum and sigma is pushed up
    opt, replicates, sigmas = noisy_cma(1.0)
    assert opt.noise.evaluations == 4 and opt.noise.noiseS > 0
    assert sorted(replicates.values(), key=len)[-1] == [0, 1, 2, 3, 4, 5, 6, 7]
    plain = noisy_cma(1.0, noise_reevals=0)[2]  # measurement off: sigma only adapts as CMA-ES does
    assert max(sigmas) > 2 * max(plain), (max(sigmas), max(plain))


def test_replicates_get_their_own_merge_seed(tmp_path):
    s = Search(genome(), "cma", ONE, 0, tmp_path, {"noise": True, "noise_max_evaluations": 3, "popsize": 4})
    s.optimizer.noise.evaluations = 3
    trials = [s.ask() for _ in range(3)]
    assert [t.replicate for t in trials] == [0, 1, 2]
    assert trials[0].genome == trials[1].genome == trials[2].genome
    assert [t.recipe.evomerge.seed for t in trials] == [0, 1, 2]


def load_view(directory):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=STUDY, storage=JournalStorage(JournalFileBackend(str(directory / OPTUNA_VIEW))))


def test_optuna_view_of_every_told_trial_survives_resume_and_loss(tmp_path):
    import optuna

    s = Search(genome(), "cma", ONE, 0, tmp_path)
    run(s, 10, crash_at=5)  # trial 3 fails, two left in flight
    study = load_view(tmp_path)
    told = [t for t in s.trials if t.status != "running"]
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.FAIL) == 1
    assert [t.user_attrs["evomerge_trial"] for t in study.trials] == [t.id for t in told]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.values for t in done] == [t.values for t in told if t.status == "done"]
    assert [t.params for t in done][0] == dict(zip([g.name for g in genome().genes], told[0].genome))
    (tmp_path / OPTUNA_VIEW).unlink()  # lost (or behind): rebuilt from the journal on resume
    resumed = run(Search(genome(), "cma", ONE, 0, tmp_path), 10)
    assert len(load_view(tmp_path).trials) == 10 == len([t for t in resumed.trials if t.status != "running"])
    assert not (tmp_path / (OPTUNA_VIEW + ".staged")).exists()


# -- multi-fidelity ---------------------------------------------------------------------------------
RUNG_DOCS = (5, 10, 20)  # documents at rungs 0, 1 and the full evaluation


def at_rung(trial, rung):
    """The bowl, blurred at the low rungs as a small sample of documents blurs a score."""
    blur = random.Random(f"{trial.id}:{rung}")
    return [v + 0.5 * blur.gauss(0, 1) / (rung + 1) for v in bowl(trial.genome)]


def run_mf(search, n, crash_at=None):
    """One worker: evaluate what ``ask`` hands out at its rung, report it; stop at n told. With
    crash_at: return the trial in flight once crash_at results are told."""
    told = lambda: sum(t.status != "running" for t in search.trials)
    while told() < n:
        t = search.ask()
        if crash_at is not None and told() >= crash_at:
            return t
        rung = t.rung if t.rung is not None else 2
        assert search.documents_for(t) == (RUNG_DOCS[rung] if rung < 2 else None)
        search.report(t.id, None if t.id % 11 == 5 else at_rung(t, rung), {"documents": 2 * RUNG_DOCS[rung]})
    return search


def test_a_rung_promotes_what_ranks_within_its_fraction_so_far(tmp_path):
    from evomerge.search.fidelity import Fidelity

    s = Search(genome(), "random", ONE, 1, tmp_path, fidelity=Fidelity((5,), 0.5))
    trials = [s.ask() for _ in range(4)]
    assert all(t.rung == 0 and not t.full for t in trials)
    # rung 0 so far: [0.2] -> 0.5 is the best of 2: promoted (top ceil(0.5 * 2) = 1)
    assert s.report(trials[0].id, [0.2]) is None  # alone at its rung: promoted
    assert s.report(trials[1].id, [0.5]) is None
    # [0.2, 0.5] + 0.1: third of 3, the top ceil(1.5) = 2 go on: stopped, told at rung 0
    stopped = s.report(trials[2].id, [0.1])
    assert stopped.status == "done" and stopped.rung == 0 and not stopped.full
    # [0.2, 0.5, 0.1] + 0.3: second of 4, top 2: promoted
    assert s.report(trials[3].id, [0.3]) is None
    assert [s.ask().id for _ in range(3)] == [trials[3].id, trials[1].id, trials[0].id]  # promoted first
    assert s.report(trials[1].id, [0.45]).full and s.finished == [trials[1]] and s.front() == [trials[1]]
    assert s.stopped_early == [trials[2]]  # the optimizer was told its rung-0 value, the front never
    failed = s.report(trials[0].id, None)
    assert failed.status == "failed" and failed.rung == 1


def test_multi_fidelity_search_fronts_full_results_and_resumes_exactly(tmp_path):
    from evomerge.search.fidelity import Fidelity

    fidelity = Fidelity(RUNG_DOCS[:2], 1 / 3)
    make = lambda d: Search(
        genome(), "nsga2", TWO, 5, tmp_path / d, {"sampler_options": {"population_size": 6}}, fidelity=fidelity
    )
    whole = make("whole")
    for point in (whole.genome.uniform_average(), whole.genome.expert_alone("expert-add")):
        whole.enqueue(point)
    run_mf(whole, 40)
    events = [json.loads(line) for line in (tmp_path / "whole" / JOURNAL).read_text().splitlines()]
    tells = [e["id"] for e in events if e["event"] == "tell"]
    assert sorted(tells) == list(range(40))  # the optimizer is told once per candidate
    promotions = [e for e in events if e["event"] == "promote"]
    assert promotions and whole.stopped_early and whole.finished
    assert [t.rung for t in whole.trials[:2]] == [2, 2]  # seeds: in full at once
    assert [t.seeded for t in whole.trials[:3]] == [True, True, False]
    assert not any(e["id"] in (0, 1) for e in promotions)
    assert all(t.full for t in whole.front())
    assert [t.id for t in whole.finished] == [t.id for t in whole.trials if t.status == "done" and t.rung == 2]
    for t in whole.trials:  # documents: every rung the trial ran, 2 tasks each
        ran = range(t.rung + 1) if t.id > 1 else [2]
        assert t.documents == sum(2 * RUNG_DOCS[r] for r in ran), t
    # most candidates stop at rung 0: far fewer documents than scoring every one in full
    assert whole.documents < 0.8 * 40 * 2 * RUNG_DOCS[2]

    part = make("part")
    for point in (part.genome.uniform_average(), part.genome.expert_alone("expert-add")):
        part.enqueue(point)
    flying = run_mf(part, 40, crash_at=15)
    with open(tmp_path / "part" / JOURNAL, "a") as f:
        f.write('{"event": "promote", "id": ')  # a torn last write
    resumed = make("part")
    assert [t.id for t in resumed.trials if t.status == "running"] == [flying.id]
    assert resumed.trials[flying.id].rung == flying.rung  # handed out again at the rung it was on
    run_mf(resumed, 40)
    final = lambda s: [(t.id, t.unit, t.status, t.rung, t.values, t.documents) for t in s.trials]
    assert final(resumed) == final(whole)


def select_points():
    """A genome choosing 1-2 of three experts (TIES), and four points: ``first``; ``other_c``, which
    differs only in the genes of expert c, left out; ``closer``, within the key's precision of
    ``first``; ``other_a``, another weight for a."""
    from evomerge.search.space import SearchSpace

    space = SearchSpace.model_validate(
        {
            "base": "base",
            "models": ["a", "b", "c"],
            "method": "ties",
            "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.1, "high": 1.0}},
            "select": {"min": 1, "max": 2},
        }
    )
    g = Genome(space, num_layers=4)
    names = [x.name for x in g.genes]
    point = {"include[a]": 0.9, "include[b]": 0.8, "include[c]": 0.1, "weight[a]": 0.3, "weight[b]": 0.6}
    point |= {"weight[c]": 0.2, "density[a]": 0.5, "density[b]": 0.7, "density[c]": 0.4}
    first = [point[n] for n in names]
    other_c = [(0.95 if n == "weight[c]" else 0.35 if n == "density[c]" else point[n]) for n in names]
    closer = [v + 1e-9 if n == "weight[a]" else v for n, v in zip(names, first)]
    other_a = [0.4 if n == "weight[a]" else v for n, v in zip(names, first)]
    return g, first, other_c, closer, other_a


def test_a_recipe_asked_while_its_twin_is_scored_waits_for_that_result(tmp_path):
    """A candidate whose recipe is being scored now is parked, not scored: told the twin's result
    (a repeat, no documents) once the twin is scored in full; handed out again when the twin failed."""
    g, first, other_c, _, other_a = select_points()
    s = Search(g, "random", TWO, 0, tmp_path / "s")
    for x in (first, other_c, other_a, other_a):
        s.enqueue(x)
    t0, t1, t2, t3 = (s.ask() for _ in range(4))
    assert [s.park(t) for t in (t0, t1, t2, t3)] == [False, True, False, True] and s.parked == 2
    s.tell(t0.id, [0.25, 0.5], {"documents": 40})
    assert [(t.id, t.values, t.info, t.documents) for t in s.release(t0)] == [
        (1, [0.25, 0.5], {"repeat_of": 0, "documents": 0}, 0)
    ]
    s.tell(t2.id, None, {"documents": 0})  # failed: says nothing final about its twin
    assert s.release(t2) == [] and s.parked == 0
    again = s.ask()
    assert again is t3 and again.status == "running" and not s.park(again)  # scored itself now
    assert s.documents == 40 and [t.id for t in s.repeats] == [1]


def test_a_recipe_scored_already_is_not_scored_again(tmp_path):
    """Recipes that merge alike (an excluded expert's genes differ, or numbers below the key's
    precision) share one key; a trial whose recipe was scored in full is told that result, marked
    as a repeat in the journal, at no document cost, and the optimizer is told it too. The journal
    replays it; with multi-fidelity the repeat counts as a full evaluation."""
    from evomerge.recipe import recipe_key
    from evomerge.search.fidelity import Fidelity

    g, first, other_c, closer, other_a = select_points()
    keys = [recipe_key(g.decode(x)) for x in (first, other_c, closer, other_a)]
    assert keys[0] == keys[1] == keys[2] != keys[3]  # c is left out: its genes do not change the merge

    s = Search(g, "nsga2", TWO, 0, tmp_path / "s", fidelity=Fidelity(rungs=(5,), promote=0.5))
    for x in (first, other_c, other_a):
        s.enqueue(x)
    t0 = s.ask()
    assert s.repeat_of(t0) is None
    s.tell(t0.id, [0.25, 0.5], {"documents": 40})
    t1, t2 = s.ask(), s.ask()
    assert s.repeat_of(t1) is t0 and s.repeat_of(t2) is None
    t1.rung = 0  # as a searched trial starts (a seed starts in full): the repeat is told in full all the same
    told = s.tell_repeat(t1, t0)
    assert (told.values, told.info, told.documents, told.full) == (
        [0.25, 0.5],
        {"repeat_of": 0, "documents": 0},
        0,
        True,
    )
    assert s.repeats == [told] and s.documents == 40
    events = [json.loads(line) for line in (tmp_path / "s" / JOURNAL).read_text().splitlines()]
    assert events[-1] == {"event": "tell", "id": 1, "values": [0.25, 0.5], "info": {"repeat_of": 0, "documents": 0}}
    again = Search(g, "nsga2", TWO, 0, tmp_path / "s", fidelity=Fidelity(rungs=(5,), promote=0.5))
    assert [t.id for t in again.repeats] == [1] and again.trials[1].full
    assert again.repeat_of(again.trials[2]) is None


def test_per_document_records_round_trip(tmp_path):
    from evomerge.search.records import RECORDS, DocumentRecords

    full = {"t": [1, 4, 7]}
    records = DocumentRecords(tmp_path, full)
    records.append(0, None, {"acc": {"t": ([1, 4, 7], [1.0, 0.0, 1.0])}, "ppl": {"t": ([4], [0.25])}})
    records.append(1, 0, {"acc": {"t": ([4], [1.0])}})
    records.append(0, None, {"acc": {"t": ([1, 4, 7], [0.0, 0.0, 1.0])}})  # evaluated again after a stop
    lines = (tmp_path / RECORDS).read_text().splitlines()
    assert json.loads(lines[0])["scores"]["acc"] == {"t": {"ids": None, "values": "101"}}  # whole set: ids left out
    assert json.loads(lines[0])["scores"]["ppl"] == {"t": {"ids": [4], "values": [0.25]}}
    with open(tmp_path / RECORDS, "a") as f:
        f.write('{"id": 2, "rung"')  # cut short by an interruption
    assert DocumentRecords(tmp_path, full).read() == {
        (0, None): {"acc": {"t": ([1, 4, 7], [0.0, 0.0, 1.0])}},  # the last line of a trial wins
        (1, 0): {"acc": {"t": ([4], [1.0])}},
    }
    # read incrementally: whole lines only, each once; the cut line waits
    first, offset = DocumentRecords(tmp_path, full).read_new(0)
    assert first == DocumentRecords(tmp_path, full).read() and offset == sum(len(line) + 1 for line in lines)
    assert DocumentRecords(tmp_path, full).read_new(offset) == ({}, offset)
    # a resumed campaign's next line drops the cut one first, so the two never run together
    records = DocumentRecords(tmp_path, full)  # the resumed process's
    records.append(2, None, {"acc": {"t": ([1, 4, 7], [1.0, 1.0, 1.0])}})
    assert (tmp_path / RECORDS).read_text().splitlines()[-2:] == [
        lines[-1],
        json.dumps(
            {"id": 2, "rung": None, "scores": {"acc": {"t": {"ids": None, "values": "111"}}}}, separators=(",", ":")
        ),
    ]
    after, end = records.read_new(offset)
    assert (
        after == {(2, None): {"acc": {"t": ([1, 4, 7], [1.0, 1.0, 1.0])}}}
        and end == (tmp_path / RECORDS).stat().st_size
    )
    (tmp_path / RECORDS).write_text('{"id": 3, "ru')  # only a cut line: dropped whole (by the next process)
    DocumentRecords(tmp_path, full).append(3, None, {"acc": {"t": ([1, 4, 7], [0.0, 1.0, 0.0])}})
    assert list(DocumentRecords(tmp_path, full).read()) == [(3, None)]
    # a whole last line cut only before its newline is kept, as read() keeps it
    (tmp_path / RECORDS).write_text(lines[0] + "\n" + lines[1])
    DocumentRecords(tmp_path, full).append(3, None, {"acc": {"t": ([1, 4, 7], [0.0, 1.0, 0.0])}})
    assert list(DocumentRecords(tmp_path, full).read()) == [(0, None), (1, 0), (3, None)]
    (tmp_path / RECORDS).write_text(lines[0] + "\n[1, 2]\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=rf"{RECORDS}:2: not a per-document record"):
        DocumentRecords(tmp_path, full).read()
    with pytest.raises(ValueError, match=rf"{RECORDS}: not a per-document record after byte 0"):
        DocumentRecords(tmp_path, full).read_new(0)


# -- a journal line that is JSON but not an event: one line naming the line, never a traceback -------
def _journal_with_every_event(directory):
    """A multi-fidelity search's journal holding each kind of event: enqueue, baseline, ask, promote,
    tell (done and failed), with trials still running; returns the journal's lines."""
    from evomerge.recipe import parse_recipe
    from evomerge.search.fidelity import Fidelity

    s = Search(genome(), "random", ONE, 1, directory, fidelity=Fidelity((5,), 0.5))
    s.enqueue(s.genome.uniform_average())
    s.add_baseline(parse_recipe(s.genome.decode(s.genome.uniform_average()).model_dump(mode="json"), "b"), "avg")
    trials = [s.ask() for _ in range(5)]  # the baseline, the enqueued point, three new ones
    assert s.report(trials[2].id, [0.5], {"documents": 10, "timings": {"total": 1.0}}) is None  # promoted
    s.report(trials[1].id, [0.1], {"documents": 20})
    s.report(trials[3].id, None, {"reason": "worker crashed"})
    return (directory / JOURNAL).read_text().splitlines()


def _reopen(directory, writable=False):
    from evomerge.search.fidelity import Fidelity

    return Search(genome(), "random", ONE, 1, directory, writable=writable, fidelity=Fidelity((5,), 0.5))


WRONG = [None, True, -1, 1.5, 7, 10**30, float("nan"), float("inf"), "x", [], [1, 2, 3], [0.5, "a"], {}, {"a": 1}]


def _mutations(event: dict):
    """``event`` with each field removed, and with each field (the event's name too) set to each
    wrong value."""
    for field in event:
        yield {k: v for k, v in event.items() if k != field}
        for value in WRONG:
            yield {**event, field: value}


def test_every_malformed_journal_line_is_refused_in_one_line_naming_it(tmp_path):
    lines = _journal_with_every_event(tmp_path / "good")
    events = [json.loads(line) for line in lines]
    assert {e["event"] for e in events} == {"header", "enqueue", "baseline", "ask", "promote", "tell"}
    bad = tmp_path / "bad"
    bad.mkdir()
    refused = tried = 0
    cases = [(n, m) for n in range(1, len(lines)) for m in _mutations(events[n])]
    cases += [(n, m) for n in (1, len(lines) - 1) for m in ([1, 2, 3], 3, "x", None, {"no_event": True}, lines[0])]
    for n, mutated in cases:
        text = mutated if isinstance(mutated, str) else json.dumps(mutated)
        if text == lines[n]:
            continue
        tried += 1
        (bad / JOURNAL).write_text("\n".join([*lines[:n], text, *lines[n + 1 :]]) + "\n")
        try:
            _reopen(bad)
        except JournalError as e:  # anything else fails the test with its traceback
            refused += 1
            assert str(e).startswith(f"{bad / JOURNAL}:"), e
            assert len(str(e).splitlines()) == 1
    assert tried > 300 and refused > 0.9 * tried, (refused, tried)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("[1, 2, 3]", "not an event (a JSON list, not an object)"),
        ('{"no_event": true}', "not an event (no 'event' field)"),
        ('{"event": "ask", "id": 6}', "ask event without 'unit'"),
        ('{"event": "tell", "id": 42, "values": [1.0]}', "tell event for trial 42, which was never asked (5 so far)"),
        ('{"event": "tell", "id": "3", "values": [1.0]}', "tell event: 'id' must be a trial number"),
        ('{"event": "tell", "id": 3, "values": [1.0, 2.0]}', "'values' has 2 values; the search has 1 objectives"),
        ('{"event": "tell", "id": 1, "values": [1.0]}', "tell event for trial 1, which was already told"),
        ('{"event": "promote", "id": 0, "values": [1.0]}', "cannot be promoted (it is at the full evaluation)"),
        ('{"event": "enqueue", "unit": [0.5]}', "enqueue event: 'unit' has 1 values; the genome has"),
        ('{"event": "launch"}', 'unknown event "launch"'),
        ('{"event": "baseline", "id": 5, "recipe": {"x": 1}, "label": "b"}', "baseline event: not a recipe"),
        ('{"event": "enqueue", "unit": [0.5, 0.5, 0.5, 0.5], "label": 3}', "enqueue event: 'label' must be a string"),
        (
            '{"event": "tell", "id": 3, "values": [1.0], "info": {"repeat_of": 42}}',
            "tell event for trial 3: 'repeat_of' names trial 42, which has no result",
        ),
    ],
)
def test_a_journal_line_that_is_not_an_event_names_its_line(tmp_path, line, problem):
    lines = _journal_with_every_event(tmp_path)
    n = len(lines) - 1  # before the last event: the middle of the journal
    (tmp_path / JOURNAL).write_text("\n".join([*lines[:n], line, lines[n]]) + "\n")
    before = (tmp_path / JOURNAL).read_bytes()
    with pytest.raises(JournalError) as e:
        _reopen(tmp_path, writable=True)
    assert str(e.value).startswith(f"{tmp_path / JOURNAL}:{n + 1}: ") and problem in str(e.value), e.value
    assert (tmp_path / JOURNAL).read_bytes() == before


def test_journal_bytes_that_are_not_text_are_a_corrupt_line(tmp_path):
    lines = _journal_with_every_event(tmp_path)
    (tmp_path / JOURNAL).write_bytes(
        "\n".join(lines[:3]).encode() + b"\n\xff\xfe\x00garbage\n" + b"[" * 100_000 + b"\n" + lines[3].encode() + b"\n"
    )
    with pytest.raises(JournalError, match=rf"{JOURNAL}:4: corrupt journal line"):
        _reopen(tmp_path)


def test_the_progress_line_counts_candidates_stopped_at_a_lower_rung_apart_from_failures(tmp_path):
    """In the run summary's words: stopped at a lower rung is a result, not a failure."""
    from evomerge.campaign import Budget, progress_line
    from evomerge.search.fidelity import Fidelity

    s = Search(genome(), "random", ONE, 1, tmp_path, fidelity=Fidelity((5,), 0.5))
    trials = [s.ask() for _ in range(4)]
    assert s.report(trials[0].id, [0.5]) is None  # promoted
    s.report(trials[1].id, [0.4])
    s.report(trials[2].id, [0.1])  # both below the best half of rung 0: stopped there
    s.report(trials[3].id, None)
    line = progress_line(s, Budget(10, None, 0.0), 0, None)
    assert " | 1 failed | 2 stopped at a lower rung" in line, line


@pytest.mark.parametrize(
    "state, problem",
    [
        ([1], "a JSON list, not an object"),
        ({"elapsed_s": "x"}, "'elapsed_s' must be a number"),
        ({"reference_point": [0.1, "a"]}, "'reference_point' must be numbers or null"),
        ({"sessions": [1]}, "'sessions' must be a list of objects"),
        ({"finished": 1}, "'finished' must be true or false"),
        ({"elapsed_s": 3.5, "finished": False, "parent_run_id": None, "sessions": [{}]}, None),
    ],
)
def test_a_campaign_state_of_another_shape_is_named(state, problem):
    """campaign.json that is JSON but not a state: one line (status and resume printed a traceback)."""
    from evomerge.campaign import state_problem

    assert state_problem(state) == problem
