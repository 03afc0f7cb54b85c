"""Model kinship: hand-computed metrics, the CLI on the zoo (streamed from safetensors) against a
direct computation, and its bad input."""

import json
import math

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_campaign import cli, experiment

import evomerge.models.kinship as kinship
from evomerge.models.kinship import FlagRule, Kinship, layer_group


def test_metrics_by_hand(monkeypatch):
    """a = [1, 0, -1, 2], b = [2, 0, 1, 2]: dot 5, |a|^2 6, |b|^2 9; means 0.5, 1.25;
    cov = 5/4 - 0.625 = 0.625, var 1.25 and 0.6875; distance sqrt(1 + 4); products 2, 0, -1, 4:
    1 of the 3 entries both change has opposite signs."""
    monkeypatch.setattr(kinship, "CHUNK", 3)  # chunks that cross the tensor
    acc = Kinship(["a", "b"], num_layers=2, group_size=1)
    base = torch.tensor([10.0, 10.0, 10.0, 10.0])
    acc.add(
        "model.layers.0.mlp.up_proj.weight",
        [base + torch.tensor([1.0, 0, -1, 2]), base + torch.tensor([2.0, 0, 1, 2])],
        base,
    )
    (pair,) = acc.table().pairs
    assert pair["cosine"] == pytest.approx(5 / math.sqrt(54))
    assert pair["pearson"] == pytest.approx(0.625 / math.sqrt(1.25 * 0.6875))
    assert pair["euclidean"] == pytest.approx(math.sqrt(5))
    assert pair["sign_conflict"] == pytest.approx(1 / 3)
    assert pair["flags"] == []


def test_groups_and_overall_and_flags():
    acc = Kinship(["a", "b", "c"], num_layers=4, group_size=2)
    x = torch.tensor([1.0, 2.0, -1.0])
    acc.add("model.embed_tokens.weight", [x, -x, x * 1e-6])
    acc.add("model.layers.3.self_attn.q_proj.weight", [x, x, -x])
    acc.add("lm_head.weight", [x, x, x])
    table = acc.table(FlagRule(orthogonal_below=0.01))
    assert table.groups == ["embeddings", "layers 2-3", "head"]
    ab, ac, bc = table.pairs
    assert ab["groups"]["embeddings"]["cosine"] == pytest.approx(-1.0)
    assert ab["groups"]["layers 2-3"]["cosine"] == pytest.approx(1.0)
    assert ab["cosine"] == pytest.approx(1 / 3)  # (-6 + 6 + 6) / (sqrt(18) sqrt(18))
    assert ac["groups"]["embeddings"]["sign_conflict"] == 0.0
    assert bc["sign_conflict"] == pytest.approx(6 / 9)  # embeddings: 3 of 3 conflict, layers: 3 of 3, head: 0 of 3
    assert "sign-conflict" in bc["flags"]
    opposed = Kinship(["a", "b"], 1)
    opposed.add("model.layers.0.mlp.w", [x, -x * 0.5])
    assert opposed.table().pairs[0]["flags"] == ["opposed", "sign-conflict"]
    same = Kinship(["a", "b"], 1)
    same.add("model.layers.0.mlp.w", [x, x * 1.01])
    assert same.table().pairs[0]["flags"] == ["redundant"]
    tiny = Kinship(["a", "b"], 1)
    tiny.add("model.layers.0.mlp.w", [torch.tensor([1e-30, 2e-30]), torch.tensor([-1e-30, 3e-30])])
    assert tiny.table().pairs[0]["sign_conflict"] == 0.5  # their product would underflow to 0
    assert layer_group("model.layers.7.mlp.down_proj.weight", 8, 3) == "layers 6-7"
    assert layer_group("model.norm.weight", 8, 3) == "head"


def test_cli_on_the_zoo_equals_a_direct_computation(zoo, tmp_path):
    experts = ["expert-add", "expert-rev", "expert-sort"]
    out = tmp_path / "kinship.json"
    result = cli("kinship", "--base", zoo / "base", *[zoo / e for e in experts], "--json", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "expert-add ~ expert-rev" in result.stdout and "cosine by layer group" in result.stdout
    table = json.loads(out.read_text())
    base = load_file(zoo / "base" / "model.safetensors")
    deltas = {
        e: torch.cat(
            [
                (t.double() - base[k].double()).reshape(-1)
                for k, t in sorted(load_file(zoo / e / "model.safetensors").items())
            ]
        )
        for e in experts
    }
    for pair in table["pairs"]:
        a, b = deltas[pair["a"]], deltas[pair["b"]]
        assert pair["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-5)
        assert pair["pearson"] == pytest.approx(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), rel=1e-4)
        assert pair["euclidean"] == pytest.approx(float((a - b).norm()), rel=1e-5)
    assert table["groups"] == ["embeddings", "layers 0", "layers 1", "layers 2", "layers 3", "head"]


def test_cli_reads_the_experts_of_an_experiment(zoo, tmp_path):
    path = experiment(tmp_path, zoo)  # the space's experts: expert-add and expert-sort
    out = tmp_path / "k.json"
    result = cli("kinship", path, "--json", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert table["experts"] == ["expert-add", "expert-sort"] and len(table["pairs"]) == 1
    direct = cli("kinship", "--base", zoo / "base", zoo / "expert-add", zoo / "expert-sort", cwd=tmp_path)
    assert direct.stdout.splitlines()[2].split()[3:] == result.stdout.splitlines()[2].split()[3:]
    again = cli("kinship", path, "--base", zoo / "base", cwd=tmp_path)
    assert again.returncode == 2 and "--base is taken from the experiment file" in again.stderr


def test_cli_bad_input_is_one_line_and_exit_2(zoo, tmp_path):
    pair = ["--base", zoo / "base", zoo / "expert-add", zoo / "expert-rev"]
    cases = [
        (["--base", zoo / "base", zoo / "expert-add"], "give at least 2"),
        ([zoo / "expert-add", zoo / "expert-rev"], "give --base BASE_MODEL"),
        (["--base", zoo / "base", zoo / "expert-add", tmp_path / "nowhere"], "model directory not found"),
        ([REPO / "experiments" / "dfs_three_experts.yaml"], "a layer-path space has no base"),
        ([*pair, "--group-size", "0"], "--group-size"),
        ([*pair, "--json", tmp_path / "no" / "k.json"], "--json: "),
    ]
    for args, message in cases:
        result = cli("kinship", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
