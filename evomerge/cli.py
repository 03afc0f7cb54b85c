"""`evomerge` command line. User errors print one line on stderr and exit with status 2."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from evomerge import __version__, environment

EXIT_USAGE = 2
PRESET_NAMES = ("default", "micro")  # evomerge.zoo.spec.PRESETS, without importing torch at start-up


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def _print(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_zoo_build(args) -> int:
    from pydantic import ValidationError

    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.spec import PRESETS

    overrides = {k: v for k, v in (("seed", args.seed), ("architecture", args.architecture)) if v is not None}
    try:
        spec = PRESETS[args.preset].model_copy(update=overrides)
        spec = type(spec).model_validate(spec.model_dump())
    except ValidationError as e:
        raise UserError(f"zoo spec: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None
    try:
        manifest = build_zoo(args.out, spec, progress=_print)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    for m in manifest["models"]:
        print(f"{m['name']:<14} {args.out}/{m['path']}  ({m['parameters']:,} parameters)")
    print(f"content hash {manifest['content_hash'][:16]}")
    if args.lora:
        from evomerge.zoo.build import build_lora_experts
        from evomerge.zoo.spec import LoraSpec

        try:
            lora = build_lora_experts(args.out, LoraSpec(), progress=_print)
        except ImportError as e:
            raise UserError(f"--lora trains adapters with peft, which is not installed ({e})") from None
        for m in lora["models"]:
            print(f"{m['name']:<14} {args.out}/{m['path']}  (LoRA adapter, {m['trained_parameters']:,} trained)")
    return 0


def cmd_zoo_tasks(args) -> int:
    from evomerge.zoo.tasks import write_task_files

    for path in write_task_files(args.out):
        print(path)
    return 0


def cmd_zoo_eval(args) -> int:
    from evomerge.zoo.quality import evaluate_zoo

    try:
        report = evaluate_zoo(args.zoo, args.tasks, split=args.split, limit=args.limit)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    print(f"scores on the {args.split} split (exact_match / acc, 0..1); merge = task arithmetic, lambda 1")
    print(report.table())
    pairs = ", ".join(f"{a}+{b}" for a, b in report.winning_pairs) or "none"
    print(f"merges that beat both of their experts on the mean of the two skills: {pairs}")
    if report.ok:
        print("zoo quality: OK")
        return 0
    for failure in report.failures:
        print(f"zoo quality: {failure}")
    return 1 if args.strict else 0


def cmd_zoo_builtin(args) -> int:
    from evomerge.zoo.builtin import write_builtin_data

    default = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser().resolve()
    if args.out.expanduser().resolve() == default and not args.out.joinpath("evomerge-builtin.json").is_file():
        raise UserError(
            f"--out: {args.out} is the Hugging Face home this shell uses; offline, the generated datasets would "
            "stand in for the real ones there: give a folder of its own"
        )
    manifest = write_builtin_data(args.out)
    for repo, entry in manifest["datasets"].items():
        rows = ", ".join(f"{split} {n}" for split, n in entry["rows"].items())
        print(f"{repo} ({entry['config']}): {rows}  {args.out}/{entry['path']}")
    print(f"code_eval metric: {args.out}/{manifest['metrics']['code_eval']}")
    print(f"use it with: HF_HOME={args.out} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
    return 0


def cmd_eval(args) -> int:

    from evomerge.evaluate.lmeval import TaskError, TaskSuite, wrap_model
    from evomerge.models.loading import load_causal_lm, scoring_device
    from evomerge.models.source import ModelLoadError

    try:  # the device first: nothing is loaded for a machine that does not have it
        device = scoring_device(args.device)
    except ModelLoadError as e:
        raise UserError(f"--device: {e}") from None
    try:
        suite = TaskSuite(args.task, limit=args.limit, confirm_run_unsafe_code=args.confirm_run_unsafe_code)
        model, tokenizer = load_causal_lm(
            args.model, trust_remote_code=args.trust_remote_code, dtype=_torch_dtype(args.dtype), device=device
        )
    except (TaskError, ModelLoadError) as e:
        raise UserError(str(e)) from None
    held = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"scoring {args.model} on {device} in {held}", file=sys.stderr)
    scores = suite.scores(wrap_model(model, tokenizer, batch_size=args.batch_size))
    for name, value in scores.items():
        print(f"{name}\t{value:.4f}")
    return 0


def _torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def cmd_merge(args) -> int:
    from evomerge.merge.ondisk import merge_to_disk, parse_size
    from evomerge.merge.registry import MergeError
    from evomerge.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe)
        if args.as_adapter:
            from evomerge.merge.adapter import write_adapter

            print(write_adapter(recipe, args.out, overwrite=args.force))
            return 0
        out = merge_to_disk(
            recipe,
            args.out,
            allow_pickle=args.allow_pickle,
            overwrite=args.force,
            shard_bytes=parse_size(args.shard_size),
            progress=not args.quiet,
            device=args.device,
        )
    except (RecipeError, MergeError) as e:
        raise UserError(f"{args.recipe}: {e}" if not str(e).startswith(str(args.recipe)) else str(e)) from None
    print(out)
    return 0


def _kinship_models(args) -> tuple[list[str], str, list[str], bool]:
    """(expert names, base directory, expert directories, whether pickled checkpoints may be read)
    from an experiment file (its ``allow_pickle``) or directories (``--allow-pickle``)."""
    from evomerge.experiment import ExperimentError, load_experiment
    from evomerge.merge.io import resolve_model_dir
    from evomerge.merge.registry import MergeError
    from evomerge.search.space import SpaceError, load_space

    sources = args.sources
    first = Path(sources[0])
    if len(sources) == 1 and first.suffix in (".yaml", ".yml") and first.is_file():
        if args.base:
            raise UserError(f"{first}: --base is taken from the experiment file; give it with model directories only")
        try:
            exp = load_experiment(first)
            space = load_space(exp.search_space)
        except (ExperimentError, SpaceError) as e:
            raise UserError(str(e)) from None
        if space.base is None:
            raise UserError(f"{first}: search_space: a layer-path space has no base to take task vectors against")
        missing = [m for m in space.used_models if m not in exp.models]
        if missing:
            raise UserError(
                f"{first}: models: the search space uses model '{missing[0]}', which the experiment does not give"
            )
        names, base_ref, refs = list(space.models), exp.models[space.base], [exp.models[m] for m in space.models]
        allow_pickle = exp.allow_pickle
    else:
        if not args.base:
            raise UserError("kinship: give --base BASE_MODEL with model directories (task vectors are taken from it)")
        names, base_ref, refs = [], args.base, list(sources)
        for ref in refs:
            name = Path(ref).name or ref
            names.append(name if name not in names else ref)
        allow_pickle = args.allow_pickle
    if len(refs) < 2:
        raise UserError(f"kinship compares experts pairwise: give at least 2, got {len(refs)}")
    try:
        dirs = [str(resolve_model_dir(r, allow_pickle)) for r in refs]
        return names, str(resolve_model_dir(base_ref, allow_pickle)), dirs, allow_pickle
    except MergeError as e:
        raise UserError(str(e)) from None


def cmd_kinship(args) -> int:
    import json

    from evomerge.models.kinship import FlagRule, kinship_of, stream_models
    from evomerge.models.source import ModelLoadError

    rule = FlagRule(args.opposed_below, args.conflict_above, args.orthogonal_below, args.redundant_above)
    if args.group_size is not None and args.group_size < 1:
        raise UserError(f"--group-size: must be 1 or more, got {args.group_size}")
    names, base_dir, dirs, allow_pickle = _kinship_models(args)
    if args.json is not None and (
        (args.json.exists() and not args.json.is_file()) or not args.json.resolve().parent.is_dir()
    ):
        raise UserError(f"--json: {args.json} is not a file in an existing directory")
    try:
        layers, tensors = stream_models(base_dir, dirs, allow_pickle=allow_pickle)
        table = kinship_of(names, layers, ((n, ts, b) for n, ts, b in tensors), rule, args.group_size)
    except ModelLoadError as e:
        raise UserError(str(e)) from None
    print(table.format())
    if args.json is not None:
        staged = args.json.with_name(args.json.name + ".partial")
        staged.write_text(json.dumps(table.to_dict(), indent=2))
        os.replace(staged, args.json)
    return 0


def _model_config_file(model: str) -> Path:
    """A model's config.json: the file itself, in a model directory, or in a hub id's snapshot in the
    local cache (nothing is fetched)."""
    from evomerge.models.source import cached_snapshot, is_local_model

    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{model}: not a model directory (no config.json)")
        return path / "config.json"
    snapshot = None if is_local_model(model) else cached_snapshot(model)
    if snapshot is None or not (snapshot / "config.json").is_file():
        raise UserError(f"{model}: not a config.json, a model directory, nor a model in the local hub cache")
    return snapshot / "config.json"


def cmd_space_show(args) -> int:
    import json

    from evomerge.models.layout import num_layers
    from evomerge.models.source import ModelLoadError
    from evomerge.search.space import SpaceError, load_space, make_genome

    try:
        space = load_space(args.file)
        if args.layers is None:
            config = _model_config_file(args.model)
            try:
                layers = num_layers(json.loads(config.read_text()))
            except ModelLoadError as e:
                raise UserError(f"{args.model}: {e}") from None
        else:
            layers = args.layers
        if layers < 1:
            raise UserError(f"a model has at least one layer, got {layers}")
        genome = make_genome(space, layers)
    except SpaceError as e:
        raise UserError(str(e)) from None
    print(f"{args.file}: {space.summary(genome)}")
    for g in genome.genes:
        kind = " included at >= 0.5 (Optuna: a choice of 2)" if g.param == "include" and g.choices else ""
        print(f"  {g.name:<40} [{g.low:g}, {g.high:g}]{kind}")
    return 0


def _campaign_errors():
    from evomerge.campaign import CampaignError
    from evomerge.experiment import ExperimentError
    from evomerge.search.journal import JournalError

    return (CampaignError, ExperimentError, JournalError)


def _finish(summary: dict) -> int:
    d = summary["directory"]
    print(
        f"evaluations {summary['evaluations']} ({summary['done']} done, {summary['failed']} failed"
        + (f", {summary['raced']} raced on anchor documents" if summary.get("raced") else "")
        + (f", {summary['stopped_early']} stopped {summary['stopped_where']}" if summary.get("stopped_early") else "")
        + (f", {summary['repeats']} repeats of a recipe scored already" if summary.get("repeats") else "")
        + f"); documents scored {summary['documents']}; "
        f"front: {len(summary['front'])} candidates"
        + (f"; hypervolume {summary['hypervolume']:.4g}" if "hypervolume" in summary else "")
    )
    print(f"campaign: {d}")
    _tracking_gaps(summary)
    if summary["stopped"]:
        print(f"stopped ({summary['stopped']}); continue with: evomerge resume {d}")
        if summary["exit"] not in (130, 143):
            _print(f"evomerge: campaign {summary['stopped']}")
        return summary["exit"]
    print(f"front:    evomerge pareto {d}")
    print(f"export:   evomerge export {d} --best --out {d}/export")
    _print_mlflow(summary["tracking_uri"], summary.get("experiment_id"), summary.get("parent_run_id"))
    return summary["exit"]  # 0, or EXIT_UNTRACKED


def _tracking_gaps(summary: dict) -> None:
    """What a resume logged to MLflow that it lacked, and one line for what MLflow still lacks."""
    from evomerge.campaign import id_ranges, untracked_line

    synced, untracked = summary.get("synced"), summary.get("untracked")
    if synced:
        print(f"MLflow: logged {len(synced)} result(s) it lacked (trials {id_ranges(synced)})")
    elif synced is not None and not untracked:
        print("MLflow: had every result already")
    if untracked:
        line = untracked_line(summary["untracked"], summary["evaluations"], summary["directory"])
        _print(f"evomerge: warning: {line}")


def _print_mlflow(uri: str, experiment_id: str | None, campaign_run: str | None) -> None:
    """How to open the campaign in the MLflow UI: the front, and the campaign run's plots."""
    from evomerge.tracking.mlflow_tracker import FRONT_FILTER, ui_links

    if uri.startswith("sqlite"):
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        base = "http://127.0.0.1:5000"
    else:
        print(f"MLflow: {uri}")
        base = uri
    if experiment_id is None:
        print(f"  (filter runs with: {FRONT_FILTER})")
        return
    links = ui_links(base, experiment_id, campaign_run)
    print(f"  front:      {links['front']}")
    if "plot" in links:
        print(f"  front plot: {links['plot']}")


def _run_campaign(opener) -> int:
    from evomerge import campaign

    try:
        loaded = opener(campaign)
        for warning in loaded.checked.warnings:  # soft differences between the models, one line each
            print(f"evomerge: warning: {warning}", file=sys.stderr)
        try:
            return _finish(campaign.run(loaded))
        finally:
            loaded.release()
    except _campaign_errors() as e:
        raise UserError(str(e)) from None


def cmd_run(args) -> int:
    return _run_campaign(lambda campaign: campaign.prepare(args.experiment, args.out))


def cmd_resume(args) -> int:
    return _run_campaign(lambda campaign: campaign.open_campaign(args.campaign, lock=True))


def _open_for_reading(directory):
    """A campaign directory and its search, replayed from the journal (no compute, no tracking
    check, nothing written: works on a read-only directory and while the campaign runs)."""
    from evomerge import campaign

    try:
        loaded = campaign.open_campaign(directory, check=False)
        return loaded, loaded.search()
    except _campaign_errors() as e:
        raise UserError(str(e)) from None


def cmd_status(args) -> int:
    loaded, search = _open_for_reading(args.campaign)
    exp = loaded.experiment
    told = [t for t in search.trials if t.status != "running"]
    done = search.finished
    print(f"campaign {exp.name}: {loaded.directory}")
    print(
        f"optimizer {exp.optimizer.name}, seed {exp.seed}, objectives "
        + ", ".join(f"{o.name} ({o.direction})" for o in loaded.objectives)
    )
    budget = exp.budget.max_evaluations
    print(
        f"evaluations {len(told)}"
        + (f"/{budget}" if budget else "")
        + f": {len(done)} done, "
        + (f"{len(search.raced)} raced on anchor documents, " if search.raced else "")
        + (
            f"{len(search.stopped_early)} stopped {'on their anchors' if search.racing else 'at a lower rung'}, "
            if search.stopped_early
            else ""
        )
        + f"{sum(t.status == 'failed' for t in told)} failed, {len(search.trials) - len(told)} in flight "
        f"when last stopped; {len(search.repeats)} repeats of a recipe scored already (not scored again); "
        f"documents scored {search.documents}"
    )
    print(
        f"elapsed {loaded.state.get('elapsed_s', 0):.0f} s; "
        + ("finished" if loaded.state.get("finished") else "not finished (evomerge resume to continue)")
    )
    if done:
        front = search.front()
        ref = loaded.reference_point
        print(f"front {len(front)} candidates" + (f", hypervolume {search.hypervolume(ref):.4g}" if ref else ""))
    if loaded.state.get("sessions"):
        print(_session_line(loaded.state["sessions"][-1]))
    if loaded.state.get("untracked"):  # MLflow failed during the last session
        from evomerge.campaign import untracked_line

        print(untracked_line(loaded.state["untracked"], len(told), loaded.directory))
    _print_mlflow(loaded.tracking()[0], loaded.state.get("experiment_id"), loaded.state.get("parent_run_id"))
    return 0


def _session_line(session: dict) -> str:
    """The last session's time line: when each start-up stage was reached (seconds since the process
    started), the search loop, the stop."""
    from evomerge.campaign import STARTUP_STAGES

    at = session.get("stages", {})
    reached = [f"{name} {at[key]:.1f}" for key, name in STARTUP_STAGES.items() if key in at]
    line = f"last session ({session.get('status', '?').lower()}): start-up " + ", ".join(reached) + " s"
    if "first_result" in at and "last_result" in at:
        line += f"; results from {at['first_result']:.1f} to {at['last_result']:.1f} s"
    if "shutdown" in at:
        line += f"; stopped at {at['shutdown']:.1f} s"
    return line


def _what(trial) -> str:
    """What was scored, in words: a hand baseline's or an expert's recipe, a seed's label."""
    kind = trial.kind
    if kind == "hand baseline":
        return f"baseline: {trial.baseline}"
    named = trial.baseline or trial.label
    return f"{kind}: {named}" if named and kind != "expert alone" else (named or kind)


def _best_means(search, objectives) -> str | None:
    """One line: the best mean over the objectives of the searched candidates, the seeds, the experts
    alone and the hand baselines, each with its trial and what it is; None when the objectives do not
    share a direction (a mean of scores and perplexities means nothing)."""
    directions = {o.direction for o in objectives}
    if len(objectives) < 2 or len(directions) != 1:
        return None
    sign = 1.0 if directions == {"maximize"} else -1.0
    kinds = {"searched": [], "seed": [], "expert alone": [], "hand baseline": []}
    for t in search.finished:
        kinds[t.kind].append(t)
    parts = []
    for kind, trials in kinds.items():
        if trials:
            top = max(trials, key=lambda t: (sign * sum(t.values) / len(t.values), -t.id))  # ties: the first
            named = "" if kind == "searched" else f", {top.baseline or top.label or kind}"
            parts.append(f"{kind} {sum(top.values) / len(top.values):.4g} (trial {top.id}{named})")
    return f"best mean over the {len(objectives)} objectives: " + ", ".join(parts)


def cmd_pareto(args) -> int:
    from evomerge import campaign
    from evomerge.tracking.mlflow_tracker import front_plots

    loaded, search = _open_for_reading(args.campaign)
    rows = campaign.front_table(loaded, search)
    if not rows:
        raise UserError(f"{args.campaign}: no finished candidate yet")
    names = [o.name for o in loaded.objectives]
    print("trial  " + "".join(f"{n:>14}" for n in names) + f"{'crowding':>10}  recipe")
    for r in rows:
        t = search.trials[r["trial"]]
        print(f"{r['trial']:>5}  " + "".join(f"{r[n]:>14.5g}" for n in names) + f"{r['crowding']:>10.3g}  " + _what(t))
    done = search.finished
    baselines = [t for t in search.trials if t.baseline and not t.expert]
    on_front = {r["trial"] for r in rows}
    for title, kind in (("hand baselines:", "hand baseline"), ("experts alone:", "expert alone")):
        listed = [t for t in search.trials if t.kind == kind]
        if listed:  # what the search added over the recipes a user tries first, and over each expert
            print(title)
        for t in listed:
            where = "on the front" if t.id in on_front else ("dominated" if t.status == "done" else t.status)
            values = "".join(f"{v:>14.5g}" for v in t.values) if t.values else "".join(f"{'-':>14}" for _ in names)
            print(f"{t.id:>5}  {values}  {t.baseline or t.label} ({where})")
    summary = _best_means(search, loaded.objectives)
    if summary:
        print(summary)
    html, png = front_plots(
        [t.id for t in done],
        [t.values for t in done],
        [r["trial"] for r in rows],
        names,
        [o.direction for o in loaded.objectives],
        [t.id for t in baselines],
    )
    out = Path(args.plot) if args.plot else loaded.directory / "front.png"
    import matplotlib.pyplot as plt

    html_out = out.with_suffix(".html")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.png")
        plt.imsave(tmp, png)
        tmp.replace(out)
        html_out.write_text(html)
    except OSError as e:
        raise UserError(
            f"cannot write the plot {e.filename or out}: {e.strerror} (choose another path with --plot)"
        ) from None
    print(f"plot: {out} (interactive: {html_out})")
    return 0


def cmd_export(args) -> int:
    from evomerge import campaign
    from evomerge.export import export

    weights = None
    if args.weights:
        try:
            weights = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in args.weights.split(","))}
        except ValueError:
            raise UserError(f"--weights {args.weights!r}: expected objective=weight,... (numbers)") from None
    from evomerge.models.loading import scoring_device
    from evomerge.models.source import ModelLoadError

    try:  # before anything is written
        device = scoring_device(args.device) if not args.no_eval else "cpu"
    except ModelLoadError as e:
        raise UserError(f"--device: {e}") from None
    if args.push_to_hub:
        from evomerge.hub import PushError, check_push

        try:
            check_push(args.push_to_hub)
        except PushError as e:
            raise UserError(str(e)) from None
    loaded, search = _open_for_reading(args.campaign)
    try:
        trial = campaign.pick(loaded, search, trial=args.trial, weights=weights)
        record = export(
            loaded,
            trial,
            Path(args.out),
            force=args.force,
            evaluate=not args.no_eval,
            register=args.register,
            progress=not args.quiet,
            device=device,
            dtype=args.dtype,
            search=None if args.no_compare else search,
            as_adapter=args.as_adapter,
        )
    except _campaign_errors() as e:
        raise UserError(str(e)) from None
    _said_export(args, trial, record)
    return 0


def _said_export(args, trial, record: dict) -> None:
    """What export prints, the push to the hub (after the export is complete) and, last, the report
    comparison."""
    print(
        f"trial {trial.id}: "
        + ", ".join(f"{k} {v:.4g}" for k, v in record["search_scores"].items())
        + " (search split)"
    )
    if "report_scores" in record:
        print("report split: " + ", ".join(f"{k} {v:.4g}" for k, v in record["report_scores"].items()))
    if record.get("registered"):
        print(f"registered in MLflow: {record['registered']}")
    print(f"exported to {record['path']}")
    if args.push_to_hub:
        from evomerge.hub import PushError, push

        try:
            url = push(Path(record["path"]), args.push_to_hub, args.private, f"evomerge export: trial {trial.id}")
        except PushError as e:
            raise UserError(str(e)) from None
        print(f"pushed to the hub: {url}")
    if record.get("report_comparison"):  # last: what the search added, on documents it never saw
        from evomerge.report import line

        print(line(record["report_comparison"]))


def _scoring_options(p: argparse.ArgumentParser) -> None:
    from evomerge.models.loading import SCORING_DTYPES

    p.add_argument("--device", default="auto", help="where to score: auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype", choices=SCORING_DTYPES, help="load the model for scoring in this dtype (default: as saved)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("--offline", action="store_true", help="never contact a model or dataset hub")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="the offline model zoo").add_subparsers(dest="zoo_command", required=True)
    p = zoo.add_parser("build", help="train the tokenizer, base and experts (cached)")
    p.add_argument("--out", required=True, type=Path, help="zoo directory")
    p.add_argument(
        "--preset",
        choices=sorted(PRESET_NAMES),
        default="default",
        help="default: the demo zoo; micro: seconds, learns nothing (smoke tests)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--architecture", choices=["llama", "qwen2"])
    p.add_argument(
        "--lora",
        action="store_true",
        help="also train a LoRA adapter per expert (peft), as DIR/lora-<skill>; the zoo itself is unchanged",
    )
    p.set_defaults(func=cmd_zoo_build)
    p = zoo.add_parser("tasks", help="(re)write the zoo's lm-eval task files")
    p.add_argument("--out", type=Path, default=Path("evaluators/zoo"))
    p.set_defaults(func=cmd_zoo_tasks)
    p = zoo.add_parser("eval", help="score base, experts and pairwise merges; check the zoo's quality")
    p.add_argument("zoo", type=Path)
    p.add_argument("--tasks", type=Path, default=Path("evaluators/zoo"))
    p.add_argument("--split", choices=["search", "report"], default="search")
    p.add_argument("--limit", type=int)
    p.add_argument("--strict", action="store_true", help="exit 1 when a quality property fails")
    p.set_defaults(func=cmd_zoo_eval)
    p = zoo.add_parser(
        "builtin",
        help="write generated data for lm-eval's built-in gsm8k and mbpp into a Hugging Face home (offline use)",
    )
    p.add_argument("--out", required=True, type=Path, help="a Hugging Face home of its own (then HF_HOME=OUT)")
    p.set_defaults(func=cmd_zoo_builtin)

    p = sub.add_parser("merge", help="merge a recipe (mergekit-compatible YAML) from disk to disk")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", required=True, type=Path, help="output model directory")
    p.add_argument(
        "--allow-pickle", action="store_true", help="allow loading pickled .bin checkpoints (they can execute code)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--shard-size", default="2GB", help="largest output shard (default 2GB)")
    p.add_argument("--device", default="cpu", help="where to compute (cpu, cuda, cuda:1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--as-adapter",
        action="store_true",
        help="write a LoRA adapter (peft), not a model: linear or task_arithmetic over LoRA experts only",
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "kinship",
        help="pairwise similarity of experts' task vectors (EXPERIMENT.yaml, or --base BASE MODEL_DIR...)",
    )
    p.add_argument("sources", nargs="+", help="an experiment file, or expert model directories / hub ids")
    p.add_argument("--base", help="the base model the experts were fine-tuned from (with model directories)")
    p.add_argument("--group-size", type=int, help="layers per layer group (default: a quarter of the layers)")
    p.add_argument("--json", type=Path, help="also write the table (every metric, every group) as JSON")
    p.add_argument("--opposed-below", type=float, default=0.0, help="flag pairs whose cosine is below (default 0)")
    p.add_argument(
        "--conflict-above", type=float, default=0.5, help="flag pairs whose sign-conflict share is above (default 0.5)"
    )
    p.add_argument("--orthogonal-below", type=float, default=0.01, help="flag |cosine| below (default 0.01)")
    p.add_argument("--redundant-above", type=float, default=0.95, help="flag cosine above (default 0.95)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin checkpoints (they can execute code)")
    p.set_defaults(func=cmd_kinship)

    space = sub.add_parser("space", help="search spaces").add_subparsers(dest="space_command", required=True)
    p = space.add_parser("show", help="print a space's genes and dimension for a model")
    p.add_argument("file", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--layers", type=int, help="the model's layer count (a path space: each model's)")
    where.add_argument(
        "--model", help="the layer count from a model: its directory, its config.json, or a hub id in the local cache"
    )
    p.set_defaults(func=cmd_space_show)

    p = sub.add_parser("run", help="run a campaign from an experiment file")
    p.add_argument("experiment", type=Path)
    p.add_argument("--out", type=Path, help="campaign directory (default: the file's output_dir)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("resume", help="continue an interrupted campaign")
    p.add_argument("campaign", type=Path)
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("status", help="where a campaign stands")
    p.add_argument("campaign", type=Path)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("pareto", help="print a campaign's Pareto front and plot it")
    p.add_argument("campaign", type=Path)
    p.add_argument("--plot", help="PNG file to write (default: CAMPAIGN/front.png; an .html beside it)")
    p.set_defaults(func=cmd_pareto)
    p = sub.add_parser("export", help="merge a chosen candidate to disk, score it on the report split")
    p.add_argument("campaign", type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--best",
        action="store_true",
        help="one objective: its best; several of one direction: the best mean (search split); mixed: the knee",
    )
    which.add_argument("--trial", type=int, help="a trial by number")
    which.add_argument("--weights", help="objective=weight,... : the front member best under these weights")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-eval", action="store_true", help="skip scoring on the report split")
    p.add_argument(
        "--as-adapter",
        action="store_true",
        help="also write the merge as one LoRA adapter in OUT/adapter (LoRA experts, linear or task_arithmetic)",
    )
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the export to this hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="skip scoring the best hand baseline and the best expert alone on the report split beside the export",
    )
    p.add_argument("--register", metavar="NAME", help="also register the model in MLflow's model registry")
    _scoring_options(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="score one model on lm-eval tasks")
    p.add_argument("model", help="local model directory or hub id")
    p.add_argument("--task", action="append", required=True, help="task YAML path or built-in name")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="allow tasks that run the programs the model writes (mbpp, humaneval)",
    )
    _scoring_options(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started as a background job: Ctrl-C still stops it
        signal.signal(signal.SIGINT, signal.default_int_handler)
    environment.configure(offline=args.offline or None)
    try:
        return args.func(args)
    except UserError as e:
        _print(f"evomerge: error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _print("evomerge: interrupted")
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # a path we cannot write (read-only directory, full disk): one line, no traceback
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{e.filename}: " if e.filename else ""
        _print(f"evomerge: error: {where}{e.strerror}")
        return EXIT_USAGE


def entry() -> None:
    """The `evomerge` program: ``main``, then the exit without the interpreter's own finalization.

    After a campaign that finalization (tearing down torch, Ray's and MLflow's modules, object by
    object) takes about two seconds on 2 cores and does nothing a user needs: the exit handlers
    (Ray's shutdown, MLflow's, temporary directories) run first, and the output is flushed.
    """
    import atexit

    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
            pass
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    entry()
