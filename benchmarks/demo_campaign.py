"""The demo's experiment as the search-quality benchmarks run it: absolute paths, ``limit`` documents
per task, a budget and a seed of their own, written beside the campaign directory and run there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def demo_experiment(directory: Path, zoo: Path, limit: int, budget: int, seed: int, name: str) -> tuple[dict, Path]:
    """The demo's experiment (as a dict) over ``zoo`` with ``limit`` documents per task, and the folder
    beside ``directory`` its evaluator was written to (kept: the campaign reads it)."""
    experiment = yaml.safe_load((REPO / "experiments/demo.yaml").read_text())
    evaluator = yaml.safe_load((REPO / "evaluators/zoo_four_skills.yaml").read_text())
    evaluator.update(limit=limit, batch_size=limit)
    for o in evaluator["objectives"]:
        o["task"] = str(REPO / "evaluators" / o["task"])
    work = (directory.parent / f"{directory.name}-experiment").resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "evaluator.yaml").write_text(yaml.safe_dump(evaluator))
    experiment["models"] = {model: str(zoo / Path(p).name) for model, p in experiment["models"].items()}
    experiment.update(
        name=name,
        seed=seed,
        search_space=str(REPO / "search_spaces" / Path(experiment["search_space"]).name),
        evaluator=str(work / "evaluator.yaml"),
        budget={"max_evaluations": budget},
    )
    return experiment, work


def run_experiment(experiment: dict, work: Path, directory: Path, quiet: bool = False) -> None:
    """Write ``experiment`` into ``work`` and run it into ``directory`` with this checkout's evomerge."""
    (work / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "evomerge", "--offline", "run", str(work / "experiment.yaml")]
    out = subprocess.DEVNULL if quiet else None
    subprocess.run([*command, "--out", str(directory)], check=True, env=env, stdout=out)
