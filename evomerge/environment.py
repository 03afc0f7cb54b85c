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
    # "Using the latest cached version of ..." for every offline dataset and metric load
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "EVALUATE_VERBOSITY": "error",
}

#: Enforced whatever the environment says: a private local Ray binds the external interface otherwise.
SAFETY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

#: Bounds on each MLflow HTTP request (MLflow's own variables; a user's values win). MLflow's
#: defaults retry a request 7 times with a backoff of up to 2 minutes, each try waiting 120 s for an
#: answer, and honour any Retry-After a proxy sends: a server that dies or stops answering would hold
#: a campaign for hours. Here a request gives up after 3 tries of at most 20 s each, 2 s apart.
MLFLOW_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}


def configure(offline: bool | None = None) -> None:
    """Set the quiet defaults; with ``offline`` (or ``EVOMERGE_OFFLINE=1``) forbid hub access too."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    bound_mlflow()
    os.environ.update(SAFETY)
    if offline is None:
        offline = os.environ.get("EVOMERGE_OFFLINE", "") not in ("", "0", "false")
    if offline:
        for key, value in OFFLINE.items():
            os.environ.setdefault(key, value)


def bound_mlflow() -> None:
    """MLflow's HTTP requests bounded (``MLFLOW_BOUNDS``) unless the user set their own values."""
    for key, value in MLFLOW_BOUNDS.items():
        os.environ.setdefault(key, value)


def mlflow_request_bound_s() -> float:
    """The longest one MLflow HTTP request can take under the bounds in force: every try waiting
    its timeout twice (to connect, then for the answer), plus the backoffs between tries."""
    try:
        timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 120)
        retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") or 7)
        factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR") or 2)
        jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER") or 1)
    except ValueError:  # MLflow refuses such values itself, at its first request
        return 60.0
    backoffs = sum(min(120.0, factor * 2 ** (n - 1) + jitter) for n in range(2, retries + 1))
    return (retries + 1) * 2 * timeout + backoffs
