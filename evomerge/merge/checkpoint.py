"""A written model directory's files besides its weights: config, generation config and tokenizer
(copied), the recipe (mergekit YAML), the model card and ``evomerge.json`` (versions, seconds,
inputs). Shared by the merge and the layer-path writers."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from evomerge import __version__
from evomerge.merge.io import TOKENIZER_FILES
from evomerge.merge.registry import METHODS, get_method
from evomerge.models.card import input_licenses
from evomerge.recipe import Recipe, fold_scales

RECIPE_FILE = "mergekit_config.yml"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def write_model_files(
    out: Path,
    config: dict,
    config_dir: Path,
    tokenizer_dir: Path,
    recipe: Recipe,
    scores: dict[str, float] | None,
    inputs: dict[str, Path],
    started: float,
    **record,
) -> None:
    """Everything of a written model directory but its weights: config, generation config and
    tokenizer (copied), recipe, model card, ``evomerge.json`` (versions, seconds, inputs, ``record``)."""
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (config_dir / "generation_config.json").is_file():
        shutil.copy2(config_dir / "generation_config.json", out)
    for fname in TOKENIZER_FILES:
        if (tokenizer_dir / fname).is_file():
            shutil.copy2(tokenizer_dir / fname, out)
    recipe.save(out / RECIPE_FILE)
    (out / "README.md").write_text(model_card(recipe, scores, inputs))
    meta = {
        "evomerge_version": __version__,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 3),
        "inputs": {ref: str(d) for ref, d in inputs.items()},
        **record,
    }
    (out / "evomerge.json").write_text(json.dumps(meta, indent=2) + "\n")


def model_card(recipe: Recipe, scores: dict[str, float] | None = None, inputs: Mapping[str, Path] | None = None) -> str:
    """The merge's card: front matter (the license, where every input states the same one), how it
    was made, its inputs with their licenses and links, scores, the recipe. ``inputs``: each
    recipe reference's local directory, where the inputs' own cards are read."""
    if recipe.is_path:  # the card shows what mergekit reproduces: the scales folded into the weights
        return _path_card(fold_scales(recipe), scores, inputs)
    method = get_method(recipe.merge_method)
    licenses = _licenses(recipe, inputs)
    lines = [
        *_front_matter(recipe, licenses, "merge, evomerge"),
        "# Merged model",
        "",
        f"Merged with evomerge {__version__} using **{method.name}** ({method.reference}).",
        "",
    ]
    if recipe.base_model:
        lines += [f"Base model: `{recipe.base_model}`", ""]
    lines += _sources(recipe, licenses)
    return "\n".join(lines + _scores_and_recipe(recipe, scores))


def _licenses(recipe: Recipe, inputs: Mapping[str, Path] | None) -> dict[str, str | None]:
    known = input_licenses({r: d for r, d in (inputs or {}).items() if r in recipe.model_names()})
    return {ref: known.get(ref) for ref in recipe.model_names()}


def _front_matter(recipe: Recipe, licenses: dict[str, str | None], tags: str) -> list[str]:
    """The card's metadata; ``license`` only where every input states the same one (a merge is
    bound by each input's license: with several, or one unknown, the card says so in its body)."""
    stated = set(licenses.values())
    license = [f"license: {stated.pop()}"] if len(stated) == 1 and None not in stated else []
    return [
        "---",
        "library_name: transformers",
        *license,
        f"tags: [{tags}]",
        *(["base_model:", *[f"- {m}" for m in recipe.model_names()]]),
        "---",
        "",
    ]


def _sources(recipe: Recipe, licenses: dict[str, str | None]) -> list[str]:
    """The inputs, each with the license its own card states and a link where it has one (a hub id)."""
    from evomerge.models.source import is_local_model

    rows = []
    for ref, license in licenses.items():
        link = "" if is_local_model(ref) else f"[{ref}](https://huggingface.co/{ref})"
        rows.append(f"| `{ref}` | {license or 'not stated'} | {link} |")
    lines = ["## Sources and licenses", "", "| model | license | link |", "|---|---|---|", *rows, ""]
    stated = set(licenses.values())
    if len(stated) > 1 or None in stated:
        lines += [
            "The inputs' licenses differ or are not all stated: the merged weights derive from every input,",
            "so check each input's terms before using or sharing this model.",
            "",
        ]
    return lines


def _scores_and_recipe(recipe: Recipe, scores: dict[str, float] | None) -> list[str]:
    lines = []
    if scores:
        lines += ["## Scores", "", "| task | score |", "|---|---|", *[f"| {k} | {v:.4f} |" for k, v in scores.items()]]
        lines.append("")
    method = METHODS.get(recipe.merge_method)
    if method is not None and not method.in_mergekit:
        how = (
            f"Reproduce with `evomerge merge {RECIPE_FILE} --out OUT` (mergekit has no `{method.name}` method; "
            f"{method.reference})."
        )
    else:
        how = f"Runs unchanged with `mergekit-yaml {RECIPE_FILE} OUT` (keys under `evomerge:` are ignored by mergekit)."
    return lines + [
        "## Recipe",
        "",
        how,
        "",
        "```yaml",
        recipe.to_yaml().rstrip(),
        "```",
        "",
    ]


def _path_card(recipe: Recipe, scores: dict[str, float] | None, inputs: Mapping[str, Path] | None) -> str:
    path = recipe.path()
    licenses = _licenses(recipe, inputs)
    lines = [
        *_front_matter(recipe, licenses, "merge, evomerge, passthrough"),
        "# Layer-path model",
        "",
        f"Assembled with evomerge {__version__}: a {len(path)}-layer path through the "
        'layers of the models below (the data-flow space of Akiba et al., "Evolutionary Optimization of '
        'Model Merging Recipes", arXiv:2403.13187). A standard checkpoint: no custom code. Input scales, '
        "where the path had them, are folded into each layer's o_proj/down_proj (the `scale` parameters).",
        "",
        *_sources(recipe, licenses),
        "| layer | model | source layer |",
        "|---|---|---|",
        *[f"| {k} | `{m}` | {i} |" for k, (m, i, _) in enumerate(path)],
        "",
    ]
    return "\n".join(lines + _scores_and_recipe(recipe, scores))
