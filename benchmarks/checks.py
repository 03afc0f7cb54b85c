"""How long bad input takes to be refused: the checks that run before a campaign writes anything.

    .venv/bin/python benchmarks/checks.py [--zoo .cache/zoo]

Reported, for the demo experiment (experiments/demo.yaml) and broken copies of it:
- the in-process check (``check_experiment``) without and with the task check (which loads the
  lm-eval tasks of the search and report splits and reads which metrics they report);
- wall time of ``evomerge run`` (a fresh Python process, imports included) until it exits 2, for an
  expert with one tensor of another shape and for an objective naming a metric the task lacks;
  before these checks existed, both were noticed only inside a started worker (about 25 s);
- reading the tensor specs of a 512 MiB safetensors file from its header (no tensor data read).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure(offline=True)

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from evomerge.experiment import check_experiment, load_experiment  # noqa: E402
from evomerge.models.tensors import tensor_specs  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def refuse_seconds(experiment: Path, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "--offline", "run", str(experiment)], cwd=cwd, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-2000:]
    return seconds, result.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    demo = REPO / "experiments" / "demo.yaml"
    exp = load_experiment(demo)
    print(
        "check_experiment(demo), no task check:   "
        f"{timed(lambda: check_experiment(exp, demo, check_tasks=False)):.3f} s"
    )
    first = timed(lambda: check_experiment(exp, demo), repeats=1)  # lm-eval and datasets imported here
    print(
        f"check_experiment(demo), with task check: {first:.2f} s first in the process, "
        f"{timed(lambda: check_experiment(exp, demo)):.3f} s again"
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = yaml.safe_load(demo.read_text())
        data["models"] = {k: str((demo.parent / v).resolve()) for k, v in data["models"].items()}
        data["search_space"] = str((demo.parent / data["search_space"]).resolve())
        data["output_dir"] = str(tmp / "never")
        reshaped = tmp / "reshaped"
        shutil.copytree(args.zoo / "expert-sort", reshaped)
        state = load_file(reshaped / "model.safetensors")
        name = "model.layers.0.mlp.up_proj.weight"
        state[name] = torch.cat([state[name], state[name][:1]])
        save_file(state, reshaped / "model.safetensors", metadata={"format": "pt"})
        shape = tmp / "shape.yaml"
        shape.write_text(
            yaml.safe_dump(
                {
                    **data,
                    "models": {**data["models"], "expert-sort": str(reshaped)},
                    "evaluator": str((demo.parent / data["evaluator"]).resolve()),
                }
            )
        )
        evaluator = yaml.safe_load((demo.parent / data["evaluator"]).read_text())
        evaluator["objectives"][1]["metric"] = "no_such_metric"
        for o in evaluator["objectives"]:
            o["task"] = str((demo.parent / "../evaluators" / o["task"]).resolve())
        (tmp / "evaluator.yaml").write_text(yaml.safe_dump(evaluator))
        metric = tmp / "metric.yaml"
        metric.write_text(yaml.safe_dump({**data, "evaluator": str(tmp / "evaluator.yaml")}))
        for label, path in (("tensor shape differs", shape), ("metric not reported", metric)):
            seconds, line = refuse_seconds(path, tmp)
            print(f"evomerge run, {label}: refused in {seconds:.2f} s (exit 2): {line[:110]}...")
            assert not (tmp / "never").exists()

        big = tmp / "big"
        big.mkdir()
        save_file({f"t{i}": torch.zeros(1024, 1024) for i in range(128)}, big / "model.safetensors")
        (big / "config.json").write_text(json.dumps({}))
        size = (big / "model.safetensors").stat().st_size
        seconds = timed(lambda: tensor_specs(str(big), local=True), repeats=5)
        print(f"tensor specs from the header of a {size / 2**20:.0f} MiB file (128 tensors): {seconds * 1000:.2f} ms")


if __name__ == "__main__":
    main()
