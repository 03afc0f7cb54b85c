"""Reading YAML config files into validated models, with one-line errors naming file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def read_yaml(path: str | Path, error: type[Exception]) -> Any:
    """The parsed YAML of ``path``; unreadable files and YAML syntax errors raise ``error``."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def field_path(loc: tuple) -> str:
    """pydantic's error location as a field path: ``models[0].parameters``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(e: ValidationError, unsupported: dict[str, str] | None = None) -> str:
    """The first validation error in one line: the field path and what is wrong with it.

    ``unsupported``: known-but-unsupported key -> what it is, added to the message.
    """
    err = e.errors()[0]
    loc = field_path(tuple(err["loc"]))
    key = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        why = (unsupported or {}).get(key)
        return f"unsupported key '{loc}'" + (f" ({why} is not supported)" if why else "")
    if err["type"] == "missing":
        return f"missing required field '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
