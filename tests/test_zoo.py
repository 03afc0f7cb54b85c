import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
from conftest import TASKS_DIR
from safetensors.torch import load_file
from test_campaign import wait_for
from transformers import AutoModelForCausalLM

from evomerge.zoo.build import MANIFEST, build_zoo
from evomerge.zoo.quality import evaluate_zoo
from evomerge.zoo.skills import SKILLS
from evomerge.zoo.spec import PRESETS, ZooSpec

#: A zoo small enough to build several times in a test (seconds), used where quality is irrelevant.
MICRO = PRESETS["micro"]


def test_manifest_lists_models_skills_seeds_params_and_hashes(zoo):
    manifest = json.loads((zoo / MANIFEST).read_text())
    names = [m["name"] for m in manifest["models"]]
    assert names == ["base", "expert-add", "expert-rev", "expert-sort", "expert-sub", "expert-mul"]
    assert manifest["spec"] == PRESETS["default"].model_dump(mode="json")
    assert set(manifest["skills"]) == {"add", "rev", "sort", "sub", "mul"}
    for m in manifest["models"]:
        assert (zoo / m["path"] / "model.safetensors").is_file()
        assert not list((zoo / m["path"]).glob("*.bin"))
        n = sum(t.numel() for t in load_file(zoo / m["path"] / "model.safetensors").values())
        assert m["parameters"] == n
        assert 50_000 < n < 1_000_000  # "a few hundred thousand parameters" at most
        assert len(m["sha256"]) == 64 and isinstance(m["seed"], int)
    assert len({m["seed"] for m in manifest["models"]}) == len(names)
    assert set(manifest["versions"]) >= {"evomerge", "torch", "transformers"}


def test_model_round_trips_through_save_and_load(zoo, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(zoo / "expert-add", use_safetensors=True).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    ids = torch.tensor([[19, 22, 22, 17, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_same_seed_same_hash_other_seed_other_hash(tmp_path):
    a = build_zoo(tmp_path / "a", MICRO)
    b = build_zoo(tmp_path / "b", MICRO)
    c = build_zoo(tmp_path / "c", MICRO.model_copy(update={"seed": 1}))
    assert a["content_hash"] == b["content_hash"]
    assert [m["sha256"] for m in a["models"]] == [m["sha256"] for m in b["models"]]
    assert c["content_hash"] != a["content_hash"]
    # what the weights depend on besides the seed (a fresh build records this machine)
    assert a["reproducible_on"] == {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def test_second_build_is_a_cache_hit(tmp_path):
    first = build_zoo(tmp_path / "z", MICRO)
    stamp = (tmp_path / "z" / "base" / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    second = build_zoo(tmp_path / "z", MICRO)
    assert time.perf_counter() - started < 1.0
    assert second == first
    assert (tmp_path / "z" / "base" / "model.safetensors").stat().st_mtime_ns == stamp


def test_interrupted_build_leaves_nothing_at_the_target(tmp_path):
    def interrupt(msg):
        if msg.startswith("expert-rev"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "z", MICRO, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_a_sigkilled_build_leaves_nothing_at_the_target_and_the_next_build_clears_its_leftovers(tmp_path):
    target = tmp_path / "z"
    endless = MICRO.model_copy(update={"expert_steps": 10**9})  # killed while it trains the first expert
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from evomerge.zoo.build import build_zoo; "
            "from evomerge.zoo.spec import ZooSpec; build_zoo(sys.argv[1], "
            "ZooSpec.model_validate_json(sys.argv[2]))",
            target,
            endless.model_dump_json(),
        ]
    )
    staging = tmp_path / f".z.partial-{proc.pid}"
    wait_for(
        lambda: proc.poll() is None and (staging / "base" / "model.safetensors").is_file(),
        120,
        "the base saved in the staging directory",
    )
    proc.kill()
    proc.wait()
    assert not target.exists() and staging.is_dir()
    live = tmp_path / f".z.partial-{os.getppid()}"  # a build still running elsewhere is left alone
    live.mkdir()
    build_zoo(target, MICRO)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "z"]


def test_refuses_to_overwrite_a_directory_that_is_not_a_zoo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zoo"):
        build_zoo(tmp_path, MICRO)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_qwen2_architecture(tmp_path):
    build_zoo(tmp_path / "q", MICRO.model_copy(update={"architecture": "qwen2"}))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "expert-rev", use_safetensors=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert json.loads((tmp_path / "q" / "base" / "config.json").read_text())["model_type"] == "qwen2"


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown skill"):
        ZooSpec(experts=("poetry",))
    with pytest.raises(ValueError, match="must divide"):
        ZooSpec(hidden_size=30, num_heads=4)


def test_zoo_demonstrates_merging(zoo):
    """Experts beat the base on their skill; a task-arithmetic merge beats both experts it merges."""
    report = evaluate_zoo(zoo, TASKS_DIR, split="search", limit=100)
    base = report.scores["base"]
    for skill in report.skills:
        assert report.scores[f"expert-{skill}"][skill] >= base[skill] + SKILLS[skill].min_gain, report.table()
    assert report.winning_pairs, report.table()
    assert report.ok, "\n".join(report.failures) + "\n" + report.table()
