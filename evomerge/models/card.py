"""What a model's own card (``README.md``) states about it: its license, from the card's YAML front
matter (the Hugging Face model card metadata). Read to carry the inputs' licenses into a merge's card."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

#: Bytes of a card read at most (front matter sits at the top).
CARD_BYTES = 64 * 1024


def card_license(model_dir: Path) -> str | None:
    """The license the card in ``model_dir`` declares (``license:``; a list is joined with ", "),
    or None when there is no card, no front matter or no license in it."""
    from evomerge.configfile import parse_yaml

    card = Path(model_dir) / "README.md"
    try:
        with open(card, encoding="utf-8", errors="replace") as f:
            text = f.read(CARD_BYTES)
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:  # front matter that is not YAML, or an alias bomb, states no license
        meta = parse_yaml(text[3:end], str(card), ValueError)
    except ValueError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value if v)
    return str(value).strip() or None if value else None


def input_licenses(inputs: Mapping[str, Path]) -> dict[str, str | None]:
    """Each input model's license (reference -> license, None: not stated)."""
    return {ref: card_license(d) for ref, d in inputs.items()}
