"""Export a campaign's chosen candidate: merged on disk, scored on the held-out report split.

The recipe names models as the search space does; the exported recipe names them by their
locations (directories or hub ids) so it runs unchanged with ``evomerge merge`` or mergekit.
Everything (weights, report-split scores, model card, recipe, ``evomerge.json``) is staged in a
hidden sibling ``.NAME.partial-PID`` and renamed into place last; with ``force`` an existing export
stays in place until the new one is complete. Ctrl-C removes the staging; what a SIGKILL left
beside the target is removed by the next export to the same target (an old export moved aside
whose replacement never arrived is restored instead). Optionally the model is logged to the
campaign's MLflow experiment and registered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

from evomerge.campaign import CampaignError, Loaded
from evomerge.errors import first_line

#: Test hook: when set, the export stops itself (SIGSTOP) inside the merge, its weights written and
#: the rest of the directory not yet, so a signal lands mid-merge (a small model's takes milliseconds).
STOP_IN_MERGE = "EVOMERGE_EXPORT_STOP_IN_MERGE"


#: Where ``export --as-adapter`` writes the merge as a LoRA adapter, inside the export.
ADAPTER_DIR = "adapter"


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


def score_model_dir(
    path: Path, loaded: Loaded, split: str = "report", device: str = "cpu", dtype: str | None = None
) -> tuple[dict[str, float], dict, dict | None]:
    """Objectives of the exported model on ``split``, loaded from disk (what is shipped is what is
    scored) onto ``device`` in ``dtype`` (a torch dtype name; None: as saved), the documents
    scored (per task and split, ``CandidateScorer.documents``) and the per-document scores."""
    from evomerge.evaluate.candidate import CandidateScorer

    scorer = CandidateScorer(
        {"model": str(path)},
        "model",
        loaded.checked.evaluator,
        split=split,
        device=device,
        dtype=dtype,
        trust_remote_code=loaded.experiment.trust_remote_code,
    )
    from evomerge.recipe import parse_recipe

    identity = parse_recipe({"merge_method": "linear", "models": [{"model": "model", "parameters": {"weight": 1.0}}]})
    score = scorer.score(identity)
    if score.status != "done":
        raise CampaignError(f"the exported model could not be scored: {score.reason}")
    return score.values, scorer.documents(), score.per_document


def _best(search, kind: str, sign: float):
    """The finished trial of ``kind`` with the best mean over the objectives on the search split."""
    trials = [t for t in search.finished if t.kind == kind]
    return max(trials, key=lambda t: (sign * sum(t.values) / len(t.values), -t.id)) if trials else None


def compare_on_report(loaded: Loaded, search, trial, exported: dict, device: str, dtype: str | None) -> dict | None:
    """The export against the best hand baseline and the best expert alone of the campaign (each the
    best of its kind by mean search-split score), scored on the same report documents
    (``evomerge.report``); None where a mean over the objectives means nothing (they do not share a
    direction, or one has no per-document scores: a perplexity)."""
    from evomerge.evaluate.candidate import CandidateScorer
    from evomerge.report import paired, summary

    objectives, directions = [o.name for o in loaded.objectives], {o.direction for o in loaded.objectives}
    if len(directions) != 1 or not exported or any(o not in exported for o in objectives):
        return None
    sign = 1.0 if directions == {"maximize"} else -1.0
    out, scorer = {"objectives": objectives, "export": {"trial": trial.id, **summary(exported, objectives)}}, None
    space, exp = loaded.checked.space, loaded.experiment
    for key, kind in (("best_baseline", "hand baseline"), ("best_expert", "expert alone")):
        other = _best(search, kind, sign)
        if other is None:
            continue
        if other.id == trial.id:
            scores = exported
        else:  # merged in memory as the campaign's workers did, on the report split
            scorer = scorer or CandidateScorer(
                space.resident_models(exp.models), space.resident_base, loaded.checked.evaluator, split="report",
                device=device, dtype=dtype, trust_remote_code=exp.trust_remote_code, allow_pickle=exp.allow_pickle,
                memory=exp.workers.memory, resident=space.kind,
            )  # fmt: skip
            score = scorer.score(other.recipe)
            if score.status != "done":
                raise CampaignError(
                    f"trial {other.id} ({kind}) could not be scored on the report split: {score.reason}"
                )
            scores = score.per_document
        label = other.baseline or other.label or kind
        out[key] = {
            "trial": other.id,
            "label": label,
            **summary(scores, objectives),
            **paired(exported, scores, objectives),
        }
    return out


def _stop_after_weights(staging: Path) -> None:
    marker = f".{staging.name}.partial-"  # the merge engine's own staging of ``staging``

    def hook(event: str, args: tuple) -> None:  # config.json: the first file written after the weights
        if event == "open" and marker in str(args[0]) and str(args[0]).endswith("/config.json"):
            os.kill(os.getpid(), signal.SIGSTOP)

    sys.addaudithook(hook)


def _merge_into(recipe, staging: Path, out: Path, force: bool, exp, progress: bool) -> None:
    from evomerge.merge.apply import MergeError
    from evomerge.merge.ondisk import merge_to_disk
    from evomerge.staging import sweep_stale_staging

    try:
        sweep_stale_staging(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
            raise CampaignError(f"{out} exists and is not empty (pass --force to replace it)")
        if os.environ.get(STOP_IN_MERGE):
            _stop_after_weights(staging)
        merge_to_disk(
            recipe, staging, allow_pickle=exp.allow_pickle, progress=progress, trust_remote_code=exp.trust_remote_code
        )
    except MergeError as e:
        raise CampaignError(first_line(e)) from None
    except OSError as e:
        raise CampaignError(f"cannot write {out}: {e.strerror or first_line(e)}") from None


def _score_staged(staging: Path, record: dict, loaded: Loaded, trial, recipe, device, dtype, search) -> None:
    """The staged export scored on the report split (and compared, with ``search``), its scores,
    documents and comparison put in ``record`` and its model card written."""
    from evomerge.merge.checkpoint import model_card

    exp = loaded.experiment
    scores, documents, per_document = score_model_dir(staging, loaded, device=device, dtype=dtype)
    record["report_scores"] = scores
    if search is not None:  # the export stands whatever the comparison does: a failure is recorded, not raised
        try:
            record["report_comparison"] = compare_on_report(loaded, search, trial, per_document, device, dtype)
        except Exception as e:  # out of memory holding the campaign's models, a candidate that fails, ...
            record["report_comparison"] = {"error": first_line(e, with_type=True)}
    searched = loaded.state.get("documents") or {}  # what the campaign's workers scored
    record["documents"] = {
        task: {**searched.get(task, {}), **splits} for task, splits in {**searched, **documents}.items()
    }
    record["report_scored_on"] = {"device": device, "dtype": dtype or "as saved"}
    written = json.loads((staging / "evomerge.json").read_text())["inputs"]  # each input's directory
    inputs = {ref: Path(d) for ref, d in written.items()}
    card = model_card(recipe, {f"{k} (report split)": v for k, v in scores.items()}, inputs)
    card += (
        "\n## Search\n\nCampaign `"
        + exp.name
        + f"`, trial {trial.id}; search-split scores: "
        + ", ".join(f"{k} {v:.4g}" for k, v in record["search_scores"].items())
        + ".\n"
    )
    (staging / "README.md").write_text(card)


def export(
    loaded: Loaded,
    trial,
    out: Path,
    force: bool = False,
    evaluate: bool = True,
    register: str | None = None,
    progress: bool = True,
    device: str = "cpu",
    dtype: str | None = None,
    search=None,
    as_adapter: bool = False,
) -> dict:
    """Export ``trial`` to ``out`` atomically (see the module docstring); returns what
    ``evomerge.json`` records, plus ``path`` (and ``registered`` with ``register``). The report
    split is scored on ``device`` in ``dtype`` (None: as saved); with the campaign's ``search``, the
    best hand baseline and the best expert alone too (``report_comparison``). ``as_adapter``: the
    merge also as one LoRA adapter in ``out/adapter`` (LoRA experts, linear or task arithmetic only:
    checked before anything is written)."""
    from evomerge.staging import staging_dir, swap_into_place

    exp = loaded.experiment
    recipe = located_recipe(trial.recipe, exp.models)
    if as_adapter:
        from evomerge.merge.adapter import check_adapter
        from evomerge.merge.registry import MergeError

        try:
            check_adapter(recipe)
        except MergeError as e:
            raise CampaignError(f"trial {trial.id}: {e}") from None
    staging = staging_dir(out)
    try:
        _merge_into(recipe, staging, out, force, exp, progress)
        if as_adapter:
            from evomerge.merge.adapter import write_adapter

            write_adapter(recipe, staging / ADAPTER_DIR)
        record = {
            "campaign": str(loaded.directory),
            "trial": trial.id,
            "genome": trial.genome,
            "search_scores": dict(zip([o.name for o in loaded.objectives], trial.values or [])),
            "seed": exp.seed,
            **({"adapter": ADAPTER_DIR} if as_adapter else {}),
        }
        if evaluate:
            _score_staged(staging, record, loaded, trial, recipe, device, dtype, search)
        meta = json.loads((staging / "evomerge.json").read_text())
        meta.update(record)
        (staging / "evomerge.json").write_text(json.dumps(meta, indent=2) + "\n")
        swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-made is left behind
    if register:
        record["registered"] = register_model(loaded, trial, out, register, record.get("report_scores"))
    record["path"] = str(out)
    return record


def register_model(loaded: Loaded, trial, path: Path, name: str, scores: dict | None) -> str:
    """Log the exported directory to a run of the campaign's MLflow experiment and register it; an
    MLflow that fails or does not answer (its requests bounded: ``environment.MLFLOW_BOUNDS``) is
    one line saying so, the export kept."""
    from evomerge.environment import bound_mlflow
    from evomerge.tracking.mlflow_tracker import why

    uri, _ = loaded.tracking()
    bound_mlflow()
    try:
        return _register(loaded, trial, path, name, scores, uri)
    except CampaignError:
        raise
    except Exception as e:
        raise CampaignError(f"--register {name}: MLflow at {uri}: {why(e)}; the model is exported at {path}") from None


def _register(loaded: Loaded, trial, path: Path, name: str, scores: dict | None, uri: str) -> str:
    from mlflow import MlflowClient

    from evomerge.tracking.mlflow_tracker import CAMPAIGN_TAG, ROLE_TAG, TRIAL_TAG

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(loaded.experiment.tracking.experiment or loaded.experiment.name)
    if exp is None:
        raise CampaignError("the campaign has no MLflow experiment yet (run it first)")
    tags = {"mlflow.runName": f"export trial-{trial.id:05d}", TRIAL_TAG: str(trial.id), ROLE_TAG: "export"}
    if loaded.state.get("parent_run_id"):  # flat, like the candidates: see evomerge.tracking.mlflow_tracker
        tags[CAMPAIGN_TAG] = loaded.state["parent_run_id"]
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
