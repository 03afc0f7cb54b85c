import subprocess
import sys

import pytest
from conftest import REPO, TASKS_DIR

from evomerge.cli import build_parser, main


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("evomerge: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_version_and_help():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("evomerge ")
    assert "zoo" in run_cli("--help").stdout


def test_zoo_build_refuses_a_directory_that_is_not_a_zoo(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(run_cli("zoo", "build", "--out", str(tmp_path), "--preset", "micro"), str(tmp_path), "not a zoo")
    assert (tmp_path / "notes.txt").exists()


def test_eval_reports_missing_model_and_missing_task(tmp_path, zoo):
    _one_line_error(
        run_cli("--offline", "eval", str(tmp_path / "nope"), "--task", str(TASKS_DIR / "zoo_add_search.yaml")),
        "model directory not found",
    )
    _one_line_error(
        run_cli("--offline", "eval", str(zoo / "base"), "--task", str(tmp_path / "x.yaml")), "task file not found"
    )


def test_eval_refuses_a_device_this_machine_does_not_have(zoo):
    import torch

    wanted = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 where there is none)
    _one_line_error(
        run_cli(
            "--offline", "eval", str(zoo / "base"), "--task", str(TASKS_DIR / "zoo_add_search.yaml"), "--device", wanted
        ),
        f"--device: device '{wanted}'",
    )
    _one_line_error(
        run_cli(
            "--offline", "eval", str(zoo / "base"), "--task", str(TASKS_DIR / "zoo_add_search.yaml"), "--device", "tpu"
        ),
        "unknown device 'tpu'",
    )


def test_eval_scores_in_the_dtype_asked_for(zoo):
    task = str(TASKS_DIR / "zoo_sort_search.yaml")
    runs = {
        dtype: run_cli("--offline", "eval", str(zoo / "expert-sort"), "--task", task, "--limit", "20", *flag)
        for dtype, flag in (("float32", []), ("bfloat16", ["--dtype", "bfloat16", "--device", "cpu"]))
    }
    scores = {}
    for dtype, result in runs.items():
        assert result.returncode == 0, result.stderr
        assert f"on cpu in {dtype}" in result.stderr  # the loaded model's own dtype
        name, value = result.stdout.strip().splitlines()[-1].split("\t")
        scores[dtype] = float(value)
    assert 0.0 <= scores["bfloat16"] <= 1.0 and abs(scores["bfloat16"] - scores["float32"]) <= 0.2


def test_eval_refuses_pickled_checkpoints(tmp_path, zoo):
    import shutil

    import torch
    from safetensors.torch import load_file

    model_dir = tmp_path / "pickled"
    shutil.copytree(zoo / "base", model_dir)
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    _one_line_error(
        run_cli("--offline", "eval", str(model_dir), "--task", str(TASKS_DIR / "zoo_add_search.yaml")),
        "pickled",
        "pytorch_model.bin",
    )


def test_eval_scores_a_zoo_model(zoo):
    result = run_cli(
        "--offline",
        "eval",
        str(zoo / "expert-sort"),
        "--task",
        str(TASKS_DIR / "zoo_sort_search.yaml"),
        "--limit",
        "20",
    )
    assert result.returncode == 0, result.stderr
    name, value = result.stdout.strip().splitlines()[-1].split("\t")
    assert name == "zoo_sort_search" and 0.5 < float(value) <= 1.0


def test_zoo_eval_prints_the_table_and_passes_strict(zoo):
    result = run_cli("--offline", "zoo", "eval", str(zoo), "--tasks", str(TASKS_DIR), "--limit", "100", "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("base", "expert-add", "expert-rev", "expert-sort", "merge(add+sort)"):
        assert row in result.stdout
    assert "zoo quality: OK" in result.stdout


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["zoo", "build"])  # --out is required
    assert exc.value.code == 2


def test_readme_documents_the_two_commands_and_every_cli_command():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert f"evomerge {name}" in readme, name
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        for action in nested:
            for child in action.choices:
                assert f"evomerge {name} {child}" in readme, f"{name} {child}"
    makefile = (REPO / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_hub_id_in_offline_mode_fails_with_one_line():
    # The hub code path is the real one (transformers' from_pretrained); offline, it must fail cleanly.
    result = run_cli("--offline", "eval", "some-org/some-model", "--task", str(TASKS_DIR / "zoo_add_search.yaml"))
    _one_line_error(result, "some-org/some-model", "cannot load model")
