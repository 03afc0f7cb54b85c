"""What lm-eval's model options cost per candidate evaluation, measured side by side in one run.

    .venv/bin/python benchmarks/lmeval_options.py [--zoo .cache/zoo] [--repeats 5]

One zoo expert, the add and sort tasks (200 documents each, search split), evaluated ``--repeats``
times with the same resident model and task suite, as a worker does for successive candidates:
- ``batch_size: 64`` (fixed);
- ``batch_size: auto`` as lm-eval's HFLM does it alone: the largest batch is detected again on
  every call (a forward pass of max_batch_size x max_length, and an OOM search on a GPU);
- ``batch_size: auto`` as evomerge's ``wrap_model`` does it: detected on the first call (once per
  request kind) and remembered, since every candidate sends the same requests (the median hides
  the first call);
- ``apply_chat_template`` with the zoo's chat template (prompts rendered through Jinja per document).
Each configuration is evaluated once untimed first (as a worker's first candidate warms its caches);
prints seconds per evaluation (median) and the ratio to the fixed batch size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge import environment  # noqa: E402

environment.configure(offline=True)

import torch  # noqa: E402

from evomerge.evaluate.lmeval import TaskSuite, wrap_model  # noqa: E402
from evomerge.models.loading import load_causal_lm  # noqa: E402


def timed(suite, lm, repeats, forget=False) -> tuple[float, float]:
    seconds, scores = [], None
    with contextlib.redirect_stdout(io.StringIO()):  # warm-up: tokenizations, compiled templates
        suite.evaluate(lm)
    for _ in range(repeats):
        if forget:  # lm-eval's own behaviour: the batch size is detected anew on every call
            lm.batch_found.clear()
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # lm-eval prints its batch size detection
            out = suite.evaluate(lm)["results"]
        seconds.append(time.perf_counter() - started)
        scores = out
    return statistics.median(seconds), scores["zoo_sort_search"]["acc,none"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(REPO / ".cache" / "zoo"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tasks = [REPO / "evaluators" / "zoo" / f"zoo_{s}_search.yaml" for s in ("add", "sort")]
    model, tok = load_causal_lm(Path(args.zoo) / "expert-sort")
    plain = TaskSuite(tasks)
    chat = TaskSuite(tasks, evaluate_kwargs={"apply_chat_template": True})
    fixed = wrap_model(model, tok, batch_size=64)
    lmeval_auto = wrap_model(model, tok, batch_size="auto", max_batch_size=64)
    ours = wrap_model(model, tok, batch_size="auto", max_batch_size=64)
    rows = [
        ("batch_size 64", *timed(plain, fixed, args.repeats)),
        ("auto, lm-eval alone (re-detected per call)", *timed(plain, lmeval_auto, args.repeats, forget=True)),
        ("auto, detected once per worker", *timed(plain, ours, args.repeats)),
        ("batch_size 64 + apply_chat_template", *timed(chat, fixed, args.repeats)),
    ]
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    found = sorted(set(ours.batch_found.values()))
    print(f"400 documents per evaluation, median of {args.repeats}; auto found batch size(s) {found}")
    base = rows[0][1]
    print(f"{'configuration':<46}{'s/eval':>8}{'ratio':>8}{'sort acc':>10}")
    for name, seconds, acc in rows:
        print(f"{name:<46}{seconds:>8.3f}{seconds / base:>8.2f}{acc:>10.3f}")


if __name__ == "__main__":
    main()
