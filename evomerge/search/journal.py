"""A search's event log on disk: ``journal.jsonl``, one JSON event a line, the header first.

Every event is appended (flushed and fsync'd) before it takes effect for the caller, so an
interruption loses at most the line being written; reading gives the events back in their recorded
order, for the search to replay (``evomerge.search.study``), each checked for its shape first: a
line that is JSON but not an event of this journal is refused, naming its line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

JOURNAL = "journal.jsonl"


class JournalError(ValueError):
    pass


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _unit(v) -> bool:
    return isinstance(v, list) and all(_number(x) and 0.0 <= x <= 1.0 for x in v)


def _values(v) -> bool:  # NaN and infinities are results as they came (a failure), told as such
    return isinstance(v, list) and all(_number(x) for x in v)


def _finite(v) -> bool:
    return _values(v) and all(math.isfinite(x) for x in v)


def _info(v) -> bool:
    """A result's info: an object whose known fields have their types."""
    if not isinstance(v, dict):
        return False
    timings = v.get("timings", {})
    return (
        _count(v.get("documents", 0))
        and _count(v.get("repeat_of", 0))
        and isinstance(v.get("reason", ""), str)
        and all(_number(v[k]) for k in ("attempts", "wall_s") if k in v)
        and isinstance(timings, dict)
        and all(_number(x) for x in timings.values())
    )


def _per_task(check) -> Callable[[object], bool]:
    """objective -> task -> a list of values passing ``check``."""
    return lambda v: (
        isinstance(v, dict)
        and all(
            isinstance(tasks, dict) and all(isinstance(x, list) and all(map(check, x)) for x in tasks.values())
            for tasks in v.values()
        )
    )


_ID = (_count, True, "a trial number (an integer >= 0)")
_UNIT = (_unit, True, "a list of numbers in [0, 1]")
#: event -> field -> (check, required, what it must be)
EVENTS: dict[str, dict[str, tuple[Callable[[object], bool], bool, str]]] = {
    "enqueue": {"unit": _UNIT, "label": (lambda v: isinstance(v, str), False, "a string")},
    "ask": {"id": _ID, "unit": _UNIT, "replicate": (_count, False, "an integer >= 0")},
    "baseline": {
        "id": _ID,
        "recipe": (lambda v: isinstance(v, dict), True, "a recipe (an object)"),
        "label": (lambda v: isinstance(v, str), True, "a string"),
        "expert": (lambda v: isinstance(v, str), False, "a model name (a string)"),
    },
    "promote": {
        "id": _ID,
        "values": (_finite, True, "a list of finite numbers"),
        "documents": (_count, False, "an integer >= 0"),
    },
    "anchors": {
        "fitted": (_count, True, "an integer >= 0"),
        "anchors": (_per_task(_count), True, "objective -> task -> document ids"),
        "weights": (_per_task(lambda x: _number(x) and 0.0 <= x <= 1.0), True, "objective -> task -> weights"),
    },
    "tell": {
        "id": _ID,
        "values": (lambda v: v is None or _values(v), True, "a list of numbers, or null"),
        "info": (_info, False, "an object (documents, repeat_of: integers, reason: a string, timings: numbers)"),
    },
}


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."  # a line stays one short line


def event_problem(event) -> str | None:
    """What makes ``event`` (a parsed journal line after the header) not an event, or None."""
    if not isinstance(event, dict):
        return f"not an event (a JSON {type(event).__name__}, not an object)"
    name = event.get("event")
    if not isinstance(name, str) or name not in EVENTS:
        return "not an event (no 'event' field)" if name is None else f"unknown event {_shown(name)}"
    for field, (check, required, what) in EVENTS[name].items():
        if field not in event:
            if required:
                return f"{name} event without '{field}'"
        elif not check(event[field]):
            return f"{name} event: '{field}' must be {what}, got {_shown(event[field])}"
    return None


class Journal:
    """The event log at ``path``: ``append`` one event, ``read`` them all back, ``mend`` a torn end."""

    def __init__(self, path: Path):
        self.path = path
        self._whole = 0  # bytes of the whole lines ``read`` found

    def header(self) -> dict | None:
        """The first event as written (a search's header), or None where there is no readable one:
        no file, an empty one, a first line that is not a JSON object."""
        try:
            with open(self.path, "rb") as f:
                first = json.loads(f.readline())
        except (OSError, ValueError, RecursionError):
            return None
        return first if isinstance(first, dict) else None

    @property
    def written(self) -> bool:
        """Whether the file holds anything (a header at least)."""
        return self.path.exists() and self.path.stat().st_size > 0

    def append(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def fail(self, line: int, problem: str) -> JournalError:
        """The error for line ``line`` (1-based) of the journal."""
        return JournalError(f"{self.path}:{line}: {problem}")

    def read(self, header: dict) -> list[tuple[int, dict]]:
        """The events after ``header`` with their line numbers, in their recorded order, each of a
        known kind with its fields' types. A last line cut short by an interruption is left out;
        raises ``JournalError`` for any other line that is not such an event, or a first event other
        than ``header`` (a different search wrote the journal)."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError as e:
            raise JournalError(f"{self.path}: cannot read ({e.strerror})") from None
        if lines[-1] == b"":
            lines.pop()  # the newline ending the last line
        events = []
        for n, line in enumerate(lines, 1):
            try:
                events.append((n, json.loads(line)))
            except (ValueError, RecursionError):  # not UTF-8, not JSON, nested beyond parsing
                if n == len(lines):  # a write cut short by the interruption: drop it
                    break
                raise self.fail(n, "corrupt journal line") from None
        if not events or events[0][1] != header:
            raise JournalError(
                f"{self.path}: written by a different search (optimizer, seed, genes or "
                "objectives differ); use a new campaign directory"
            )
        for n, event in events[1:]:
            problem = event_problem(event)
            if problem:
                raise self.fail(n, problem)
        self._whole = sum(len(line) + 1 for line in lines[: len(events)])
        return events[1:]

    def mend(self) -> None:
        """After ``read``: make the file end with its last whole event, so that appends follow it."""
        keep = self._whole
        if keep != self.path.stat().st_size:
            with open(self.path, "r+") as f:  # drop a torn last line, or end a whole one cut before its newline
                f.truncate(min(keep, self.path.stat().st_size))
                if keep > f.seek(0, os.SEEK_END):
                    f.write("\n")
