"""How errors read to a user: one line, never a traceback."""

from __future__ import annotations


def first_line(e: BaseException, with_type: bool = False) -> str:
    """The first non-empty line of ``e``'s message (its type's name when it has none); with
    ``with_type``, prefixed by the type's name (``KeyError: 'x'``)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0]}" if with_type else lines[0]
