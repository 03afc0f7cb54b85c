"""A search's event log on disk: ``journal.jsonl``, one JSON event a line, the header first.

Every event is appended (flushed and fsync'd) before it takes effect for the caller, so an
interruption loses at most the line being written; reading gives the events back in their recorded
order, for the search to replay (``evomerge.search.study``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

JOURNAL = "journal.jsonl"


class JournalError(ValueError):
    pass


class Journal:
    """The event log at ``path``: ``append`` one event, ``read`` them all back, ``mend`` a torn end."""

    def __init__(self, path: Path):
        self.path = path
        self._whole = 0  # bytes of the whole lines ``read`` found

    @property
    def written(self) -> bool:
        """Whether the file holds anything (a header at least)."""
        return self.path.exists() and self.path.stat().st_size > 0

    def append(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self, header: dict) -> list[dict]:
        """The events after ``header``, in their recorded order. A last line cut short by an
        interruption is left out; raises ``JournalError`` for a corrupt line before it, or a first
        event other than ``header`` (a different search wrote the journal)."""
        lines = self.path.read_text().splitlines()
        events = []
        for n, line in enumerate(lines, 1):
            try:
                events.append(json.loads(line))
            except ValueError:
                if n == len(lines):  # a write cut short by the interruption: drop it
                    break
                raise JournalError(f"{self.path}:{n}: corrupt journal line") from None
        if not events or events[0] != header:
            raise JournalError(
                f"{self.path}: written by a different search (optimizer, seed, genes or "
                "objectives differ); use a new campaign directory"
            )
        self._whole = sum(len(line) + 1 for line in lines[: len(events)])  # JSON lines are ASCII
        return events[1:]

    def mend(self) -> None:
        """After ``read``: make the file end with its last whole event, so that appends follow it."""
        keep = self._whole
        if keep != self.path.stat().st_size:
            with open(self.path, "r+") as f:  # drop a torn last line, or end a whole one cut before its newline
                f.truncate(min(keep, self.path.stat().st_size))
                if keep > f.seek(0, os.SEEK_END):
                    f.write("\n")
