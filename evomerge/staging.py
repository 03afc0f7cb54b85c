"""Directories that appear whole or not at all: built in a hidden sibling, renamed into place last.

``.NAME.partial-PID`` is where process PID builds NAME; ``.NAME.old-PID`` is a replaced NAME while
the new one is renamed in. A SIGKILL can leave either behind: the next build of the same target
removes what dead processes left (and restores an old copy whose replacement never arrived).
Used by the zoo build, export and the merge engine (`evomerge merge`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """The hidden sibling in which this process builds ``target`` before renaming it into place."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # left by an earlier, interrupted call of this very process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_staging(target: Path) -> None:
    """Remove what killed builds of ``target`` left beside it: ``.NAME.partial-PID`` (and
    ``..NAME.partial-PID.partial-*``, the merge engine's own staging of it) and ``.NAME.old-PID``,
    for PIDs no longer alive. An old copy whose replacement never arrived is restored as ``target``."""
    pattern = re.compile(rf"\.\.?{re.escape(target.name)}\.(?:partial|old)-(\d+)(?:\.partial-\w+)?")
    if not target.parent.is_dir():
        return
    for entry in sorted(target.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if not found or _alive(int(found[1])):
            continue
        if entry.name == f".{target.name}.old-{found[1]}" and not target.exists():
            entry.rename(target)  # killed between moving the old copy aside and renaming the new one in
        else:
            shutil.rmtree(entry, ignore_errors=True)


def swap_into_place(staging: Path, target: Path) -> None:
    """Rename the complete ``staging`` to ``target``; an existing ``target`` is moved aside to
    ``.NAME.old-PID`` only then, and removed after."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
