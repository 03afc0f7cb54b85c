"""LoRA (PEFT) adapters as experts: an adapter directory (``adapter_config.json`` and
``adapter_model.safetensors``) or the hub id of one, read from its config and safetensors header alone.

An adapter's task vector for a base tensor ``W`` of shape (out, in) is ``B @ A * scaling`` with ``A``
(r, in) and ``B`` (out, r); scaling = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``), r
and lora_alpha per module from ``rank_pattern``/``alpha_pattern``. With ``fan_in_fan_out`` the base
stores ``W`` as (in, out) and the task vector is the transpose. What a plain LoRA cannot express as
that one product (DoRA, ``modules_to_save``, trained biases, embedding or parameter targets, and the
other variants listed in ``REFUSED``) is refused in one line, as is an adapter whose base is not the
campaign's or whose target modules the base lacks. Torch-free: the checks before a campaign use it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from evomerge.models.source import ModelLoadError, cached_snapshot, is_local_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: adapter_config.json keys that, when set, make the adapter more than ``B @ A * scaling`` on the
#: base's linear weights: refused (the reason each is not supported in parentheses).
REFUSED = {
    "use_dora": "DoRA rescales each column of the merged weight by a learned magnitude",
    "modules_to_save": "it replaces whole modules, which is a full fine-tune of them, not a low-rank delta",
    "lora_bias": "it trains a bias beside lora_B",
    "target_parameters": "it adapts raw parameters, not linear modules",
    "trainable_token_indices": "it trains embedding rows",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "layer_replication": "it duplicates layers of the base",
    "use_qalora": "QA-LoRA pools the input of a quantized base",
    "use_bdlora": "it is not a plain low-rank product",
    "arrow_config": "Arrow routes between several LoRAs per token",
    "kasa_config": "it is not a plain low-rank product",
    "velora_config": "it is not a plain low-rank product",
    "monteclora_config": "it is not a plain low-rank product",
}

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.[^.]+)?\.weight$")


class AdapterError(ModelLoadError):
    """An adapter that cannot be an expert of the campaign's base, with the reason in one line."""


@dataclass(frozen=True)
class LoraTarget:
    """One adapted base tensor: its factors' keys in ``adapter_model.safetensors``, rank, scaling, and
    whether the base stores the weight transposed (``fan_in_fan_out``)."""

    tensor: str
    lora_a: str
    lora_b: str
    rank: int
    scaling: float
    transposed: bool


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter checked against its base: ``targets`` by base tensor name; ``dtype``: the factors'
    safetensors dtype name (one for all); ``factor_elements``: the factors' elements in all."""

    folder: Path
    config: dict
    targets: dict[str, LoraTarget]
    dtype: str
    factor_elements: int

    @property
    def weights(self) -> Path:
        return self.folder / ADAPTER_WEIGHTS


def is_adapter_dir(folder: Path) -> bool:
    """Whether a model's folder holds a LoRA adapter (``adapter_config.json``) rather than a model."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_folder(ref: str) -> Path | None:
    """The folder of ``ref`` if it is a LoRA adapter (a local directory, or a hub id's snapshot in the
    local hub cache, holding ``adapter_config.json``), else None. Never contacts the hub."""
    folder = Path(ref).expanduser() if is_local_model(ref) else cached_snapshot(ref)
    return folder if folder is not None and is_adapter_dir(folder) else None


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` of ``folder``, checked to be a plain LoRA (AdapterError naming the field)."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be experts")
    for key, why in REFUSED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {key} is set: not supported ({why})")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias is {config['bias']!r}: not supported (trained biases are not low rank)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    return config


def _pattern_value(patterns: dict, module: str, default):
    """The value of the first key of ``patterns`` that matches ``module`` as a whole dotted suffix
    (peft's rule: the key is a regular expression matched at a name boundary), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def _factor_keys(folder: Path, specs: dict) -> dict[str, dict[str, str]]:
    """module -> {"A": key, "B": key} of the adapter's tensors; AdapterError for any other tensor."""
    modules: dict[str, dict[str, str]] = {}
    for key in specs:
        found = _KEY.match(key)
        if found is None:
            kind = "an embedding LoRA" if ".lora_embedding_" in key else "not a LoRA factor of a linear module"
            raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: tensor '{key}' is {kind}; not supported")
        modules.setdefault(found["module"], {})[found["factor"]] = key
    for module, pair in modules.items():
        if len(pair) != 2:
            raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: module '{module}' has lora_{next(iter(pair))} alone")
    if not modules:
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: holds no LoRA factors")
    return modules


def _target(folder: Path, config: dict, module: str, pair: dict, specs: dict, base_specs: dict) -> LoraTarget:
    """One module's target, its shapes checked against the base tensor's."""
    where = folder / ADAPTER_WEIGHTS
    tensor = f"{module}.weight"
    if tensor not in base_specs:
        raise AdapterError(f"{where}: target module '{module}' is not in the base (no tensor '{tensor}')")
    rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    (a_shape, _), (b_shape, _) = specs[pair["A"]], specs[pair["B"]]
    base_shape = tuple(base_specs[tensor][0])
    transposed = bool(config.get("fan_in_fan_out"))
    if len(base_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
        raise AdapterError(f"{where}: module '{module}' is not a linear layer (base tensor shape {list(base_shape)})")
    if a_shape[0] != rank or b_shape[1] != rank:
        raise AdapterError(
            f"{where}: module '{module}' has lora_A {list(a_shape)} and lora_B {list(b_shape)}, "
            f"but {ADAPTER_CONFIG} gives it rank {rank} (r / rank_pattern)"
        )
    out_in = (base_shape[1], base_shape[0]) if transposed else base_shape
    if (b_shape[0], a_shape[1]) != tuple(out_in):
        raise AdapterError(
            f"{where}: module '{module}' maps {a_shape[1]} -> {b_shape[0]} features, the base's weight "
            f"'{tensor}' has shape {list(base_shape)}" + (" (fan_in_fan_out)" if transposed else "")
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraTarget(tensor, pair["A"], pair["B"], rank, scaling, transposed)


def _declared_base(folder: Path, config: dict) -> str | None:
    declared = config.get("base_model_name_or_path")
    return declared if isinstance(declared, str) and declared.strip() else None


def _same_model(declared: str, folder: Path, base_ref: str, base_dir: Path | None) -> bool:
    """Whether the adapter's declared base names the campaign's base: the same hub id, or the same
    folder (a path relative to the adapter's folder, or a hub id's snapshot in the local cache)."""
    if declared == base_ref:
        return True
    if base_dir is None:
        return False
    path = Path(declared).expanduser()
    candidates = [path if path.is_absolute() else folder / path]
    if not declared.startswith((".", "/", "~")):
        candidates.append(cached_snapshot(declared))
    base = base_dir.resolve()
    return any(c is not None and c.is_dir() and c.resolve() == base for c in candidates)


def check_adapter(folder: Path, base_specs: dict, base_ref: str, base_dir: Path | None) -> LoraAdapter:
    """The adapter in ``folder`` checked against the campaign's base (``base_specs``: its tensor name
    -> (shape, dtype name); ``base_ref`` as the experiment gives it; ``base_dir`` its files here, when
    they are): a plain LoRA of that base, whose every target module the base has, with the shapes
    and ranks its config gives. Raises AdapterError (one line naming the file and field)."""
    from evomerge.models.tensors import FLOAT_DTYPES, TensorHeaderError, tensor_specs

    config = read_adapter_config(folder)
    declared = _declared_base(folder, config)
    if declared is not None and not _same_model(declared, folder, base_ref, base_dir):
        raise AdapterError(
            f"{folder / ADAPTER_CONFIG}: base_model_name_or_path is '{declared}', an adapter of another base "
            f"than the campaign's '{base_ref}' (if it is the same model, write its location there)"
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is not read)")
    try:
        specs = tensor_specs(str(folder), True)
    except TensorHeaderError as e:
        raise AdapterError(str(e)) from None
    dtypes = {dtype for _, dtype in specs.values()}
    if len(dtypes) != 1 or not dtypes <= FLOAT_DTYPES:
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: factors must share one float dtype, got {sorted(dtypes)}")
    targets = {}
    for module, pair in _factor_keys(folder, specs).items():
        target = _target(folder, config, module, pair, specs, base_specs)
        targets[target.tensor] = target
    elements = sum(math.prod(shape) for shape, _ in specs.values())
    return LoraAdapter(folder, config, targets, next(iter(dtypes)), elements)


def lora_bytes(folder: Path) -> int:
    """Bytes of an adapter's factors (as stored, and as a worker keeps them), from its header alone."""
    from evomerge.models.tensors import tensor_specs

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
    return sum(math.prod(shape) * sizes.get(dtype, 4) for shape, dtype in tensor_specs(str(folder), True).values())
