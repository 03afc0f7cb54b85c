"""Racing on anchor documents against full evaluation, at an equal number of documents scored.

    .venv/bin/python benchmarks/racing.py --out runs/racing --full 60 --raced 120

Runs two campaigns of the demo's problem (experiments/demo.yaml: five experts, four task objectives,
NSGA-II, seeds, experts alone and hand baselines first) with the evaluator's ``limit`` raised to
``--limit`` documents per task: one scoring every candidate in full (``--full`` candidates), one
racing new candidates on their anchors (``--racing`` options, ``--raced`` candidates, more since most
cost less). The raced campaign is then cut where its documents scored reach the full campaign's
total. Printed: documents per candidate; the documents each campaign needed to reach the full
campaign's final hypervolume (results in the order they were told); and the pick at the cut (the
best mean over the objectives on the search split among results scored in full, as ``export
--best``) with its mean report score (``evomerge export --trial N --no-compare``). Needs the zoo
(``make demo`` or ``--zoo``); takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo_campaign import demo_experiment, run_experiment  # noqa: E402  (beside this script)

from evomerge.search.pareto import hypervolume  # noqa: E402


def run_campaign(
    directory: Path, zoo: Path, limit: int, budget: int, seed: int, racing: dict | None, objectives: list | None
) -> float:
    """The demo's experiment with absolute paths, ``limit`` documents per task, ``racing`` (None:
    off) and ``objectives`` (None: all four), run into ``directory``; its wall time in seconds."""
    experiment, work = demo_experiment(directory, zoo, limit, budget, seed, f"racing-{directory.name}")
    if racing is not None:
        experiment["racing"] = racing
    if objectives:
        experiment["objectives"] = objectives
        experiment["reference_point"] = {o: 0.0 for o in objectives}
    started = time.perf_counter()
    run_experiment(experiment, work, directory, quiet=True)
    return time.perf_counter() - started


def trace(directory: Path):
    """(documents so far, hypervolume of the full results so far, trial id or None) after each
    journal event that scored documents, in order; and the search."""
    from evomerge.campaign import open_campaign

    loaded = open_campaign(directory, check=False)
    search = loaded.search()
    reference, directions = loaded.reference_point, search.directions
    documents, points, out = 0, [], []
    for line in (directory / "journal.jsonl").read_text().splitlines()[1:]:
        event = json.loads(line)
        if event["event"] == "promote":
            documents += event.get("documents", 0)
            out.append((documents, out[-1][1] if out else 0.0, None))
        elif event["event"] == "tell":
            documents += event.get("info", {}).get("documents", 0)
            trial = search.trials[event["id"]]
            if trial.status == "done" and trial.full:
                points.append((trial.id, trial.values))
            hv = hypervolume([v for _, v in points], directions, reference) if points else 0.0
            out.append((documents, hv, [i for i, _ in points]))
    return out, search


def reach(steps, target: float) -> int | None:
    return next((d for d, hv, _ in steps if hv >= target - 1e-12), None)


def pick_at(steps, search, budget: int) -> int:
    """The best mean over the objectives among the full results told within ``budget`` documents."""
    within = [s for s in steps if s[0] <= budget and s[2] is not None]
    ids = within[-1][2]
    return max(ids, key=lambda i: (sum(search.trials[i].values) / len(search.trials[i].values), -i))


def what_if(directory: Path, zs=(0.0, 0.5, 1.0, 2.0)) -> dict[float, int]:
    """How many of the raced campaign's promoted candidates the rule would have stopped at each z,
    with the check sample's final RMSE per objective and the full results told before each decision."""
    from evomerge.campaign import open_campaign
    from evomerge.search.racing import Racer, stopped

    loaded = open_campaign(directory, check=False)
    search = loaded.search()
    rmse = [e.get("rmse", 0.0) for e in Racer(search, loaded.document_records(), {}).errors()]
    full, out = [], dict.fromkeys(zs, 0)
    for line in (directory / "journal.jsonl").read_text().splitlines()[1:]:
        event = json.loads(line)
        if event["event"] == "promote":
            for z in zs:
                out[z] += stopped(event["values"], [z * e for e in rmse], full, search.directions)
        elif event["event"] == "tell" and search.trials[event["id"]].full:
            if search.trials[event["id"]].status == "done":
                full.append(search.trials[event["id"]].values)
    return out


def report_score(directory: Path, trial: int, out: Path, objectives: list[str]) -> float:
    """The mean report score of ``trial`` over the campaign's ``objectives`` (an export of it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "evomerge", "--offline", "export", str(directory), "--trial", str(trial)]
    if not out.exists():  # exported by an earlier run of this script otherwise
        subprocess.run([*command, "--out", str(out), "--no-compare"], check=True, env=env, stdout=subprocess.DEVNULL)
    scores = json.loads((out / "evomerge.json").read_text())["report_scores"]
    return sum(scores[o] for o in objectives) / len(objectives)


def rs_metrics(directory: Path) -> dict[str, float]:
    from evomerge.campaign import open_campaign
    from evomerge.search.racing import Racer

    loaded = open_campaign(directory, check=False)
    return Racer(loaded.search(), loaded.document_records(), {}).metrics()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "racing")
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--full", type=int, default=60, help="candidates of the full-evaluation campaign")
    parser.add_argument("--raced", type=int, default=120, help="candidates of the raced campaign")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objectives", type=lambda v: v.split(","), help="a subset, e.g. add,sort")
    parser.add_argument("--racing", type=json.loads, default={"anchors": 0.1, "check": 0.125, "z": 2.0})
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    walls = {}
    for name, budget, racing in (("full", args.full, None), ("raced", args.raced, args.racing)):
        directory = args.out / name
        if not directory.exists():
            zoo = args.zoo.resolve()
            walls[name] = run_campaign(directory, zoo, args.limit, budget, args.seed, racing, args.objectives)
    (full, fs), (raced, rs) = trace(args.out / "full"), trace(args.out / "raced")
    budget, target = full[-1][0], full[-1][1]
    cut = [s for s in raced if s[0] <= budget]
    told = lambda steps: sum(s[2] is not None for s in steps)  # noqa: E731
    which = args.objectives or "all"
    print(f"racing {args.racing}; {args.limit} documents per task; objectives {which}; wall s {walls}")
    per = budget / told(full)
    print(f"full:  {told(full)} candidates, {budget} documents ({per:.0f} a candidate), hv {target:.4f}")
    print(
        f"raced: {told(cut)} candidates within those documents ({cut[-1][0] / told(cut):.0f} a candidate; "
        f"{len(rs.stopped_early)} of {len(rs.raced)} raced stopped on their anchors over the whole run), "
        f"hv {cut[-1][1]:.4f} at the cut, {raced[-1][1]:.4f} at {raced[-1][0]} documents"
    )
    print(f"documents to reach the full campaign's final hv: full {reach(full, target)}, raced {reach(raced, target)}")
    errors = ", ".join(f"{k} {v:.3f}" for k, v in sorted(rs_metrics(args.out / "raced").items()))
    print(f"estimate's error on the check sample: {errors}")
    print(f"promoted candidates the rule would stop at z (final RMSE): {what_if(args.out / 'raced')}")
    for name, steps, search in (("full", full, fs), ("raced", cut, rs)):
        trial = pick_at(steps, search, budget)
        objectives = [o.name for o in search.objectives]
        score = report_score(args.out / name, trial, args.out / f"export-{name}", objectives)
        print(f"{name}: pick trial {trial} ({search.trials[trial].kind}), mean report score {score:.4f}")


if __name__ == "__main__":
    main()
