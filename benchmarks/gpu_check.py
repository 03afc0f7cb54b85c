"""The prepared GPU check: one run on a machine with one NVIDIA GPU (an 80 GB H100 or an H200), estimated
at 5-8 minutes, that prints what the GPU path does and writes it as markdown tables.

    benchmarks/gpu_check.sh [--out FILE] [--cpu-dry-run] [--keep] [--candidates N] [--campaigns device,host]

(the shell script sets the offline environment and calls this with the project's Python). Stages,
each guarded: a failure is written into its table and the next stage still runs.

1. Models: a random-weight Llama of Llama-3.2-1B's shape (untied embeddings: 1.5B parameters, bf16)
   built on the GPU, and two experts (the base plus 0.002 N(0, 1) per entry), saved as safetensors
   with a character tokenizer (the zoo's, built in code) into a temporary directory.
2. Merge methods: every registered method merged by ``ResidentMerge`` on CUDA and on the CPU from the
   same inputs (four tensors of the model's real shapes), in float32 and in bfloat16; the largest
   difference and the entries outside the tolerance (see ``TOLERANCES``) per method.
3. Campaigns: ``evomerge run`` with two workers on the one GPU (0.5 GPU each), TIES over the two
   experts, a random search, once with ``workers.memory.experts_on: device`` and once with ``host``,
   scored on a local multiple-choice lm-eval task (generated here, character-tokenized).
4. Memory per worker: the largest ``torch.cuda.max_memory_allocated`` of its candidates (the
   ``device_peak_gib`` timing) and nvidia-smi's peaks, against the prediction of the "what fits"
   formula of ``benchmarks/memory.py`` and against ``fit_device``'s count.
5. Scoring speed: lm-eval documents per second of evaluation, per candidate.

Without CUDA it exits 2 with one line, unless ``--cpu-dry-run``: the same stages on the CPU with a
tiny model (the device side is then the CPU too, so the method table only proves the plumbing).
Exit status: 0 when every stage ran and every comparison passed, 1 otherwise. The tables are written
after every stage, and each campaign's log beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in OFFLINE_ENV.items():  # before torch, transformers or ray are imported
    os.environ.setdefault(_key, _value)

GIB = 2**30
EXPERTS = ("expert-a", "expert-b")
#: Each expert's task vector: this times N(0, 1) per entry (the base's matrices are N(0, 0.02)).
DELTA_STD = 0.002
#: Per dtype (relative, absolute as a fraction of the merged task vector's largest entry): an entry
#: passes when |device - cpu| <= rel * |cpu| + abs * scale. float32: the same float32 ops in another
#: order (fused multiply-adds, reduction order of norms and sums) differ by a few ulps (6e-8 each).
#: bfloat16: each entry is rounded once from float32, so ulp-level differences before the rounding
#: become one bf16 ulp (at most 2^-7 of the value) where they straddle a rounding boundary.
TOLERANCES = {"float32": (1e-6, 1e-5), "bfloat16": (2.0**-7, 1e-5)}
#: Entries allowed outside the tolerance: a mask decided by a comparison (a selection threshold, an
#: elected sign, PCB's balance through exp/tanh) may flip for an entry whose deciding value is within
#: an ulp of the boundary on one device and not on the other; such an entry differs by its whole size.
MAX_OUTSIDE = 1e-5


# --- the report: markdown tables, each stage's errors written into its own ------------------------


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False

    def add(self, *cells) -> None:
        self.rows.append([fmt(c) for c in cells])

    def error(self, message: str) -> None:
        """A stage that raised: one row saying so (the traceback goes to stderr)."""
        self.failed = True
        self.rows.append([f"ERROR: {message}"] + [""] * (len(self.header) - 1))

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        for row in self.rows:
            cells = [c.replace("|", "/").replace("\n", " ") for c in row]
            lines.append("| " + " | ".join(cells + [""] * (len(self.header) - len(cells))) + " |")
        lines += [""] + [f"{n}" for n in self.notes] if self.notes else []
        return "\n".join(lines) + "\n"


def fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def guarded(table: Table, stage: Callable, *args, label: str = "", mirror: tuple[Table, ...] = ()):
    """Run one stage, ``stage(table, *args)``; an exception becomes an error row (``label`` first) of
    its table and of the ``mirror`` tables, and None is returned."""
    started, name = time.perf_counter(), table.title + (f" ({label})" if label else "")
    log(f"stage: {name}")
    try:
        return stage(table, *args)
    except Exception as e:  # one stage's failure must not cost the next stages their run
        traceback.print_exc()
        text = str(e).strip()
        message = f"{label + ': ' if label else ''}{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        for t in (table, *mirror):
            t.error(message[:400])
        return None
    finally:
        log(f"  {name}: {time.perf_counter() - started:.0f} s")


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- stage 0: the machine ------------------------------------------------------------------------


def describe_machine(table: Table, device: str) -> None:
    import platform

    import torch

    table.add("python", platform.python_version())
    table.add("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")
    table.add("CPUs", os.cpu_count())
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        table.add("GPU", f"{props.name}, {props.total_memory / GIB:.1f} GiB, {torch.cuda.device_count()} visible")
        table.add("GPU free at start", f"{torch.cuda.mem_get_info()[0] / GIB:.1f} GiB")
    else:
        table.add("GPU", "none: CPU dry run")
    smi = shutil.which("nvidia-smi")
    table.add("nvidia-smi", smi or "not found")
    shm = shutil.disk_usage("/dev/shm") if Path("/dev/shm").exists() else None
    table.add("/dev/shm (Ray's object store)", f"{shm.total / GIB:.1f} GiB" if shm else "absent")


# --- stage 1: the models -------------------------------------------------------------------------


@dataclass
class Size:
    """The model and workload of a run: the real one, or the dry run's tiny one."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's
    positions: int
    docs: int  # documents of the lm-eval task
    prompt_chars: int
    batch_size: int
    cpus_per_worker: int
    gpus_per_worker: float
    campaign_timeout_s: int


REAL = Size(2048, 16, 32, 8, 8192, 128256, 2048, 256, 120, 32, 4, 0.5, 150)
TINY = Size(64, 2, 4, 2, 128, None, 256, 16, 24, 8, 1, 0.0, 150)


def tokenizer():
    """The zoo's character tokenizer (built in code: no file, no hub)."""
    from evomerge.zoo.skills import ALPHABET
    from evomerge.zoo.tokenizer import train_tokenizer

    return train_tokenizer([ALPHABET])


def llama_config(size: Size, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size.vocab or len(tok),
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=size.positions,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


@dataclass
class Models:
    dirs: dict[str, str]
    params: int
    largest: int  # elements of the largest tensor
    config: object


def build_models(table: Table, root: Path, size: Size, device: str) -> Models:
    """Base and experts generated on ``device`` (bf16), saved one model at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    tok = tokenizer()
    tok.model_max_length = size.positions  # the zoo's is 64 tokens; these prompts are longer
    config = llama_config(size, tok)
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    base = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    del model
    params = sum(v.numel() for v in base.values())
    largest = max(v.numel() for v in base.values())
    dirs = {}
    for i, name in enumerate(("base", *EXPERTS)):
        gen = torch.Generator(device=device).manual_seed(i)
        state = base
        if name != "base":
            state = {
                k: (v.float() + DELTA_STD * torch.randn(v.shape, generator=gen, device=device)).to(torch.bfloat16)
                for k, v in base.items()
            }
        out = root / name
        out.mkdir(parents=True)
        config.save_pretrained(out)
        tok.save_pretrained(out)
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"})
        dirs[name] = str(out)
        del state
    del base
    if device == "cuda":
        torch.cuda.empty_cache()
    disk = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
    table.add(
        "random Llama (Llama-3.2-1B shape, untied)" if size is REAL else "random Llama (tiny)",
        f"{params / 1e9:.3f}B" if params >= 1e8 else f"{params / 1e6:.2f}M",
        f"hidden {size.hidden}, {size.layers} layers, vocab {config.vocab_size}",
        f"{disk / GIB:.2f} GiB",
        f"{time.perf_counter() - started:.1f}",
    )
    return Models(dirs, params, largest, config)


# --- stage 2: every merge method, CUDA against the CPU --------------------------------------------


def method_inputs(config, dtype: str):
    """(base, experts) of four tensors of the model's real shapes (the first layer's q and the last
    layer's k projection, two norms; an MLP matrix would quadruple the CPU side's time): the base
    N(0, 0.02) (norms 1 + that), each expert the base plus DELTA_STD N(0, 1); drawn in float32 on
    the CPU, cast to ``dtype``."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    last, mid = config.num_hidden_layers - 1, config.num_hidden_layers // 2  # first, middle and last layers
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{last}.self_attn.k_proj.weight",
        f"model.layers.{mid}.post_attention_layernorm.weight",
        "model.norm.weight",
    ]
    gen = torch.Generator().manual_seed(0)
    base = {
        n: 0.02 * torch.randn(shapes[n], generator=gen) + (1.0 if n.endswith("norm.weight") else 0.0) for n in names
    }
    experts = {e: {n: t + DELTA_STD * torch.randn(t.shape, generator=gen) for n, t in base.items()} for e in EXPERTS}
    cast = lambda state: {n: t.to(getattr(torch, dtype)) for n, t in state.items()}  # noqa: E731
    return cast(base), {e: cast(state) for e, state in experts.items()}


def holder(tensors: dict, num_layers: int, device: str):
    """A module whose parameters are ``tensors`` under their dotted names (what ResidentMerge writes
    into), with the config attribute it reads the layer count from."""
    from types import SimpleNamespace

    import torch

    root = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(t.clone().to(device), requires_grad=False))
    root.config = SimpleNamespace(num_hidden_layers=num_layers)
    return root


def method_recipe(name: str):
    """A recipe of method ``name`` over the experts with values inside its declared ranges: weights
    0.6 and 0.4, density 0.5, slerp's t 0.3; other required parameters at their range's middle."""
    from evomerge.merge.registry import REQUIRED, get_method
    from evomerge.recipe import parse_recipe

    method = get_method(name)
    chosen = EXPERTS[: 1 if method.max_models == 1 else 2]
    picked = {"weight": [0.6, 0.4], "density": 0.5, "t": 0.3}

    def value(p, i: int):
        if p.name in picked:
            v = picked[p.name]
            return v[i] if isinstance(v, list) else v
        if p.default is not REQUIRED:
            return p.default
        low, high = p.low if p.low is not None else 0.0, p.high if p.high is not None else 1.0
        return (low + high) / 2

    models = [
        {"model": e, "parameters": {p.name: value(p, i) for p in method.model_params if value(p, i) is not None}}
        for i, e in enumerate(chosen)
    ]
    data = {"merge_method": name, "models": models, "evomerge": {"seed": 0}}
    data["parameters"] = {p.name: value(p, 0) for p in method.shared_params}
    if method.base_is_origin:
        data["base_model"] = "base"
    return parse_recipe(data, f"<{name}>")


def compare(reference: dict, merged: dict, base: dict, dtype: str) -> tuple[float, float, int, int, bool]:
    """(max |merged - reference|, that over the merged task vector's largest entry, entries outside
    the tolerance, entries, all finite)."""
    import torch

    rel, absolute = TOLERANCES[dtype]
    scale = max(float((reference[n].double() - base[n].double()).abs().max()) for n in reference) or 1.0
    worst, outside, total, finite = 0.0, 0, 0, True
    for n, ref in reference.items():
        r, m = ref.double(), merged[n].double()
        finite = finite and bool(torch.isfinite(m).all())
        diff = (m - r).abs()
        worst = max(worst, float(diff.max()))
        outside += int((diff > rel * r.abs() + absolute * scale).sum())
        total += r.numel()
    return worst, worst / scale, outside, total, finite


def compare_methods(table: Table, config, device: str) -> None:
    """Each registered method on ``device`` against the CPU, float32 and bfloat16 inputs: one
    ResidentMerge per device and dtype, the methods merged in turn (as a worker's search would)."""
    import torch

    import evomerge.merge.chunks as chunks
    from evomerge.merge.apply import ResidentMerge
    from evomerge.merge.registry import METHODS

    for dtype in ("float32", "bfloat16"):
        base, experts = method_inputs(config, dtype)
        # the dry run's "device" is the CPU: a second ResidentMerge there, so the plumbing is the same
        resident = {
            side: ResidentMerge(holder(base, config.num_hidden_layers, where), base, experts)
            for side, where in (("cpu", "cpu"), ("device", device))
        }
        for name in sorted(METHODS):
            try:
                recipe = method_recipe(name)
                seconds, results = {}, {}
                for side, merge in resident.items():
                    seconds[side] = merge.materialize(recipe).seconds
                    results[side] = {n: p.detach().to("cpu", copy=True) for n, p in merge.params.items()}
                worst, worst_rel, outside, total, finite = compare(results["cpu"], results["device"], base, dtype)
                ok = finite and outside <= MAX_OUTSIDE * total
                table.add(
                    name,
                    dtype,
                    worst,
                    worst_rel,
                    f"{outside} / {total}",
                    seconds["cpu"],
                    seconds["device"],
                    "pass" if ok else "FAIL",
                )
                table.failed |= not ok
            except Exception as e:  # one method's failure is its row; the others still run
                traceback.print_exc()
                table.failed = True
                table.add(name, dtype, "", "", "", "", "", f"ERROR: {type(e).__name__}: {str(e)[:200]}")
        del resident
    chunks.SCRATCH._bufs.clear()  # the reused chunk buffers on the GPU: hand them back before the campaigns
    if device == "cuda":
        torch.cuda.empty_cache()
    n = sum(v.numel() for v in base.values())
    table.notes.append(
        f"{n:,} entries per method and dtype (four tensors of the model's shapes), 2 experts "
        f"(slerp: 1). Tolerance per entry: float32 {TOLERANCES['float32'][0]:g} x |cpu| + "
        f"{TOLERANCES['float32'][1]:g} x the merged task vector's largest entry; bfloat16 2^-7 x |cpu| + the "
        f"same (one bf16 ulp, where float32 values a few ulps apart round to neighbouring bf16 values); "
        f"pass: finite and at most {MAX_OUTSIDE:g} of the entries outside (a mask decided by a comparison may "
        "flip where the deciding value is within an ulp of the boundary). Seconds: the first merge of the "
        "method on each side (cached statistics built then)."
    )


# --- stage 3: two-worker campaigns on the one GPU ------------------------------------------------


def write_task(root: Path, size: Size) -> str:
    """A local multiple-choice lm-eval task in the zoo's task format, one file per split (search and
    report: disjoint documents): a prompt of ``prompt_chars`` random letters and four 8-letter
    choices. A random model scores chance; the point is the work. Returns the evaluator's task path."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    word = lambda n: "".join(rng.choice(letters) for _ in range(n))  # noqa: E731
    for split in ("search", "report"):
        data = root / f"choice_{split}.jsonl"
        with open(data, "w") as f:
            for _ in range(size.docs):
                doc = {"prompt": f"{word(size.prompt_chars)}=", "choices": [word(8) for _ in range(4)]}
                f.write(json.dumps({**doc, "label": rng.randrange(4)}) + "\n")
        task = {
            "task": f"gpu_check_choice_{split}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (root / f"gpu_check_choice_{split}.yaml").write_text(json.dumps(task, indent=1))
    return str(root / "gpu_check_choice_{split}.yaml")


def write_campaign(root: Path, models: Models, task: str, size: Size, experts_on: str, candidates: int) -> Path:
    """The experiment file (and its space and evaluator) of one campaign under ``root``."""
    root.mkdir(parents=True)
    (root / "space.yaml").write_text(
        json.dumps(
            {
                "base": "base",
                "models": list(EXPERTS),
                "method": ["ties"],
                "parameters": {"weight": {"low": 0.2, "high": 1.0}, "density": {"low": 0.2, "high": 0.9}},
                "layers": {"granularity": "model"},
            }
        )
    )
    (root / "evaluator.yaml").write_text(
        json.dumps(
            {
                "limit": size.docs,
                "seed": 0,
                "batch_size": size.batch_size,
                "objectives": [{"name": "choice", "task": task, "metric": "acc"}],
            }
        )
    )
    experiment = {
        "name": f"gpu-check-{experts_on}",
        "seed": 0,
        "models": models.dirs,
        "search_space": "space.yaml",
        "evaluator": "evaluator.yaml",
        "optimizer": {"name": "random"},
        "seeds": {"uniform_average": True, "experts_alone": False},
        "reference_point": {"choice": 0.0},
        "budget": {"max_evaluations": candidates},
        "workers": {
            "count": 2,
            "cpus_per_worker": size.cpus_per_worker,
            "gpus_per_worker": size.gpus_per_worker,
            "dtype": "bfloat16",
            "memory": {"experts_on": experts_on},
        },
        "output_dir": str(root / "campaign"),
        "tracking": {"uri": None},
    }
    path = root / "experiment.yaml"
    path.write_text(json.dumps(experiment, indent=1))
    return path


class GpuSampler:
    """nvidia-smi every 0.5 s in a thread: the peak of the whole GPU's memory.used and of each
    process's used memory (MiB); empty where nvidia-smi is missing or lists no processes (containers)."""

    def __init__(self):
        self.gpu_peak = 0
        self.by_pid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    @staticmethod
    def _query(args: list[str]) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
        ).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def used(self) -> int:
        """memory.used of GPU 0 now, MiB (0 without nvidia-smi)."""
        if not self.available:
            return 0
        try:
            return int(self._query(["--query-gpu=memory.used", "-i", "0"])[0][0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.gpu_peak = max(self.gpu_peak, self.used())
            try:
                for pid, mib in self._query(["--query-compute-apps=pid,used_memory"]):
                    if int(pid) != os.getpid():  # this script's own CUDA context is not a worker's
                        self.by_pid[int(pid)] = max(self.by_pid.get(int(pid), 0), int(mib))
            except (OSError, subprocess.SubprocessError, ValueError):
                pass

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=15)


@dataclass
class CampaignRun:
    experts_on: str
    returncode: int | None  # None: stopped at the time limit
    seconds: float
    told: list[dict]  # the journal's tell events
    stages: dict[str, float]  # seconds from the start to each stage of the session
    gpu_baseline_mib: int
    gpu_peak_mib: int
    by_pid_mib: dict[int, int]
    tail: str


def run_campaign(root: Path, experiment: Path, experts_on: str, timeout_s: int) -> CampaignRun:
    """``evomerge run`` in a subprocess (its own process group, so a time-out can stop all of it)."""
    import signal

    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    sampler = GpuSampler()
    baseline = sampler.used()
    started = time.perf_counter()
    with open(root / "run.log", "w") as logfile, sampler:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evomerge", "--offline", "run", str(experiment)],
            cwd=root,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
            proc.send_signal(signal.SIGINT)  # the campaign stops cleanly on an interrupt (its workers, its Ray)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.perf_counter() - started
    # the log's last lines, the temporary directory's path shortened (it is gone after the run)
    tail = (root / "run.log").read_text(errors="replace")[-3000:].replace(str(root.parent), "<tmp>")
    told, stages = read_campaign(root / "campaign")
    return CampaignRun(experts_on, code, seconds, told, stages, baseline, sampler.gpu_peak, sampler.by_pid, tail)


def read_campaign(folder: Path) -> tuple[list[dict], dict[str, float]]:
    """(the journal's tell events, the last session's stages: seconds from the start of `evomerge
    run` to each of checked, ray, shared, workers, first_result, ...), whatever exists of them."""
    told, stages = [], {}
    journal = folder / "journal.jsonl"
    for line in journal.read_text().splitlines() if journal.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:  # a line cut short by the time limit
            continue
        if event.get("event") == "tell":
            told.append(event)
    try:
        stages = json.loads((folder / "campaign.json").read_text())["sessions"][-1]["stages"]
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return told, stages


def predicted_bytes(models: Models, experts_on: str) -> dict[str, float]:
    """GPU bytes one worker holds, by the "what fits" formula of ``benchmarks/memory.py`` (bf16 model,
    base and task vectors; up to 9 reused chunk buffers plus a statistic pass's temporaries, ~24
    B/element of a chunk; the drop-mask bits, E/8 B per element of the largest tensor; with the
    experts on the host, the streamed copies of the largest tensor), and ``fit_device``'s count."""
    import evomerge.merge.chunks as chunks
    from evomerge.merge.memory import DEFAULT_CACHE_BYTES, DEFAULT_RESERVE_BYTES

    p, big, e = models.params, models.largest, len(EXPERTS)
    working = (9 * 4 + 24) * chunks.CHUNK_CUDA + e / 8 * big
    if experts_on == "device":
        table = 2 * p + 2 * p + e * 2 * p + DEFAULT_CACHE_BYTES + working
        fit = 2 * p + 2 * p + e * 2 * p
    else:
        table = 2 * p + working + (e + 1) * 2 * big
        fit = 2 * p
    return {"table": table, "fit_device": fit, "reserve": DEFAULT_RESERVE_BYTES}


def campaign(
    table: Table, tables: dict, models: Models | None, root: Path, size: Size, candidates: int, experts_on: str
) -> None:
    """One campaign with the experts at ``experts_on`` (``device`` or ``host``), into its rows of the
    campaign, memory and speed tables."""
    if models is None:
        raise RuntimeError("no models: stage 1 failed")
    task = root / "gpu_check_choice_{split}.yaml"
    if not (root / "gpu_check_choice_search.yaml").exists():
        write_task(root, size)
    folder = root / f"campaign-{experts_on}"
    experiment = write_campaign(folder, models, str(task), size, experts_on, candidates)
    report_campaign(tables, run_campaign(folder, experiment, experts_on, size.campaign_timeout_s), models)


def report_campaign(tables: dict[str, Table], run: CampaignRun, models: Models) -> None:
    done = [t for t in run.told if t.get("values") is not None]
    failed = [t for t in run.told if t.get("values") is None]
    exit_ = "time limit" if run.returncode is None else run.returncode
    infos = [t.get("info", {}) for t in run.told]
    timings = [i.get("timings", {}) for i in infos]
    materialize = [t["materialize"] for t in timings if "materialize" in t]
    reasons = sorted({i.get("reason", "") for i in infos if i.get("reason")})
    ok = run.returncode == 0 and done and not failed
    tables["campaign"].failed |= not ok
    tables["campaign"].add(
        run.experts_on,
        exit_,
        len(done),
        len(failed),
        run.seconds,
        statistics.median(materialize) if materialize else "",
        ", ".join(f"{k} {v:.0f}" for k, v in run.stages.items()),
        "; ".join(reasons)[:300] or ("" if ok else run.tail.strip().splitlines()[-1][:300] if run.tail.strip() else ""),
    )
    memory_rows(tables["memory"], run, models, infos)
    speed_rows(tables["speed"], run, infos)


def memory_rows(table: Table, run: CampaignRun, models: Models, infos: list[dict]) -> None:
    predicted = predicted_bytes(models, run.experts_on)
    smi_pids = ", ".join(f"{mib / 1024:.1f}" for _, mib in sorted(run.by_pid_mib.items())) or "n/a"
    smi_gpu = f"{(run.gpu_peak_mib - run.gpu_baseline_mib) / 1024:.1f}" if run.gpu_peak_mib else "n/a"
    by_worker: dict[int, float] = {}
    for info in infos:
        peak = info.get("timings", {}).get("device_peak_gib")
        if peak is not None:
            worker = info.get("worker", -1)
            by_worker[worker] = max(by_worker.get(worker, 0.0), peak)
    workers = sorted(by_worker) or ["n/a (no device peak: CPU)"]
    for w in workers:
        peak = by_worker.get(w)
        bound = (predicted["table"] + predicted["reserve"]) / GIB
        verdict = "" if peak is None else ("within" if peak <= bound else "OVER")
        table.add(
            run.experts_on,
            w,
            "" if peak is None else peak,
            predicted["table"] / GIB,
            predicted["fit_device"] / GIB,
            verdict,
            smi_pids,
            smi_gpu,
        )


def speed_rows(table: Table, run: CampaignRun, infos: list[dict]) -> None:
    rates = []
    for info in infos:
        t = info.get("timings", {})
        if info.get("documents") and t.get("evaluate"):
            rates.append((info["documents"], t["evaluate"], t.get("forward", 0.0), info["documents"] / t["evaluate"]))
    if not rates:
        table.add(run.experts_on, "no candidate scored")
        return
    per_s = [r[3] for r in rates]
    table.add(
        run.experts_on,
        len(rates),
        rates[0][0],
        statistics.median(per_s),
        min(per_s),
        max(per_s),
        statistics.median(r[2] / r[1] for r in rates),
    )


# --- the run -------------------------------------------------------------------------------------


def make_tables() -> dict[str, Table]:
    return {
        "machine": Table("Machine", ["what", "value"]),
        "models": Table("1. Models", ["model", "parameters", "shape", "on disk (3 models)", "built in (s)"]),
        "methods": Table(
            "2. Merge methods, device against CPU",
            [
                "method",
                "dtype",
                "max abs diff",
                "max diff / task vector",
                "entries outside tol",
                "CPU (s)",
                "device (s)",
                "result",
            ],
        ),
        "campaign": Table(
            "3. Campaigns: 2 workers on one GPU, TIES, random search",
            [
                "experts_on",
                "exit",
                "candidates done",
                "failed",
                "wall (s)",
                "merge per candidate (s)",
                "stages reached (s)",
                "notes",
            ],
        ),
        "memory": Table(
            "4. Device memory per worker (GiB)",
            [
                "experts_on",
                "worker",
                "peak allocated",
                "predicted (fit table)",
                "fit_device counts",
                "peak vs predicted + reserve",
                "nvidia-smi per process",
                "nvidia-smi whole GPU",
            ],
        ),
        "speed": Table(
            "5. Scoring speed (lm-eval documents per second of evaluation)",
            [
                "experts_on",
                "candidates",
                "documents each",
                "docs/s median",
                "docs/s min",
                "docs/s max",
                "forward share of evaluation",
            ],
        ),
    }


def add_notes(tables: dict[str, Table], size: Size, candidates: int) -> None:
    tables["campaign"].notes.append(
        f"`evomerge run`, {candidates} candidates (the uniform average first), workers.count 2, "
        f"gpus_per_worker {size.gpus_per_worker}, cpus_per_worker {size.cpus_per_worker}, dtype bfloat16, "
        f"cache auto, share true; time limit {size.campaign_timeout_s} s each. Merge per candidate: the median "
        "`materialize` timing. Stages: seconds from the start of `evomerge run` (campaign.json's session). "
        "Each campaign's whole log is written beside the markdown file (gpu_check_campaign-<experts_on>.log)."
    )
    tables["memory"].notes.append(
        "Peak allocated: the largest `device_peak_gib` (torch.cuda.max_memory_allocated, reset per candidate) "
        "of the worker's candidates: resident tensors plus the evaluation's activations. Predicted: the "
        'formula of benchmarks/memory.py\'s "what fits" table (model, base and task vectors in bf16, the cache '
        "budget where the task vectors live, working buffers, drop-mask bits, streamed copies); fit_device "
        "counts model, base and task vectors on the device and adds reserve_bytes (4 GiB) for activations: "
        '"within" means peak <= predicted + reserve. nvidia-smi: per process (CUDA context and the caching '
        "allocator's reserve included; n/a where it lists no processes, as in containers) and the whole GPU's "
        "memory.used peak less its value before the campaign."
    )
    tables["speed"].notes.append(
        f"One local multiple-choice task, {size.docs} documents of {size.prompt_chars + 1}-token prompts and "
        f"four 8-token choices (character tokenizer), lm-eval batch size {size.batch_size}; docs/s = "
        "documents / the `evaluate` timing of a candidate (min: usually a worker's first, with warm-up); "
        "forward share: the `forward` timing (inside the model) over `evaluate`."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="markdown file (default: $OUT/gpu_check.md when $OUT is set)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU: the same stages on the CPU, tiny sizes")
    parser.add_argument("--candidates", type=int, default=None, help="per campaign (default 6, dry run 3)")
    parser.add_argument("--campaigns", default="device,host", help="experts_on of each campaign, comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (models, campaigns)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary directory goes")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False); use --cpu-dry-run to run the "
            "stages on the CPU",
            file=sys.stderr,
        )
        return 2
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else None)
    report = Report(make_tables(), out, args.cpu_dry_run)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="evomerge-gpu-check-", dir=args.workdir))
    try:
        run_stages(report, root, args)
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(report.markdown())
    report.save()
    return 1 if any(t.failed for t in report.tables.values()) else 0


@dataclass
class Report:
    """The tables, written to ``out`` after every stage: a run stopped from outside keeps what it did."""

    tables: dict[str, Table]
    out: Path | None
    dry_run: bool
    started: float = field(default_factory=time.perf_counter)

    def markdown(self) -> str:
        title = "GPU check" + (" (CPU dry run: tiny model, the device is the CPU)" if self.dry_run else "")
        head = f"## {title}\n\nTotal: {time.perf_counter() - self.started:.0f} s.\n\n"
        return head + "\n".join(t.markdown() for t in self.tables.values())

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(self.markdown())


def run_stages(report: Report, root: Path, args) -> None:
    device, size = ("cpu", TINY) if args.cpu_dry_run else ("cuda", REAL)
    candidates = args.candidates or (3 if args.cpu_dry_run else 6)
    tables = report.tables
    add_notes(tables, size, candidates)
    guarded(tables["machine"], describe_machine, device)
    models = guarded(tables["models"], build_models, root / "models", size, device)
    report.save()
    config = models.config if models else llama_config(size, tokenizer())
    guarded(tables["methods"], compare_methods, config, device)
    report.save()
    for place in [p for p in args.campaigns.split(",") if p]:
        guarded(
            tables["campaign"],
            campaign,
            tables,
            models,
            root,
            size,
            candidates,
            place,
            label=f"experts_on {place}",
            mirror=(tables["memory"], tables["speed"]),
        )
        if report.out is not None:  # the campaign's whole log beside the tables
            log_file = root / f"campaign-{place}" / "run.log"
            if log_file.exists():
                shutil.copy(log_file, report.out.parent / f"gpu_check_campaign-{place}.log")
        report.save()


if __name__ == "__main__":
    sys.exit(main())
