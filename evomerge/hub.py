"""Publishing an export to the Hugging Face Hub (``evomerge export --push-to-hub ORG/NAME``).

Checked before anything is merged (``check_push``): a repository id of the form ``namespace/name``
that the hub accepts, a network (not ``--offline``), and a token from huggingface_hub's own login or
environment (``hf auth login``, ``HF_TOKEN``). The push happens after the export is complete and
scored (``push``): the repository is created if it does not exist (private with ``private``), and the
whole export directory is uploaded in one commit: weights, config, tokenizer, the model card with
its report scores, the recipe and ``evomerge.json``. The token is huggingface_hub's to send; evomerge
never reads it into a message, a log or MLflow. ``HF_ENDPOINT`` selects another hub (the tests point
it at a local recording server).
"""

from __future__ import annotations

from pathlib import Path


class PushError(ValueError):
    """A push that cannot be done, or that failed; the message is one line."""


def check_push(repo_id: str) -> None:
    """Refuse, before any work, a push that cannot succeed (see the module docstring)."""
    from huggingface_hub import get_token
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise PushError(f"--push-to-hub {repo_id!r}: give the repository as namespace/name (your user or an org)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(
            f"--push-to-hub {repo_id!r}: not a repository id the hub accepts ({str(e).splitlines()[0]})"
        ) from None
    if is_offline_mode():
        raise PushError("--push-to-hub needs the network: run without --offline (and without HF_HUB_OFFLINE=1)")
    if not get_token():
        raise PushError(
            "--push-to-hub: no Hugging Face token found: log in with `hf auth login` or set HF_TOKEN "
            "(evomerge never asks for it itself)"
        )


def push(directory: Path, repo_id: str, private: bool, message: str) -> str:
    """Upload the export ``directory`` to ``repo_id`` in one commit; the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=message)
    except Exception as e:  # huggingface_hub raises HTTP, validation and connection errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PushError(f"--push-to-hub {repo_id}: {first}; the export is complete at {directory}") from None
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)
