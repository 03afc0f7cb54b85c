"""Process environment: no telemetry, no progress-bar noise, and an opt-in fully offline mode.

Applied once at CLI start, before the heavy libraries are imported (they read these at import time).
Values already set by the user win, except the ones that keep our servers on loopback (SAFETY).
"""

from __future__ import annotations

import os

QUIET_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

#: Enforced whatever the environment says: a private local Ray binds the external interface otherwise.
SAFETY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def configure(offline: bool | None = None) -> None:
    """Set the quiet defaults; with ``offline`` (or ``EVOMERGE_OFFLINE=1``) forbid hub access too."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.update(SAFETY)
    if offline is None:
        offline = os.environ.get("EVOMERGE_OFFLINE", "") not in ("", "0", "false")
    if offline:
        for key, value in OFFLINE.items():
            os.environ.setdefault(key, value)
