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
        self._mended = False  # the file's end checked (once: only an earlier process can have torn it)

    def append(self, trial_id: int, rung: int | None, scores: PerDocument) -> None:
        """Append one evaluation's line (fsynced). A last line cut short by an interruption is
        dropped first, so that it never runs into this one."""
        if not self._mended:
            self._mend()
            self._mended = True
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

    def _mend(self) -> None:
        """End the file with its last whole line, as ``read`` sees it: a last line that parses but
        lacks its newline gets one; one that an interruption cut short is cut off."""
        try:
            with open(self.path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                end = size
                while end > 0:  # back, a block at a time, to the last newline (or the start)
                    start = max(0, end - (1 << 16))
                    f.seek(start)
                    cut = f.read(end - start).rfind(b"\n")
                    if cut >= 0:
                        end = start + cut + 1
                        break
                    end = start
                if end == size:
                    return
                f.seek(end)
                try:
                    self._parse(f.read().decode())
                    f.write(b"\n")
                except (ValueError, KeyError, TypeError, AttributeError):
                    f.truncate(end)
        except FileNotFoundError:
            return

    def _parse(self, text: str) -> tuple[tuple[int, int | None], PerDocument]:
        line = json.loads(text)
        scores = {
            objective: {
                task: (self.full_ids[task] if rec["ids"] is None else rec["ids"], _decode(rec["values"]))
                for task, rec in tasks.items()
            }
            for objective, tasks in line["scores"].items()
        }
        return (int(line["id"]), line["rung"]), scores

    def read(self) -> dict[tuple[int, int | None], PerDocument]:
        """(trial id, rung) -> objective -> task -> (ids, scores); the last line of each wins. A last
        line cut short by an interruption is left out."""
        if not self.path.exists():
            return {}
        out = {}
        lines = self.path.read_text().splitlines()
        for n, text in enumerate(lines, 1):
            try:
                key, scores = self._parse(text)
            except (ValueError, KeyError, TypeError, AttributeError):
                if n == len(lines):
                    break
                raise ValueError(f"{self.path}:{n}: not a per-document record") from None
            out[key] = scores
        return out

    def read_new(self, offset: int) -> tuple[dict[tuple[int, int | None], PerDocument], int]:
        """The lines ended with a newline from byte ``offset`` on, as ``read`` gives them, and the
        offset after the last of them: a reader that keeps the offset parses each line once (a line
        not yet ended waits for the next call)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return {}, offset
        end = data.rfind(b"\n") + 1
        out = {}
        for text in data[:end].decode().splitlines():
            try:
                key, scores = self._parse(text)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{self.path}: not a per-document record after byte {offset}") from None
            out[key] = scores
        return out, offset + end
