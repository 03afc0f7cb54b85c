"""The default campaign end to end (experiments/demo.yaml), per optimizer: time, rate, front quality.

    .venv/bin/python benchmarks/campaign.py [--optimizers nsga2,random,tpe] [--zoo .cache/zoo]

Each optimizer runs the demo experiment (160 candidates, 2 workers, MLflow tracking to a local store)
in a fresh temporary campaign directory. Reported: wall time of the whole `run` (Ray and workers
start-up included) and of the search loop alone, candidates per second in the loop, the final
hypervolume against the origin (scores in [0, 1]), the front size, the best score per skill, the best
mean over the skills of a searched candidate and of a hand baseline (search split), and the seconds
the MLflow thread needed after the search ended to finish logging.
The pool alone (benchmarks/pool.py) gives the throughput ceiling of the same workers.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure(offline=True)

import yaml  # noqa: E402

from evomerge import campaign  # noqa: E402


class Quiet(campaign.Display):
    def __init__(self):
        super().__init__(stream=io.StringIO())


def run(optimizer: str, tmp: Path) -> dict:
    data = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    data["optimizer"] = {"name": optimizer, "options": data["optimizer"]["options"] if optimizer == "nsga2" else {}}
    data["models"] = {k: str((REPO / "experiments" / v).resolve()) for k, v in data["models"].items()}
    for key in ("search_space", "evaluator"):
        data[key] = str((REPO / "experiments" / data[key]).resolve())
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    started = time.perf_counter()
    loaded = campaign.prepare(path, tmp / "campaign")
    first = {}

    def on_result(trial):
        first.setdefault("t", time.perf_counter())
        first["last"] = time.perf_counter()

    summary = campaign.run(loaded, display=Quiet(), on_result=on_result)
    total = time.perf_counter() - started
    search = loaded.search()
    done = search.finished
    mean = lambda t: sum(t.values) / len(t.values)  # noqa: E731
    return {
        "names": [o.name for o in loaded.objectives],
        "total": total,
        "loop": first["last"] - first["t"],
        "n": summary["evaluations"],
        "hv": summary["hypervolume"],
        "front": len(summary["front"]),
        "best": [max(t.values[j] for t in done) for j in range(len(loaded.objectives))],
        "searched": max(mean(t) for t in done if not (t.seeded or t.baseline)),
        "baseline": max((mean(t) for t in done if t.baseline), default=float("nan")),
        "drain": total - (first["last"] - started),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizers", default="nsga2,random,tpe")
    args = ap.parse_args()
    if not (REPO / ".cache" / "zoo" / "manifest.json").exists():
        raise SystemExit("no zoo at .cache/zoo: run `make demo` first")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus; experiments/demo.yaml (160 candidates, 2 workers)")
    for i, name in enumerate(args.optimizers.split(",")):
        with tempfile.TemporaryDirectory(prefix="campaign-bench-") as tmp:
            r = run(name, Path(tmp))
        if i == 0:
            print(
                f"{'optimizer':<10}{'run s':>8}{'loop s':>8}{'cand/s':>8}{'hypervolume':>13}{'front':>7}"
                + "".join(f"{'best ' + n:>10}" for n in r["names"])
                + f"{'mean searched':>15}{'mean baseline':>15}{'after loop s':>14}"
            )
        print(
            f"{name:<10}{r['total']:>8.1f}{r['loop']:>8.1f}{(r['n'] - 1) / r['loop']:>8.2f}{r['hv']:>13.4f}"
            f"{r['front']:>7}"
            + "".join(f"{b:>10.3f}" for b in r["best"])
            + f"{r['searched']:>15.3f}{r['baseline']:>15.3f}{r['drain']:>14.1f}"
        )


if __name__ == "__main__":
    main()
