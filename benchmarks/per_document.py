"""What per-document records cost per candidate: lm-eval's evaluation of the zoo's four search tasks
(100 documents each, the demo's evaluator) with and without its per-sample records, which the task
objectives now always take (they are the per-document scores). Timed side by side, median of
``--repeats`` pairs per round, ``--rounds`` rounds.

    .venv/bin/python benchmarks/per_document.py [--zoo .cache/zoo] [--repeats 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.evaluate.lmeval import TaskSuite, wrap_model  # noqa: E402
from evomerge.models.loading import load_causal_lm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tasks = [REPO / "evaluators" / "zoo" / f"zoo_{s}_search.yaml" for s in ("add", "rev", "sort", "sub")]
    suite = TaskSuite(tasks, limit=100, subset_seed=0)
    model, tokenizer = load_causal_lm(args.zoo / "base")
    lm = wrap_model(model, tokenizer, batch_size=100)
    suite.evaluate(lm)  # warm: tokenizations, templates
    print(f"load average {os.getloadavg()[0]:.1f}; 4 tasks x 100 documents on the zoo's base")
    for _ in range(args.rounds):
        plain, records = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            suite.evaluate(lm)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            suite.evaluate(lm, log_samples=True)
            records.append(time.perf_counter() - t)
        a, b = statistics.median(plain), statistics.median(records)
        print(f"without records {a:.3f} s, with {b:.3f} s: ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
