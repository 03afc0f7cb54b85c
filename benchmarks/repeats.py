"""Repeats in a campaign: candidates whose recipe was scored in full already, told that result at no
document cost instead of being scored again.

    .venv/bin/python benchmarks/repeats.py [--campaign DIR] [--experiment experiments/demo.yaml]

Reads the campaign's journal (runs the experiment into DIR first when DIR has no campaign): trials
told, repeats among them (and of which earlier trial), documents scored, and the documents the
repeats would have cost (each repeat's original's documents).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaign", type=Path, default=Path("runs/repeats-demo"))
    parser.add_argument("--experiment", type=Path, default=REPO / "experiments" / "demo.yaml")
    args = parser.parse_args()
    if not (args.campaign / "journal.jsonl").exists():
        cmd = [sys.executable, "-m", "evomerge", "--offline", "run", str(args.experiment), "--out", str(args.campaign)]
        subprocess.run(cmd, check=True, cwd=REPO)
    events = [json.loads(line) for line in (args.campaign / "journal.jsonl").read_text().splitlines()[1:]]
    tells = {e["id"]: e for e in events if e["event"] == "tell"}
    repeats = {i: e["info"]["repeat_of"] for i, e in tells.items() if "repeat_of" in e.get("info", {})}
    scored = sum(e.get("info", {}).get("documents", 0) for e in tells.values())
    saved = sum(tells[original]["info"].get("documents", 0) for original in repeats.values())
    print(f"campaign: {args.campaign}")
    print(f"trials told: {len(tells)}; repeats: {len(repeats)} ({len(repeats) / max(1, len(tells)):.1%})")
    print("repeat -> original: " + ", ".join(f"{r}->{o}" for r, o in sorted(repeats.items())))
    share = saved / max(1, scored + saved)
    print(f"documents scored: {scored}; documents the repeats would have cost: {saved} ({share:.1%})")


if __name__ == "__main__":
    main()
