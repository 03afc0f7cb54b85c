"""Expert selection as genes: the decode's rules, the genome under CMA-ES (thresholded continuous)
and Optuna (categorical), the bad input refused before compute, and a campaign that selects."""

import json

import pytest
import yaml
from conftest import REPO
from test_campaign import cli, experiment

from evomerge.search.optimizers import make_optimizer
from evomerge.search.space import SearchSpace, SpaceError, load_space, make_genome

FIVE = ["a", "b", "c", "d", "e"]


def space(**overrides):
    data = {
        "base": "base",
        "models": FIVE,
        "method": "consensus_ta",
        "parameters": {"weight": {"low": 0.0, "high": 1.0}},
        "select": {"min": 2, "max": 3},
    }
    data.update(overrides)
    return SearchSpace.model_validate(data)


def merged(genome, include: list[float]) -> list[str]:
    x = [0.5] * genome.dimension
    for i, g in enumerate(genome.genes):
        if g.param == "include":
            x[i] = include[FIVE.index(g.model)]
    return [m.model for m in genome.decode(x).models if m.model != "base"]


def test_decode_rules():
    genome = make_genome(space(), 4)
    assert [g.name for g in genome.genes[:5]] == [f"include[{m}]" for m in FIVE]
    assert all(g.choices == 2 for g in genome.genes[:5]) and all(g.choices == 0 for g in genome.genes[5:])
    assert merged(genome, [0.9, 0.1, 0.6, 0.2, 0.3]) == ["a", "c"]  # at 0.5 and above
    assert merged(genome, [0.1, 0.2, 0.3, 0.45, 0.0]) == ["c", "d"]  # too few: the largest genes join
    assert merged(genome, [0.0, 0.0, 0.0, 0.0, 0.0]) == ["a", "b"]  # ties: the space's order
    assert merged(genome, [0.9, 0.6, 0.7, 0.8, 0.55]) == ["a", "c", "d"]  # too many: the largest stay
    recipe = genome.decode([0.5] * 5 + [0.3] * 5)
    assert genome.encode(recipe)[:5] == [0.75, 0.75, 0.75, 0.25, 0.25]  # uniform: all, capped at 3
    alone = genome.expert_alone("d")
    assert merged(genome, alone[:5]) == ["a", "d"]  # min 2: the first other expert joins
    fixed = make_genome(space(select={"experts": ["d", "e"], "min": 0}), 4)
    assert [g.name for g in fixed.genes if g.param == "include"] == ["include[d]", "include[e]"]
    x = [0.5] * fixed.dimension
    x[0] = x[1] = 0.0
    assert [m.model for m in fixed.decode(x).models if m.model != "base"] == ["a", "b", "c"]


def test_bad_selections_are_refused_with_the_field():
    cases = [
        ({"select": {"min": 0}}, "select: every expert has an inclusion gene and select.min is 0"),
        ({"select": {"min": 1}}, "select.min: consensus_ta needs at least 2 experts"),
        ({"method": "pcb", "models": ["a"], "select": None}, "models: pcb needs at least 2 experts"),
        ({"parameters": {"weight": {"low": 0, "high": 1}, "k": {"fixed": 3}}}, "parameters.k: k up to 3 is larger"),
        ({"select": {"experts": ["z"]}}, "select.experts: 'z' is not one of the space's models"),
        ({"select": {"min": 3, "max": 2}}, "select.max: 2 is below select.min"),
        ({"select": {"min": 6}}, "select.min: 6 is more than the space's 5 models"),
        # a gene at the box's edge rounds like the merge does: 2.5 -> 3, more than 2 experts
        ({"parameters": {"weight": {"low": 0, "high": 1}, "k": {"low": 1, "high": 2.5}}}, "k up to 2.5 is larger"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            space(**overrides)


def test_optuna_samples_inclusion_genes_as_categories_and_cma_as_continuous():
    genome = make_genome(space(), 4)
    categories = [g.choices for g in genome.genes]
    tpe = make_optimizer("tpe", genome.dimension, [], 0, categories=categories)
    import optuna

    assert all(isinstance(tpe.dists[f"x{i}"], optuna.distributions.CategoricalDistribution) for i in range(5))
    assert isinstance(tpe.dists["x5"], optuna.distributions.FloatDistribution)
    tpe.enqueue([0.9, 0.1, 0.6, 0.2, 0.3] + [0.5] * 5)
    first = tpe.ask()
    assert first[:5] == [0.75, 0.25, 0.75, 0.25, 0.25]  # the enqueued point, as categories
    trial = tpe.open[tuple(first)][0]
    assert [trial.params[f"x{i}"] for i in range(5)] == [1, 0, 1, 0, 0]
    for _ in range(5):
        assert set(tpe.ask()[:5]) <= {0.25, 0.75}
    cma = make_optimizer("cma", genome.dimension, [], 0, categories=categories)
    asked = [cma.ask()[:5] for _ in range(6)]
    assert len({v for row in asked for v in row}) > 10  # continuous


def test_shipped_space_and_a_run_refused_before_compute(zoo, tmp_path):
    shipped = load_space(REPO / "search_spaces" / "five_experts_select.yaml")
    assert shipped.fewest_experts == 2 and len(shipped.models) == 5
    bad = tmp_path / "bad_space.yaml"
    data = yaml.safe_load((REPO / "search_spaces" / "five_experts_select.yaml").read_text())
    data["select"] = {"min": 0}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError, match="a candidate could merge no expert"):
        load_space(bad)
    models = {m: str(zoo / m) for m in ["base", *shipped.models]}
    path = experiment(tmp_path, zoo, models=models, search_space=str(bad), reference_point=None)
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "select: every expert has an inclusion gene and select.min is 0" in result.stderr
    assert not (tmp_path / "campaign").exists()


def test_a_campaign_selects_experts_and_logs_their_kinship(zoo, tmp_path):
    """Optuna's random sampler over a 4-expert pool, 2 to 3 merged per candidate, consensus TIES."""
    pool = ["expert-add", "expert-rev", "expert-sort", "expert-sub"]
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "base": "base",
                "models": pool,
                "method": "consensus_ties",
                "parameters": {"weight": {"low": 0.5, "high": 1.5}, "density": {"fixed": 0.5}},
                "select": {"min": 2, "max": 3},
            }
        )
    )
    path = experiment(
        tmp_path,
        zoo,
        models={m: str(zoo / m) for m in ["base", *pool]},
        search_space=str(space_file),
        optimizer={"name": "optuna-random", "options": {}},
        budget={"max_evaluations": 10},
    )
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kinship of 4 experts logged" in result.stdout + result.stderr
    from evomerge import campaign

    loaded = campaign.open_campaign(tmp_path / "campaign", check=False)
    search = loaded.search()
    selections = set()
    in_space = [t for t in search.trials if t.expert is None]
    for trial in in_space:
        experts = [m.model for m in search.genome.decode(trial.genome).models if m.model != "base"]
        assert 2 <= len(experts) <= 3 and set(experts) <= set(pool)
        selections.add(tuple(experts))
        assert trial.status == "done"
    # the seeds alone give four selections: the uniform average (all four, capped to the first three)
    # and the space's nearest point to each expert alone (min 2: the first other expert joins it),
    # labelled as such; each expert is scored as itself too, outside the space (its own weights)
    assert len(selections) >= 3 and {len(s) for s in selections} == {2, 3}
    assert [t.label for t in in_space[:5]] == ["uniform average"] + [f"nearest to {m} alone in the space" for m in pool]
    alone = [t for t in search.trials if t.expert]
    assert [t.expert for t in alone] == pool and all(t.status == "done" and t.unit is None for t in alone)
    assert [(t.recipe.merge_method, [(m.model, m.parameters) for m in t.recipe.models]) for t in alone] == [
        ("linear", [(m, {"weight": 1.0})]) for m in pool
    ]
    pareto = cli("pareto", tmp_path / "campaign", cwd=tmp_path).stdout.splitlines()
    listed = pareto[pareto.index("experts alone:") + 1 :][:4]
    assert [line.rsplit("  ", 1)[1].split(" (")[0] for line in listed] == [f"{m} alone" for m in pool]
    from mlflow import MlflowClient

    from evomerge.tracking.mlflow_tracker import local_store

    uri, _ = local_store(tmp_path / "campaign")
    client = MlflowClient(tracking_uri=uri)
    run_id = loaded.state["parent_run_id"]
    table = json.loads(open(client.download_artifacts(run_id, "kinship.json", str(tmp_path))).read())
    assert table["experts"] == pool and len(table["pairs"]) == 6
    assert client.get_run(run_id).data.tags["evomerge.kinship_flags"] == "none"
    tagged = client.search_runs([loaded.state["experiment_id"]], "tags.expert_alone != ''")
    assert sorted(r.data.tags["expert_alone"] for r in tagged) == sorted(pool)
