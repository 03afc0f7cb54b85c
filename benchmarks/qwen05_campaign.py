"""A campaign on a model of Qwen2.5-0.5B's exact shape, on CPU, over lm-eval's built-in gsm8k, offline.

    .venv/bin/python benchmarks/qwen05_campaign.py [--candidates 4] [--docs 8] [--fewshot 1]
        [--max-gen-toks 16] [--batch-size 8] [--dtype bfloat16] [--cpus-per-worker 2] [--work DIR]

The model: ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's architecture as its public ``config.json`` gives
it (written out in ``QWEN25_05B`` below, from that file as we know it: hidden 896, intermediate
4864, 24 layers, 14 attention heads, 2 key/value heads, vocabulary 151,936, tied embeddings,
rope_theta 1e6, rms_norm_eps 1e-6, 32,768 positions, no sliding window, bf16 checkpoint: 494,032,768
parameters, which is checked), with seeded random weights (transformers' own initialization), saved
as a bf16 safetensors directory. Two experts: the base plus ``--delta`` x N(0, 1) x the tensor's
standard deviation per entry (constant tensors, the norms' ones: x their mean magnitude), seeded.

The tokenizer is a stand-in: Qwen's cannot be fetched offline, so a byte-level BPE is trained here
(``tokenizers``) on the generated gsm8k rows; its vocabulary (at most ``--tokenizer-vocab``; 709 tokens
on those rows, where the merges run out) is far smaller
than the model's 151,936 embedding rows, which the model keeps (the unused rows still cost memory
and the output projection still computes all 151,936 logits). Its end-of-text token is the model's
bos/eos/pad.

Then ``evomerge --offline run`` (a subprocess, ``HF_HOME`` at the offline data that
``evomerge.zoo.builtin.write_builtin_data`` writes) over task arithmetic on the two experts (a
weight per expert per group of 8 layers: 6 genes), CMA-ES, one worker, the evaluator naming lm-eval's
``gsm8k`` task. While it runs, every process of its tree is sampled each second: summed PSS (what the
tree holds), each process's peak RSS (``VmHWM``), and the machine's shared memory (the object store's
copy of the base and task vectors). Printed: per-candidate materialize and evaluate seconds from the
journal, then the project's prediction by structure (``evomerge.experiment.resident_estimate``,
what the start-up host-memory check adds up; the CPU-only column of ``benchmarks/memory.py``'s "what
fits" table is the same sum plus the Python and torch it measured) against the peaks measured.
Random weights score 0 on gsm8k: this measures time and memory, not quality.
``--cpus-per-worker`` is also the worker's torch threads (default: all the machine's CPUs).
With ``--work`` the models and the campaign stay there; else a temporary folder is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign_scale import smaps  # noqa: E402  (beside this script)

#: Qwen2.5-0.5B's config.json, the architecture fields (token ids are the stand-in tokenizer's).
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}
QWEN25_05B_PARAMS = 494_032_768
EOS = "<|endoftext|>"
GIB = 2**30


def build_tokenizer(vocab: int):
    """A byte-level BPE trained on the generated gsm8k rows, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from evomerge.zoo.builtin import gsm8k_rows

    rows = [r for split in gsm8k_rows().values() for r in split]
    text = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text, trainer)
    print(f"stand-in tokenizer: byte-level BPE, {bpe.get_vocab_size()} tokens (the model keeps 151,936 rows)")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def build_models(root: Path, seed: int, delta: float, tokenizer_vocab: int) -> dict[str, str]:
    """The base and two experts as bf16 safetensors directories under ``root``, the tokenizer in each."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(tokenizer_vocab)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = Qwen2Config(**QWEN25_05B, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    assert params == QWEN25_05B_PARAMS, f"{params} parameters, Qwen2.5-0.5B has {QWEN25_05B_PARAMS}"
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    paths = {}
    for i, name in enumerate(["base", "expert-a", "expert-b"]):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(base[k])
                if i:
                    g = torch.Generator().manual_seed(1000 * seed + 100 * i + list(base).index(k))
                    scale = p.float().std() if p.numel() > 1 and p.float().std() > 0 else p.float().abs().mean()
                    p.add_((delta * scale * torch.randn(p.shape, generator=g)).to(p.dtype))
        out = root / name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        paths[name] = str(out)
    return paths


def write_campaign(work: Path, paths: dict[str, str], args) -> Path:
    """The search space, evaluator and experiment files (JSON, which YAML reads); the experiment's path."""
    space = {
        "base": "base",
        "models": ["expert-a", "expert-b"],
        "method": "task_arithmetic",
        "parameters": {"weight": {"low": 0.0, "high": 1.5}, "lambda": {"fixed": 1.0}},
        "layers": {"granularity": "group", "group_size": 8},
    }
    evaluator = {
        "seed": 0,
        "batch_size": args.batch_size,
        "objectives": [
            {
                "name": "gsm8k",
                "task": "gsm8k",
                "metric": "exact_match,flexible-extract",
                "num_fewshot": args.fewshot,
                "gen_kwargs": {"max_gen_toks": args.max_gen_toks},
                "search_docs": args.docs,
                "report_docs": args.docs,
            }
        ],
    }
    experiment = {
        "name": "qwen05-campaign",
        "seed": 0,
        "models": paths,
        "search_space": str(work / "space.yaml"),
        "evaluator": str(work / "evaluator.yaml"),
        "optimizer": {"name": "cma", "options": {"sigma0": 0.2}},
        "seeds": {"uniform_average": True, "experts_alone": False},
        "budget": {"max_evaluations": args.candidates},
        "workers": {"count": 1, "cpus_per_worker": args.cpus_per_worker, "dtype": args.dtype},
        "output_dir": str(work / "campaign"),
        "tracking": {"uri": None, "kinship": True},
    }
    for name, data in [("space", space), ("evaluator", evaluator), ("experiment", experiment)]:
        (work / f"{name}.yaml").write_text(json.dumps(data, indent=1) + "\n")
    return work / "experiment.yaml"


def peak_rss(pid: int) -> int:
    """A process's peak resident set (VmHWM) in bytes; 0 for a zombie (it has none)."""
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) * 1024 if found else 0


def role(p: psutil.Process, controller: int) -> str:
    """What a process of the campaign's tree is: the controller, a Ray actor by class, or its name."""
    if p.pid == controller:
        return "controller"
    title = " ".join(p.cmdline()) or p.name()
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    return p.name()


def watch(proc: subprocess.Popen, interval: float = 1.0) -> dict:
    """Samples the tree of ``proc`` until it exits: peak summed PSS (and what each role held then), peak
    RSS (VmHWM, kept by the kernel: exact whatever the interval) per role, the machine's shared memory at
    the PSS peak. Reading every process's smaps costs CPU: hence a second between samples."""
    root = psutil.Process(proc.pid)
    peak = {"pss": 0, "at_peak": {}, "shmem": 0, "hwm": {}}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        pss, by_role = 0, {}
        for p in tree:
            try:
                who = role(p, proc.pid)
                _, q = smaps(p.pid)
                peak["hwm"][who] = max(peak["hwm"].get(who, 0), peak_rss(p.pid))
            except (OSError, psutil.Error):
                continue
            pss += q
            by_role[who] = by_role.get(who, 0) + q
        if pss > peak["pss"]:
            peak.update(pss=pss, at_peak=by_role, shmem=psutil.virtual_memory().shared)
        time.sleep(interval)
    return peak


def run_campaign(experiment: Path, hf_home: Path) -> tuple[int, float, dict, str]:
    """``evomerge --offline run`` in a subprocess, watched; (exit status, wall seconds, peaks, output)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    out_dir = experiment.parent / "campaign"
    cmd = [sys.executable, "-m", "evomerge", "--offline", "run", str(experiment), "--out", str(out_dir)]
    started = time.perf_counter()
    with open(experiment.parent / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=experiment.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            peaks = watch(proc)
        finally:
            if proc.poll() is None:  # the watcher failed: stop the campaign cleanly before its files go
                proc.terminate()
                proc.wait()
    seconds = time.perf_counter() - started
    return proc.wait(), seconds, peaks, (experiment.parent / "run.log").read_text()


def candidates(campaign: Path) -> list[dict]:
    """Per finished candidate, from the journal: id, gsm8k score, materialize and evaluate seconds,
    documents, worker wall seconds."""
    rows = []
    for line in (campaign / "journal.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") != "tell":
            continue
        info = event.get("info") or {}
        timings = info.get("timings") or {}
        rows.append(
            {
                "id": event["id"],
                "gsm8k": (event.get("values") or [None])[0],
                "materialize": timings.get("materialize"),
                "evaluate": timings.get("evaluate"),
                "documents": timings.get("documents") or info.get("documents"),
                "wall": info.get("wall_s"),
            }
        )
    return rows


def predicted(experiment: Path) -> dict[str, int]:
    """What the campaign's start-up check predicts one worker holds, by structure (bytes), from the
    safetensors headers: ``evomerge.experiment.resident_estimate``."""
    from evomerge.experiment import load_experiment, resident_estimate
    from evomerge.models.tensors import tensor_specs

    exp = load_experiment(experiment)
    specs = {name: tensor_specs(ref, True) for name, ref in exp.models.items()}
    return resident_estimate(exp, specs, "base")


def print_candidates(rows: list[dict]) -> None:
    print("\n| candidate | gsm8k | materialize (s) | evaluate (s) | documents | documents/s | worker wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["documents"] / r["evaluate"] if r["documents"] and r["evaluate"] else float("nan")
        print(
            f"| {r['id']} | {r['gsm8k']} | {r['materialize']:.2f} | {r['evaluate']:.1f} | {r['documents']} | "
            f"{rate:.3f} | {r['wall']:.1f} |"
        )


def print_memory(parts: dict[str, int], peaks: dict) -> None:
    gib = lambda v: f"{v / GIB:.2f}"  # noqa: E731
    need = parts["model"] + parts["cache"] + parts["base"] + parts["experts"]
    print("\nPredicted (start-up host check, one worker, one shared copy), GiB:")
    print("\n| model | base | experts' task vectors | cache budget | in all |\n|---|---|---|---|---|")
    print(
        f"| {gib(parts['model'])} | {gib(parts['base'])} | {gib(parts['experts'])} | "
        f"{gib(parts['cache'])} | {gib(need)} |"
    )
    print("\nMeasured peaks, GiB (peak RSS = VmHWM, counts the shared copy's pages each process maps):")
    print("\n| process | peak RSS | PSS at the tree's peak |\n|---|---|---|")
    for who, hwm in sorted(peaks["hwm"].items(), key=lambda kv: -kv[1]):
        if hwm >= 50e6:
            print(f"| {who} | {gib(hwm)} | {gib(peaks['at_peak'].get(who, 0))} |")
    print(f"| whole tree (summed PSS) | | {gib(peaks['pss'])} |")
    print(f"\nmachine shared memory at the peak (the object store's copy): {gib(peaks['shmem'])} GiB")
    worker = peaks["hwm"].get("ray::ScoringWorker", 0)
    tensors = parts["model"] + parts["base"] + parts["experts"]
    print(
        f"worker peak RSS {gib(worker)} GiB against its tensors (model + mapped base and task vectors) "
        f"{gib(tensors)} GiB: {gib(worker - tensors)} GiB on top (Python, torch, lm-eval, activations, cache); "
        f"tree PSS {gib(peaks['pss'])} GiB against the check's {gib(need)} GiB"
    )


def machine() -> str:
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    return (
        f"{platform.machine()} {model}, {os.cpu_count()} cpus, {psutil.virtual_memory().total / GIB:.0f} GiB, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads here)"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, default=4, help="the campaign's max_evaluations")
    ap.add_argument("--docs", type=int, default=8, help="gsm8k search_docs (and report_docs)")
    ap.add_argument("--fewshot", type=int, default=1, help="gsm8k num_fewshot")
    ap.add_argument("--max-gen-toks", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", help="workers.dtype: the resident model's dtype")
    ap.add_argument("--cpus-per-worker", type=float, default=os.cpu_count(), help="also the worker's torch threads")
    ap.add_argument("--delta", type=float, default=0.01, help="experts: base + delta x N(0,1) x tensor std")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="keep models and campaign here (default: a temporary folder)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qwen05-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; load average before: {os.getloadavg()}")
    try:
        started = time.perf_counter()
        paths = build_models(work / "models", args.seed, args.delta, args.tokenizer_vocab)
        print(
            f"built base + 2 experts (bf16 safetensors, {QWEN25_05B_PARAMS:,} params each): "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        from evomerge.zoo.builtin import write_builtin_data

        write_builtin_data(work / "hf-home")
        experiment = write_campaign(work, paths, args)
        parts = predicted(experiment)
        code, seconds, peaks, output = run_campaign(experiment, work / "hf-home")
        print(f"evomerge run: exit {code} in {seconds:.0f} s; load average after: {os.getloadavg()}")
        if code != 0:
            print(output[-4000:])
            return 1
        rows = candidates(work / "campaign")
        elapsed = json.loads((work / "campaign" / "campaign.json").read_text()).get("elapsed_s")
        print(
            f"campaign: {len(rows)} candidates, {args.docs} gsm8k documents each ({args.fewshot}-shot, "
            f"max_gen_toks {args.max_gen_toks}, batch {args.batch_size}), model {args.dtype}, "
            f"{args.cpus_per_worker:g} cpus (torch threads) for the worker; "
            f"campaign.json elapsed {elapsed:.0f} s of the {seconds:.0f} s wall"
        )
        print_candidates(rows)
        print_memory(parts, peaks)
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
