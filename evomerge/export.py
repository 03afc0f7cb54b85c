"""Export a campaign's chosen candidate: merged on disk, scored on the held-out report split.

The recipe names models as the search space does; the exported recipe names them by their
locations (directories or hub ids) so it runs unchanged with ``evomerge merge`` or mergekit. The
merge streams through the merge engine into a staging directory; the report-split scores go into
the model card and ``evomerge.json``; the directory appears only when everything succeeded.
Optionally the model is logged to the campaign's MLflow experiment and registered.
"""

from __future__ import annotations

import json
from pathlib import Path

from evomerge.campaign import CampaignError, Loaded


def located_recipe(recipe, models: dict[str, str]):
    """The recipe with model names replaced by their locations."""
    data = recipe.model_dump(exclude_none=True)

    def swap(name):
        return models.get(name, name)

    if data.get("base_model"):
        data["base_model"] = swap(data["base_model"])
    for entry in data.get("models") or []:
        entry["model"] = swap(entry["model"])
    for sl in data.get("slices") or []:
        for src in sl["sources"]:
            src["model"] = swap(src["model"])
    from evomerge.recipe import parse_recipe

    return parse_recipe(data, "<export>")


def score_model_dir(path: Path, loaded: Loaded, split: str = "report") -> dict[str, float]:
    """Objectives of the exported model on ``split``, loaded from disk (what is shipped is what is scored)."""
    from evomerge.evaluate.candidate import CandidateScorer

    scorer = CandidateScorer({"model": str(path)}, "model", loaded.parts["evaluator"], split=split,
                             trust_remote_code=loaded.experiment.trust_remote_code)
    from evomerge.recipe import parse_recipe

    identity = parse_recipe({"merge_method": "linear", "models": [{"model": "model", "parameters": {"weight": 1.0}}]})
    score = scorer.score(identity)
    if score.status != "done":
        raise CampaignError(f"the exported model could not be scored: {score.reason}")
    return score.values


def export(loaded: Loaded, trial, out: Path, force: bool = False, evaluate: bool = True,
           register: str | None = None, progress: bool = True) -> dict:
    from evomerge.merge.apply import MergeError
    from evomerge.merge.ondisk import merge_to_disk, model_card

    exp = loaded.experiment
    recipe = located_recipe(trial.recipe, exp.models)
    try:
        path = merge_to_disk(recipe, out, allow_pickle=exp.allow_pickle, overwrite=force, progress=progress)
    except (MergeError, FileExistsError, ValueError) as e:
        raise CampaignError(str(e)) from None
    record = {"campaign": str(loaded.directory), "trial": trial.id, "genome": trial.genome,
              "search_scores": dict(zip([o.name for o in loaded.objectives], trial.values or [])),
              "seed": exp.seed}
    if evaluate:
        try:
            scores = score_model_dir(path, loaded)
        except BaseException:
            import shutil

            shutil.rmtree(path, ignore_errors=True)  # nothing half-made is left behind
            raise
        record["report_scores"] = scores
        card = model_card(recipe, {f"{k} (report split)": v for k, v in scores.items()})
        card += ("\n## Search\n\nCampaign `" + exp.name + f"`, trial {trial.id}; search-split scores: "
                 + ", ".join(f"{k} {v:.4g}" for k, v in record["search_scores"].items()) + ".\n")
        (path / "README.md").write_text(card)
    meta = json.loads((path / "evomerge.json").read_text())
    meta.update(record)
    (path / "evomerge.json").write_text(json.dumps(meta, indent=2) + "\n")
    if register:
        record["registered"] = register_model(loaded, trial, path, register, record.get("report_scores"))
    record["path"] = str(path)
    return record


def register_model(loaded: Loaded, trial, path: Path, name: str, scores: dict | None) -> str:
    """Log the exported directory to a run of the campaign's MLflow experiment and register it."""
    from mlflow import MlflowClient

    uri, _ = loaded.tracking()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(loaded.experiment.tracking.experiment or loaded.experiment.name)
    if exp is None:
        raise CampaignError("the campaign has no MLflow experiment yet (run it first)")
    tags = {"mlflow.runName": f"export trial-{trial.id:05d}", "evomerge.trial": str(trial.id)}
    if loaded.state.get("parent_run_id"):
        tags["mlflow.parentRunId"] = loaded.state["parent_run_id"]
    run = client.create_run(exp.experiment_id, tags=tags)
    for k, v in (scores or {}).items():
        client.log_metric(run.info.run_id, f"report.{k}", v)
    client.log_artifacts(run.info.run_id, str(path), "model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except Exception:  # already registered: add a version
        pass
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return f"{name} version {version.version}"
