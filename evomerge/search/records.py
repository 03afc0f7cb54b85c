"""Per-document records: which documents each scored candidate got right, per objective.

``per_document.jsonl`` in the campaign directory, one line per evaluation of a candidate (a trial's
rung, or its full evaluation), appended before its result is told; a trial evaluated again after an
interruption appends again, and the last line of a (trial, rung) is the one read. A line::

    {"id": 12, "rung": null, "scores": {"add": {"zoo_add_search": {"ids": null, "values": "0110..."}}}}

per objective, per task: the documents' scores in ascending id order; ``ids`` is null when they
are the task's whole search set (``campaign.json``'s ``documents``), else the ids (a multi-fidelity
rung's subset); ``values`` is a string of 0/1 where every score is 0 or 1 (exact match, accuracy,
pass@1 on one sample), else a list of numbers. A candidate told an earlier candidate's result (a
repeat) has no line of its own. Objectives without documents (perplexity) have none either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RECORDS = "per_document.jsonl"

#: objective -> task -> (document ids, scores)
PerDocument = dict[str, dict[str, tuple[list[int], list[float]]]]


def _encode(values: list[float]) -> str | list[float]:
    if all(v in (0.0, 1.0) for v in values):
        return "".join("1" if v else "0" for v in values)
    return [round(float(v), 6) for v in values]


def _decode(values: str | list[float]) -> list[float]:
    return [float(c) for c in values] if isinstance(values, str) else [float(v) for v in values]


class DocumentRecords:
    """The per-document records of one campaign directory; ``full_ids``: task -> its search documents."""

    def __init__(self, directory: str | Path, full_ids: dict[str, list[int]] | None = None):
        self.path = Path(directory) / RECORDS
        self.full_ids = full_ids or {}

    def append(self, trial_id: int, rung: int | None, scores: PerDocument) -> None:
        line = {"id": trial_id, "rung": rung, "scores": {}}
        for objective, tasks in scores.items():
            line["scores"][objective] = {
                task: {"ids": None if ids == self.full_ids.get(task) else ids, "values": _encode(values)}
                for task, (ids, values) in tasks.items()
            }
        with open(self.path, "a") as f:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> dict[tuple[int, int | None], PerDocument]:
        """(trial id, rung) -> objective -> task -> (ids, scores); the last line of each wins. A last
        line cut short by an interruption is left out."""
        if not self.path.exists():
            return {}
        out = {}
        lines = self.path.read_text().splitlines()
        for n, text in enumerate(lines, 1):
            try:
                line = json.loads(text)
                scores = {
                    objective: {
                        task: (self.full_ids[task] if rec["ids"] is None else rec["ids"], _decode(rec["values"]))
                        for task, rec in tasks.items()
                    }
                    for objective, tasks in line["scores"].items()
                }
            except (ValueError, KeyError, TypeError, AttributeError):
                if n == len(lines):
                    break
                raise ValueError(f"{self.path}:{n}: not a per-document record") from None
            out[(int(line["id"]), line["rung"])] = scores
        return out
