"""A written model directory's files besides its weights: config, generation config and tokenizer
(copied), the recipe (mergekit YAML), the model card and ``evomerge.json`` (versions, seconds,
inputs). Shared by the merge and the layer-path writers."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from evomerge import __version__
from evomerge.merge.io import TOKENIZER_FILES
from evomerge.merge.registry import METHODS, get_method
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
    (out / "README.md").write_text(model_card(recipe, scores))
    meta = {
        "evomerge_version": __version__,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 3),
        "inputs": {ref: str(d) for ref, d in inputs.items()},
        **record,
    }
    (out / "evomerge.json").write_text(json.dumps(meta, indent=2) + "\n")


def model_card(recipe: Recipe, scores: dict[str, float] | None = None) -> str:
    if recipe.is_path:  # the card shows what mergekit reproduces: the scales folded into the weights
        return _path_card(fold_scales(recipe), scores)
    method = get_method(recipe.merge_method)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        *(["base_model:", *[f"- {m}" for m in recipe.model_names()]]),
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with [evomerge](https://github.com/) {__version__} using **{method.name}** ({method.reference}).",
        "",
    ]
    if recipe.base_model:
        lines += [f"Base model: `{recipe.base_model}`", ""]
    lines += ["Models:", *[f"- `{m}`" for m in recipe.model_names() if m != recipe.base_model], ""]
    return "\n".join(lines + _scores_and_recipe(recipe, scores))


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


def _path_card(recipe: Recipe, scores: dict[str, float] | None) -> str:
    path = recipe.path()
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge, passthrough]",
        *(["base_model:", *[f"- {m}" for m in recipe.model_names()]]),
        "---",
        "",
        "# Layer-path model",
        "",
        f"Assembled with [evomerge](https://github.com/) {__version__}: a {len(path)}-layer path through the "
        'layers of the models below (the data-flow space of Akiba et al., "Evolutionary Optimization of '
        'Model Merging Recipes", arXiv:2403.13187). A standard checkpoint: no custom code. Input scales, '
        "where the path had them, are folded into each layer's o_proj/down_proj (the `scale` parameters).",
        "",
        "Models:",
        *[f"- `{m}`" for m in recipe.model_names()],
        "",
        "| layer | model | source layer |",
        "|---|---|---|",
        *[f"| {k} | `{m}` | {i} |" for k, (m, i, _) in enumerate(path)],
        "",
    ]
    return "\n".join(lines + _scores_and_recipe(recipe, scores))
