"""Experiment files (``experiments/*.yaml``): one campaign, validated before any compute.

Paths inside the file (models given as local directories, the search space, the evaluator) are
relative to the file; ``output_dir`` is relative to the working directory. A model that is not an
existing path is a hub id. ``check_experiment`` goes further than the schema: the files parse, the
models exist and share one architecture, the space's models are all given, the tracking server
answers. Each problem is one ``ExperimentError`` line naming the file and field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from evomerge.configfile import describe, read_yaml
from evomerge.errors import first_line
from evomerge.merge.memory import MemoryPolicy
from evomerge.models.layout import num_layers
from evomerge.models.source import ModelLoadError, is_local_model

if TYPE_CHECKING:
    from evomerge.evaluate.config import EvaluatorConfig
    from evomerge.search.genes import Space


class ExperimentError(ValueError):
    pass


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: random | cma | tpe | nsga2 | nsga3 | gp | cmaes | optuna-random
    name: str = "nsga2"
    #: The optimizer's own options (``evomerge.search.optimizers``: each optimizer's Options model),
    #: checked when the experiment is.
    options: dict[str, Any] = Field(default_factory=dict)


class Seeds(BaseModel):
    """Known recipes evaluated first."""

    model_config = ConfigDict(extra="forbid")
    uniform_average: bool = True
    experts_alone: bool = True
    recipes: list[str] = Field(default_factory=list)  # hand recipe YAML files (relative to the file)
    #: The recipes a user tries first, evaluated in full as trials of their own (tagged baseline):
    #: task arithmetic (weights 1) at lambda 0.5, 0.7, 1.0; TIES at density 0.5 and 0.8; DARE-TIES
    #: at density 0.5; the experts' uniform average (``evomerge.campaign.BASELINES``).
    baselines: bool = False


class FidelityConfig(BaseModel):
    """Multi-fidelity evaluation: each new candidate is scored on ``rungs[0]`` documents per task
    first (a seeded subset, nested in every larger one), goes on to the next rung only if it ranks
    within ``promote`` of that rung's results so far, and is scored on the evaluator's full ``limit``
    last. Seeds and baselines are scored in full at once. Only the full results enter the front."""

    model_config = ConfigDict(extra="forbid")
    rungs: list[int] = Field(min_length=1)
    promote: float = Field(default=1 / 3, gt=0, le=1)

    @model_validator(mode="after")
    def _ascending(self):
        if any(r < 1 for r in self.rungs) or any(b <= a for a, b in zip(self.rungs, self.rungs[1:])):
            raise ValueError(f"rungs must be ascending document counts of at least 1, got {self.rungs}")
        return self


class RacingConfig(BaseModel):
    """Racing on anchor documents: once ``min_full`` candidates are scored in full, anchor
    documents are chosen per task (``anchors``: a fraction below 1 of each task's search pool, or a
    count) and each new candidate is scored on them first; it is scored in full only when its
    interval (estimate +- ``z`` errors) leaves it possibly worth it by ``rule``, or when the check
    draw (``check``: the share of raced candidates also scored in full) picks it. The weights are
    refitted after every ``refit`` more full results (the anchors stay)."""

    model_config = ConfigDict(extra="forbid")
    anchors: float = Field(default=0.1, gt=0)
    check: float = Field(default=0.125, ge=0, le=1)
    z: float = Field(default=2.0, gt=0)
    min_full: int = Field(default=8, ge=1)
    refit: int = Field(default=8, ge=1)
    #: When a candidate stops on its anchors: ``dominance`` (a full result dominates its interval's
    #: optimistic corner), ``mean`` (its mean over the objectives, plus its interval, stays behind
    #: the best mean in full: the pick of ``export --best``; objectives of one direction only) or
    #: ``hypervolume`` (its interval's optimistic corner would add less than ``gain`` of the
    #: hypervolume of the results in full, from the campaign's reference point; the default: with
    #: three or more objectives nearly every candidate is undominated, and ``dominance`` stops almost
    #: nothing; a campaign raced before this default resumes on the rule its journal names).
    rule: Literal["dominance", "mean", "hypervolume"] = "hypervolume"
    #: How the anchors estimate a candidate: ``neighbours`` (the candidates scored in full that
    #: agree most with it on the anchors predict its scores on the rest of the pool, and the
    #: anchors correct that prediction) or ``strata`` (the anchors' weighted mean: a campaign begun
    #: before ``neighbours`` existed resumes with it).
    estimate: Literal["neighbours", "strata"] = "neighbours"
    #: ``rule: hypervolume``'s least share of the front's hypervolume a candidate must be able to add
    #: (None: :data:`GAIN`); refused with another rule.
    gain: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _count(self):
        if self.anchors >= 1 and self.anchors != int(self.anchors):
            raise ValueError(f"anchors is a fraction below 1 or a whole number of documents, got {self.anchors}")
        if self.gain is not None and self.rule != "hypervolume":
            raise ValueError(f"gain applies to rule: hypervolume only (this rule is {self.rule})")
        return self


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Candidates to finish (done or failed), over all runs and resumes of the campaign.
    max_evaluations: int | None = Field(default=None, ge=1)
    #: Wall-clock minutes of searching, summed over all runs and resumes of the campaign.
    max_minutes: float | None = Field(default=None, gt=0)
    #: Stop (resumably, exit 3) when the first this-many results of a run or resume all failed for
    #: one reason: a broken model, task or machine, not a bad recipe. None: workers + 2; 0: never.
    halt_after_failures: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _some(self):
        if self.max_evaluations is None and self.max_minutes is None:
            raise ValueError("give max_evaluations, max_minutes, or both")
        return self


class Workers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    #: GPUs per worker (fractions share one GPU between workers); 0 on CPU machines.
    gpus_per_worker: float = Field(default=0.0, ge=0)
    #: None: a private local Ray; "auto", "host:port" or "ray://...": join that cluster.
    address: str | None = None
    #: Custom Ray resources each worker asks for, e.g. {"big-gpu-node": 1} for nodes started with
    #: ``ray start --resources '{"big-gpu-node": 4}'``: places workers on the nodes that offer them.
    resources: dict[str, float] = Field(default_factory=dict)
    device: str = "auto"
    dtype: str | None = None
    max_retries: int = Field(default=2, ge=0)
    #: Seconds a candidate's evaluation may take before its worker is killed and restarted (the
    #: candidate retried, then failed). Default: automatic, 10 x the slowest evaluation so far, at least
    #: 600 s (7200 s until the first has finished), so a worker that stops answering never holds a campaign.
    timeout_s: float | None = Field(default=None, gt=0)
    #: Seconds a worker may take to load its models and tasks before the campaign stops with what was
    #: still loading. Default: 300 s plus one second per 50 MB of model weights a worker reads.
    start_timeout_s: float | None = Field(default=None, gt=0)
    #: What each worker keeps resident: task-vector dtype, cached statistics within a byte budget,
    #: experts (and base) on the device or in host memory (``evomerge.merge.memory.MemoryPolicy``).
    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)

    @field_validator("resources")
    @classmethod
    def _resources(cls, resources: dict[str, float], info: ValidationInfo):
        bad = [k for k, v in resources.items() if not v > 0]
        if bad:
            raise ValueError(f"amounts must be > 0 ({', '.join(bad)})")
        from evomerge.cluster import RAY_STANDARD_RESOURCES

        reserved = sorted(set(resources) & RAY_STANDARD_RESOURCES)
        if reserved:
            raise ValueError(f"{', '.join(reserved)} are set by cpus_per_worker/gpus_per_worker, not here")
        if resources and info.data.get("address") is None:
            raise ValueError(
                "custom resources are offered by the nodes of a Ray cluster; "
                "set workers.address to join one (a private local Ray has none)"
            )
        return resources


class Tracking(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: None: a local store inside the output directory (sqlite + artifacts); or http(s)://host:port.
    uri: str | None = None
    #: MLflow experiment name (default: the campaign name).
    experiment: str | None = None
    #: Seconds between refreshes of the front tags, hypervolume and plots in MLflow.
    refresh_s: float = Field(default=10.0, gt=0)
    #: Log every candidate's per-sample records (document, target, answer, metrics) as its
    #: ``samples.json`` artifact; off by default (it costs an artifact write per candidate).
    log_samples: bool = False
    #: Log the experts' kinship table (``evomerge kinship``) to the campaign run when it starts,
    #: computed by a worker from its resident task vectors.
    kinship: bool = True


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = 0
    #: model name (as used by the search space) -> local directory or hub id
    models: dict[str, str] = Field(min_length=1)
    search_space: str
    evaluator: str
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    #: Objectives searched, by evaluator objective name (default: all of the evaluator's).
    objectives: list[str] | None = None
    #: Hypervolume reference point, objective -> value (default: worst value among the seeds).
    reference_point: dict[str, float] | None = None
    seeds: Seeds = Field(default_factory=Seeds)
    #: Multi-fidelity evaluation (off when absent).
    fidelity: FidelityConfig | None = None
    #: Racing on anchor documents (off when absent; not with ``fidelity``).
    racing: RacingConfig | None = None
    budget: Budget
    workers: Workers = Field(default_factory=Workers)
    output_dir: str
    tracking: Tracking = Field(default_factory=Tracking)
    trust_remote_code: bool = False
    allow_pickle: bool = False


def parse_experiment(data: Any, source: str | Path) -> Experiment:
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        raise ExperimentError(f"{source}: {describe(e)}") from None


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"{path}: experiment file not found")
    return resolve_paths(parse_experiment(read_yaml(path, ExperimentError), path), path.parent)


def resolve_paths(exp: Experiment, folder: Path) -> Experiment:
    """Relative file paths made absolute against ``folder`` (the experiment file's)."""

    def local(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (folder / q).resolve())

    def model(ref: str) -> str:
        return local(ref) if is_local_model(ref, relative_to=folder) else ref  # else a hub id

    return exp.model_copy(
        update={
            "models": {k: model(v) for k, v in exp.models.items()},
            "search_space": local(exp.search_space),
            "evaluator": local(exp.evaluator),
            "seeds": exp.seeds.model_copy(update={"recipes": [local(r) for r in exp.seeds.recipes]}),
        }
    )


@dataclass(frozen=True)
class CheckedExperiment:
    """An experiment checked before compute, with what the checks loaded; trusted inside."""

    experiment: Experiment
    space: Space
    evaluator: EvaluatorConfig
    #: Each model's layer count (name -> layers): every model's for a parameter space, the path's
    #: models' for a layer-path space.
    layer_counts: Mapping[str, int]
    #: What was found and allowed, one line each (soft differences between a model and its base).
    warnings: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int | None:
        """The base's layer count (None for a layer-path space, which has no base)."""
        return None if self.space.base is None else self.layer_counts[self.space.base]

    def genome(self):
        """The search's genome, as the campaign builds it."""
        return self.space.genome(self.layer_counts, self.experiment.seed)


def check_experiment(
    exp: Experiment, source: str | Path, check_tracking: bool = True, check_tasks: bool = True
) -> CheckedExperiment:
    """Everything that can be checked before compute; returns it checked, with the space and the
    evaluator it loaded. Raises ExperimentError naming file and field.

    Reads configs and safetensors headers, never weights; ``check_tasks`` loads the evaluator's
    tasks (seconds) to check that each reports its objective's metric."""

    def fail(field: str, msg: str):
        raise ExperimentError(f"{source}: {field}: {msg}")

    space, evaluator = _load_space(exp, fail), _load_evaluator(exp, fail)
    _check_search(exp, evaluator, fail)
    for model in space.used_models:
        if model not in exp.models:
            fail("models", f"the search space uses model '{model}', which the experiment does not give")
    adapters = {n: f for n, f in ((n, _adapter(r)) for n, r in exp.models.items()) if f is not None}
    configs = {}
    for name, ref in exp.models.items():
        if name not in adapters:  # a LoRA adapter has the base's config: checked against the base below
            configs[name] = _model_config(ref, exp.allow_pickle, lambda msg, n=name: fail(f"models.{n}", msg))
    _check_custom_code(exp, configs, fail)
    warnings: list[str] = []
    warn = lambda field, msg: warnings.append(f"{source}: {field}: {msg}")  # noqa: E731
    if space.kind == "path":
        used = [m for m in space.models if m in adapters]
        if used:
            fail(f"models.{used[0]}", "a LoRA adapter cannot be a layer path's model (merge it into its base first)")
        counts = _check_path_models(exp, space, configs, fail, warn)
    else:
        counts = _check_merge_models(exp, space, configs, fail, warn, adapters)
    _check_tasks_and_tracking(exp, evaluator, fail, check_tasks, check_tracking, exp.models[space.resident_base])
    return CheckedExperiment(exp, space, evaluator, counts, tuple(warnings))


def _check_custom_code(exp: Experiment, configs: dict[str, dict], fail) -> None:
    """Models whose files ask for code beyond transformers' own: refused unless ``trust_remote_code``
    (without it, transformers builds the plain architecture its model_type names, and the campaign
    would merge and score the weights as that); one no code could run is refused either way."""
    from evomerge.models.config import custom_code

    for name, config in configs.items():
        found = custom_code(config, _local_dir(exp.models[name]))
        if found is None:
            continue
        phrase, runnable = found
        if not runnable:
            fail(f"models.{name}", phrase)
        if not exp.trust_remote_code:
            fail(f"models.{name}", f"{phrase}, which runs only with trust_remote_code: true")


def _load_space(exp: Experiment, fail):
    from evomerge.search.space import SpaceError, load_space

    try:
        return load_space(exp.search_space)
    except SpaceError as e:
        fail("search_space", str(e))


def _load_evaluator(exp: Experiment, fail):
    from evomerge.evaluate.config import EvaluatorError, load_evaluator

    try:
        evaluator = load_evaluator(exp.evaluator)
        for split in {evaluator.split, "report"}:  # searched, and scored at export
            evaluator.check_files(split)
    except EvaluatorError as e:
        fail("evaluator", str(e))
    return evaluator


def _check_search(exp: Experiment, evaluator, fail) -> None:
    """The objectives, the optimizer and its options' names, the reference point, multi-fidelity."""
    from evomerge.search.optimizers import OPTIMIZERS, check_options

    names = [o.name for o in evaluator.objectives]
    for i, name in enumerate(exp.objectives or []):
        if name not in names:
            fail(f"objectives[{i}]", f"'{name}' is not an objective of the evaluator ({', '.join(names)})")
    if exp.optimizer.name not in OPTIMIZERS:
        fail("optimizer.name", f"unknown optimizer '{exp.optimizer.name}'; valid: {', '.join(OPTIMIZERS)}")
    try:
        check_options(exp.optimizer.name, exp.optimizer.options)
    except ValueError as e:
        fail("optimizer.options", str(e))
    if exp.reference_point is not None:
        wanted = exp.objectives or names
        if sorted(exp.reference_point) != sorted(wanted):
            fail("reference_point", f"give one value for each objective: {', '.join(wanted)}")
    if exp.fidelity is not None:
        _check_fidelity(exp.fidelity, evaluator, fail)
    if exp.racing is not None:
        _check_racing(exp, evaluator, fail)


def _check_merge_models(exp: Experiment, space, configs: dict, fail, warn, adapters: dict) -> dict[str, int]:
    """A parameter space's models: one architecture and vocabulary (soft differences warned), the
    base's tensors in every expert, LoRA adapters (``adapters``: name -> folder) of the base, the
    workers fit, the genome and options build, the seed recipes exist; returns every model's layer count."""
    from evomerge.models.compat import config_differences, tokenizer_differences

    if space.base in adapters:
        fail(f"models.{space.base}", "a LoRA adapter cannot be the base; give the model it adapts as the base")
    base = configs[space.base]
    base_dir = _local_dir(exp.models[space.base])
    for name, config in configs.items():
        if name == space.base:
            continue
        hard, soft = config_differences(base, config)
        hard_tok, soft_tok = tokenizer_differences(base_dir, _local_dir(exp.models[name]))
        if hard or hard_tok:
            fail(f"models.{name}", f"incompatible with the base '{space.base}': {(hard + hard_tok)[0]}")
        for difference in soft + soft_tok:
            warn(f"models.{name}", f"{difference} (merged anyway: the merged model takes the base's)")
    specs = _check_tensors({n: r for n, r in exp.models.items() if n not in adapters}, space.base, fail)
    lora = _check_adapters(exp, space.base, specs[space.base], adapters, fail)
    if exp.workers.address is None:  # a private pool: this host
        _check_fits_host(exp, specs, space.base, fail, lora)
    counts = {name: _layer_count(name, c, fail) for name, c in configs.items()}
    counts.update(dict.fromkeys(adapters, counts[space.base]))
    genome = _check_genome(exp, space, counts, fail)
    _check_seed_recipes(exp, genome, fail)
    return counts


def _check_seed_recipes(exp: Experiment, genome, fail) -> None:
    """A parameter space's seed recipes read, and are points of the genome (as the campaign encodes them)."""
    from evomerge.recipe import RecipeError, load_recipe
    from evomerge.search.space import SpaceError

    for i, recipe in enumerate(exp.seeds.recipes):
        if not Path(recipe).is_file():
            fail(f"seeds.recipes[{i}]", f"file not found: {recipe}")
        try:
            genome.encode(load_recipe(recipe))
        except (RecipeError, SpaceError, ValueError) as e:
            fail(f"seeds.recipes[{i}]", first_line(e))


def _layer_count(name: str, config: dict, fail) -> int:
    try:
        return num_layers(config)
    except ModelLoadError as e:
        fail(f"models.{name}", str(e))


def _check_genome(exp: Experiment, space, layers: dict[str, int], fail):
    """The genome and optimizer as the campaign will build them: options' values, the dimension."""
    from evomerge.search.optimizers import make_optimizer
    from evomerge.search.space import SpaceError

    try:
        genome = space.genome(layers, exp.seed)
        make_optimizer(exp.optimizer.name, genome.dimension, [], exp.seed, **exp.optimizer.options)
    except SpaceError as e:
        fail("search_space", str(e))
    except (ValueError, TypeError) as e:
        fail("optimizer.options", first_line(e))
    return genome


def _check_tasks_and_tracking(
    exp: Experiment, evaluator, fail, check_tasks: bool, check_tracking: bool, tokenizer_ref: str
) -> None:
    from evomerge.evaluate.config import EvaluatorError

    for field, wanted in evaluator.chat_templates_asked():  # the base's tokenizer (a path's: its first model's)
        templates = chat_templates(tokenizer_ref)
        where = f"evaluator: {evaluator.source}: {field}"
        if not templates:
            fail(where, f"the tokenizer of {tokenizer_ref} has no chat template")
        if isinstance(wanted, str) and wanted not in templates:
            fail(
                where,
                f"the tokenizer of {tokenizer_ref} has no chat template '{wanted}'; it has: {', '.join(templates)}",
            )
    if check_tasks:
        try:
            for split in dict.fromkeys([evaluator.split, "report"]):
                evaluator.check_sources(split)
        except EvaluatorError as e:
            fail("evaluator", str(e))
    if check_tracking and exp.tracking.uri and exp.tracking.uri.startswith(("http://", "https://")):
        problem = tracking_unreachable(exp.tracking.uri)
        if problem:
            fail("tracking.uri", f"tracking server {exp.tracking.uri} unreachable: {problem}")


def _local_dir(ref: str) -> Path | None:
    """A model's files on this machine: its directory, or a hub id's snapshot in the local cache."""
    from evomerge.models.source import cached_snapshot

    path = Path(ref)
    return path if path.is_absolute() else cached_snapshot(ref)


def _check_path_models(exp: Experiment, space, configs: dict, fail, warn) -> dict[str, int]:
    """A layer-path (data-flow) space's models: they can share a hidden state, their headers read,
    the seeds are paths within the models, the workers fit; returns the path's models' layer counts."""
    from evomerge.merge.path import PathError, check_path, check_path_configs
    from evomerge.models.tensors import TensorHeaderError, tensor_specs
    from evomerge.recipe import RecipeError, load_recipe
    from evomerge.search.space import SpaceError

    try:
        check_path_configs({m: configs[m] for m in space.models})
    except PathError as e:
        fail("models", str(e))
    if exp.seeds.baselines:
        fail("seeds.baselines", "the hand baselines are parameter-space merges; a layer-path space has none")
    specs = {}
    for m in space.models:
        try:
            specs[m] = tensor_specs(exp.models[m], Path(exp.models[m]).is_absolute())
        except TensorHeaderError as e:
            fail(f"models.{m}", str(e))
    counts = {m: _layer_count(m, configs[m], fail) for m in space.models}
    genome = _check_genome(exp, space, counts, fail)
    for i, file in enumerate(exp.seeds.recipes):
        if not Path(file).is_file():
            fail(f"seeds.recipes[{i}]", f"file not found: {file}")
        try:
            recipe = load_recipe(file)
            check_path(recipe, counts)
            genome.encode(recipe)
        except (RecipeError, PathError, SpaceError) as e:
            fail(f"seeds.recipes[{i}]", first_line(e))
    if exp.workers.address is None and not exp.workers.gpus_per_worker:
        _check_path_fits_host(exp, specs, fail)
    return counts


def _check_path_fits_host(exp: Experiment, specs: dict, fail) -> None:
    """Each worker of a private CPU pool holds every model of the path (the path itself is references)."""
    from math import prod

    import psutil

    size = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(exp.workers.dtype or "")
    per_worker = sum(
        prod(shape) * (size or DTYPE_BYTES.get(dtype, 4))
        for tensors in specs.values()
        for shape, dtype in tensors.values()
    )
    need, available = per_worker * exp.workers.count, psutil.virtual_memory().available
    if need > available:
        fail(
            "workers",
            f"the models do not fit this machine: {exp.workers.count} worker(s) each hold the path's "
            f"{len(specs)} models ({per_worker / 2**30:.1f} GiB); {available / 2**30:.1f} GiB of memory is available",
        )


def _check_tensors(models: dict[str, str], base: str, fail) -> dict:
    """Every model's tensors line up with the base's, from the safetensors headers alone; returns
    model name -> tensor name -> (shape, dtype name)."""
    from evomerge.models.tensors import TensorHeaderError, first_mismatch, tensor_specs

    try:
        specs = {name: tensor_specs(ref, Path(ref).is_absolute()) for name, ref in models.items()}
    except TensorHeaderError as e:
        fail("models", str(e))
    for name, tensors in specs.items():
        problem = first_mismatch(specs[base], tensors) if name != base else None
        if problem:
            fail(f"models.{name}", f"cannot be merged with the base '{base}': {problem}")
    return specs


def _adapter(ref: str) -> Path | None:
    """``ref``'s folder when it is a LoRA adapter: a local directory, or a hub id found in the local
    hub cache or, online, on the hub (its ``adapter_config.json`` and weights are fetched)."""
    from evomerge.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_folder

    found = adapter_folder(ref)
    if found is not None or Path(ref).is_absolute():
        return found
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode():
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        hf_hub_download(ref, ADAPTER_CONFIG)
        return Path(snapshot_download(ref, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md"]))
    except Exception:  # not an adapter repo (or unreachable): the model checks say which
        return None


def _check_adapters(exp: Experiment, base: str, base_specs: dict, adapters: dict, fail) -> dict[str, int]:
    """Each LoRA adapter is a plain LoRA of the base (``evomerge.models.lora.check_adapter``); returns
    the bytes of each one's factors, which a worker keeps."""
    from evomerge.models.lora import AdapterError, check_adapter, lora_bytes

    out = {}
    for name, folder in adapters.items():
        try:
            check_adapter(folder, base_specs, exp.models[base], _local_dir(exp.models[base]))
        except AdapterError as e:
            fail(f"models.{name}", str(e))
        out[name] = lora_bytes(folder)
    return out


def _check_fidelity(fidelity: FidelityConfig, evaluator, fail) -> None:
    if evaluator.limit is None:
        fail("fidelity", "multi-fidelity needs the evaluator's limit (documents per task at full fidelity)")
    if evaluator.limit < 1:
        fail(
            "fidelity",
            f"rungs count documents: give the evaluator's limit as a number of documents, not a fraction "
            f"({evaluator.limit})",
        )
    if fidelity.rungs[-1] >= evaluator.limit:
        fail(
            "fidelity.rungs",
            f"every rung must score fewer documents than the evaluator's limit ({evaluator.limit}); "
            f"got {fidelity.rungs[-1]}",
        )
    from evomerge.evaluate.kinds import kind_of

    whole = [(o.name, kind_of(o)) for o in evaluator.objectives if not kind_of(o).subsets_documents]
    if whole:
        name, kind = whole[0]
        fail(
            "fidelity",
            f"objective '{name}' is a {kind.noun}: multi-fidelity subsets lm-eval documents only; "
            f"remove fidelity or the {kind.noun} objective",
        )


def _check_racing(exp: Experiment, evaluator, fail) -> None:
    """Racing: not with multi-fidelity; a check share above 0; objectives with per-document scores
    only; an anchor count below every task's pool (the evaluator's or the objective's limit)."""
    from evomerge.evaluate.kinds import kind_of

    racing = exp.racing
    if exp.fidelity is not None:
        fail("racing", "racing and fidelity (multi-fidelity) exclude each other; keep one")
    if racing.check == 0:
        fail("racing.check", "racing without any full-fidelity check: give a share above 0 (default 0.125)")
    wanted = exp.objectives or [o.name for o in evaluator.objectives]
    if racing.rule == "mean" and len({o.direction for o in evaluator.objectives if o.name in wanted}) > 1:
        fail("racing.rule", "the mean rule needs objectives of one direction (all maximized or all minimized)")
    for o in (o for o in evaluator.objectives if o.name in wanted):
        kind = kind_of(o)
        if not kind.subsets_documents:
            fail(
                "racing",
                f"objective '{o.name}' is a {kind.noun}: it has no per-document scores to race on; "
                f"remove racing or the {kind.noun} objective",
            )
        held = o.held_out(evaluator.limit) if hasattr(o, "held_out") else None  # one file for both splits
        limit = held.search if held is not None else getattr(o, "limit", None) or evaluator.limit
        if racing.anchors >= 1 and limit is not None and limit >= 1 and racing.anchors >= limit:
            fail(
                "racing.anchors",
                f"{int(racing.anchors)} anchor documents is not fewer than the {int(limit)} documents "
                f"objective '{o.name}' scores per task",
            )
        if racing.anchors >= 1 and (limit is None or limit < 1):
            fail("racing.anchors", "an anchor count needs the evaluator's limit as a count; give a fraction below 1")


#: Bytes per element of safetensors dtype names.
DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def resident_estimate(exp: Experiment, specs: dict, base: str, lora: dict[str, int] | None = None) -> dict[str, int]:
    """Bytes one worker keeps resident, from the headers and ``workers.memory``: the model (in
    ``workers.dtype`` or as saved), the base (in the model's dtype), the experts' task vectors (a LoRA
    expert's, ``lora``: name -> bytes, its factors), the cache budget."""
    from math import prod

    from evomerge.merge.memory import DEFAULT_CACHE_BYTES
    from evomerge.models.tensors import TORCH_NAMES

    tensors = specs[base]
    numel = sum(prod(shape) for shape, _ in tensors.values())
    saved = sum(prod(shape) * DTYPE_BYTES.get(dtype, 4) for shape, dtype in tensors.values())
    model_size = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(exp.workers.dtype or "")
    model = numel * model_size if model_size else saved
    memory = exp.workers.memory
    expert_dtypes = {TORCH_NAMES.get(d, d) for name, t in specs.items() if name != base for _, d in t.values()}
    # the experts' dtypes unknown (pickled checkpoints have no headers): float32, the larger
    tv_dtype = memory.task_vector_dtype_name(expert_dtypes or {"float32"}, exp.workers.dtype)
    tv_size = 4 if tv_dtype == "float32" else 2
    budget = DEFAULT_CACHE_BYTES if memory.cache_bytes is None else memory.cache_bytes
    # every statistic of every method is at most 40 B/param/expert (evomerge.merge.memory)
    experts = len(specs) - 1 + len(lora or {})
    cache = 0 if memory.cache != "auto" else min(budget, 40 * numel * experts)
    dense = (len(specs) - 1) * numel * tv_size
    return {"model": model, "base": model, "experts": dense + sum((lora or {}).values()), "cache": cache}


#: Host memory of the processes beside their tensors: the controller and Ray's own processes, and
#: each worker's interpreter with torch, transformers and lm-eval loaded (measured on a
#: Qwen2.5-0.5B-shaped campaign: the whole process tree 0.8 GiB over its tensors with one worker;
#: RESULTS.md, "Qwen2.5-0.5B-shaped campaign").
PROCESS_BYTES, WORKER_PROCESS_BYTES = 2**29, 2**29


def _check_fits_host(exp: Experiment, specs: dict, base: str, fail, lora: dict[str, int] | None = None) -> None:
    """Refuse a private pool whose resident tensors in host memory exceed this machine's available
    memory. CPU workers: per worker its model and cache, and the base and task vectors once when
    shared (``workers.memory.share``), else per worker too. GPU workers hold their models on the
    device, but the shared copy of the base and task vectors lives in host memory all the same."""
    import psutil

    parts = resident_estimate(exp, specs, base, lora)
    n, shared = exp.workers.count, exp.workers.memory.share
    inputs = parts["base"] + parts["experts"]
    processes = PROCESS_BYTES + n * WORKER_PROCESS_BYTES
    beside = f"and about {processes / 2**30:.1f} GiB for the processes (the controller, Ray, each worker's Python)"
    available = psutil.virtual_memory().available
    gib = lambda v: f"{v / 2**30:.1f} GiB"  # noqa: E731
    if exp.workers.gpus_per_worker:
        if shared and inputs + processes > available:
            fail(
                "workers",
                f"the shared copy does not fit this machine's memory: the base ({gib(parts['base'])}) and the "
                f"experts' task vectors ({gib(parts['experts'])}) are held once in host memory for the GPU "
                f"workers, {beside}: {gib(inputs + processes)}; {gib(available)} of memory is available",
            )
        return
    need = (parts["model"] + parts["cache"]) * n + (inputs if shared else inputs * n) + processes
    if need > available:
        held = "once, shared by the workers" if shared else "per worker"
        fail(
            "workers",
            f"the models do not fit this machine: {n} worker(s) each hold a model of {gib(parts['model'])} "
            f"and a cache of up to {gib(parts['cache'])}, with the base ({gib(parts['base'])}) and the "
            f"experts' task vectors ({gib(parts['experts'])}) {held}, {beside}: {gib(need)} in all; "
            f"{gib(available)} of memory is available",
        )


def _model_config(ref: str, allow_pickle: bool, fail) -> dict:
    from evomerge.models.source import ModelLoadError, checked_weight_files

    path = Path(ref)
    if path.is_absolute():
        if not path.is_dir():
            fail(f"model directory not found: {ref}")
        if not (path / "config.json").is_file():
            fail(f"{ref}: not a Hugging Face model directory (no config.json)")
        try:
            checked_weight_files(path, allow_pickle)
        except ModelLoadError as e:
            fail(str(e))
        return json.loads((path / "config.json").read_text())
    from huggingface_hub.constants import is_offline_mode

    from evomerge.models.source import cached_snapshot, hub_cache

    if is_offline_mode():
        snapshot = cached_snapshot(ref)
        if snapshot is None or not (snapshot / "config.json").is_file():
            fail(
                f"'{ref}' is not a local directory nor a model in the local hub cache ({hub_cache()}); "
                "offline mode forbids fetching it"
            )
    try:  # a hub id: its config only (small); weights are fetched by the workers
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(ref, "config.json")).read_text())
    except Exception as e:
        fail(f"'{ref}' is not a local directory and its config cannot be fetched from the hub: {first_line(e)}")


def chat_templates(ref: str) -> dict[str, str]:
    """The chat templates of a model's tokenizer, by name (``default`` for the unnamed one), read from
    its files as transformers saves them: ``chat_template.jinja``, ``additional_chat_templates/*.jinja``,
    or ``chat_template`` in ``tokenizer_config.json``. A hub id's files come from the hub (or its cache)."""
    path = Path(ref)
    if not path.is_absolute():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(ref, allow_patterns=["tokenizer_config.json", "*.jinja"]))
        except Exception:  # unreachable: the model check reports it; no template known here
            return {}
    out = {}
    config = path / "tokenizer_config.json"
    value = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if isinstance(value, str):
        out["default"] = value
    elif isinstance(value, list):
        out.update({t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t})
    if (path / "chat_template.jinja").is_file():
        out["default"] = (path / "chat_template.jinja").read_text()
    for file in sorted((path / "additional_chat_templates").glob("*.jinja")):
        out[file.stem] = file.read_text()
    return out


def tracking_unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """None if an MLflow server answers at ``uri``, else why not (one line)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except Exception as e:
        return str(getattr(e, "reason", e))
