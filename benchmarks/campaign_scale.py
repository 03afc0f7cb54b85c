"""Peak memory of a whole campaign on a random-weight model of real size, on this CPU machine.

    .venv/bin/python benchmarks/campaign_scale.py [--hidden 768 --layers 14] [--workers 1]
        [--candidates 3] [--task-vector-dtype auto|bfloat16|float32] [--cache auto|none|all] [--no-share]

Builds a random Llama (float32 safetensors on disk, the zoo's tokenizer) and three experts (the
base plus small random perturbations), then runs `evomerge run` on a DARE-TIES search space over
them (one weight and density per expert, the zoo's add/sort tasks, 10 documents each) and samples
the memory of the whole `evomerge run` process tree (controller, Ray, workers) every 0.1 s.
Printed: parameters, the peak of the summed proportional set size (PSS: a page shared by several
processes, such as the object store's copy of the task vectors, is split between them, so the sum
is what the tree holds), the peak summed RSS beside it, the issue's bound,
8 B/param + experts x 2.5 B/param + 1.5 GB, and PSS by process at the peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def smaps(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


def tree_memory(proc: psutil.Process) -> tuple[int, int, dict[str, int]]:
    """Summed RSS and PSS of ``proc`` and its descendants, and PSS by process name. Summed RSS counts a
    page mapped by several processes (shared libraries, the object store) once per process; PSS
    splits it between them, so summed PSS is the memory the tree really holds."""
    rss = pss = 0
    by_name: dict[str, int] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            r, q = smaps(p.pid)
            name = p.name()
            if name.startswith("python"):  # the controller, the MLflow server, the watchdog: by module
                cmd = p.cmdline()
                name = next((c for c in cmd[1:] if not c.startswith("-")), name).rsplit("/", 1)[-1]
                name = cmd[cmd.index("-m") + 1] if "-m" in cmd else name
        except (OSError, psutil.NoSuchProcess):
            continue
        rss, pss = rss + r, pss + q
        by_name[name] = by_name.get(name, 0) + q
    return rss, pss, by_name


def build_models(root: Path, zoo: Path, hidden: int, layers: int, experts: int) -> tuple[dict, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    zoo_config = json.loads((zoo / "base" / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=zoo_config["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=zoo_config["pad_token_id"],
        bos_token_id=zoo_config["bos_token_id"],
        eos_token_id=zoo_config["eos_token_id"],
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    paths = {}
    for name in ["base", *(f"expert-{i}" for i in range(experts))]:
        if name != "base":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.002 * torch.randn_like(p))
        out = root / name
        model.save_pretrained(out, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(zoo / "base" / f, out / f)
        paths[name] = str(out)
    return paths, params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--task-vector-dtype", default="auto")
    parser.add_argument("--cache", default="auto")
    parser.add_argument("--no-share", action="store_true", help="every worker holds its own base and task vectors")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp:
        tmp = Path(tmp)
        paths, params = build_models(tmp / "models", args.zoo, args.hidden, args.layers, args.experts)
        experts = [n for n in paths if n != "base"]
        (tmp / "space.yaml").write_text(
            json.dumps(
                {
                    "base": "base",
                    "models": experts,
                    "method": ["dare_ties"],
                    "parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.2, "high": 0.9}},
                    "layers": {"granularity": "model"},
                }
            )
        )
        (tmp / "evaluator.json").write_text(
            json.dumps(
                {
                    "limit": 10,
                    "seed": 0,
                    "batch_size": 10,
                    "objectives": [
                        {
                            "name": "add",
                            "task": str(REPO / "evaluators/zoo/zoo_add_{split}.yaml"),
                            "metric": "exact_match",
                        },
                        {"name": "sort", "task": str(REPO / "evaluators/zoo/zoo_sort_{split}.yaml"), "metric": "acc"},
                    ],
                }
            )
        )
        experiment = tmp / "experiment.yaml"
        experiment.write_text(
            json.dumps(
                {
                    "name": "scale",
                    "seed": 0,
                    "models": paths,
                    "search_space": str(tmp / "space.yaml"),
                    "evaluator": str(tmp / "evaluator.json"),
                    "optimizer": {"name": "random"},
                    "seeds": {"uniform_average": True, "experts_alone": False},
                    "reference_point": {"add": 0.0, "sort": 0.0},
                    "budget": {"max_evaluations": args.candidates},
                    "workers": {
                        "count": args.workers,
                        "memory": {
                            "task_vector_dtype": args.task_vector_dtype,
                            "cache": args.cache,
                            "share": not args.no_share,
                        },
                    },
                    "output_dir": str(tmp / "campaign"),
                }
            )
        )
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "evomerge", "--offline", "run", str(experiment)],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watched, peak_rss, peak_pss, at_peak = psutil.Process(proc.pid), 0, 0, {}
        while proc.poll() is None:
            try:
                rss, pss, by_name = tree_memory(watched)
            except psutil.NoSuchProcess:
                break
            peak_rss = max(peak_rss, rss)
            if pss > peak_pss:
                peak_pss, at_peak = pss, by_name
                at_peak["(system Shmem)"] = psutil.virtual_memory().shared
            time.sleep(0.1)
        out, err = proc.communicate()
        seconds = time.perf_counter() - started
    bound = 8 * params + args.experts * 2.5 * params + 1.5e9
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cpus, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    print(
        f"random Llama: {params / 1e6:.1f}M parameters (float32 on disk), {args.experts} experts, "
        f"{args.workers} worker(s), DARE-TIES, {args.candidates} candidates, task vectors {args.task_vector_dtype}, "
        f"cache {args.cache}, {'private copies' if args.no_share else 'one shared copy'}"
    )
    print(
        f"evomerge run: exit {proc.returncode} in {seconds:.0f} s; {out.strip().splitlines()[0] if out else err[-500:]}"
    )
    verdict = (
        f"; bound 8 B/param + {args.experts} x 2.5 B/param + 1.5 GB = {bound / 1e9:.2f} GB: "
        f"{'within' if peak_pss <= bound else 'OVER'}"
        if args.workers == 1
        else ""
    )
    print(
        f"peak of the process tree: summed PSS {peak_pss / 1e9:.2f} GB (summed RSS {peak_rss / 1e9:.2f} GB, "
        f"which counts shared pages once per process){verdict}"
    )
    tv = 2 if args.task_vector_dtype in ("bfloat16", "float16") else 4  # auto: float32 for float32 checkpoints
    inputs, model = params * (4 + args.experts * tv), 4 * params
    copies = 1 if not args.no_share else args.workers
    tensors = copies * inputs + args.workers * model
    print(
        f"tensors: base and task vectors {inputs / 1e9:.2f} GB x {copies} + model {model / 1e9:.2f} GB x "
        f"{args.workers} worker(s) = {tensors / 1e9:.2f} GB; the rest (Python, torch, Ray, MLflow, "
        f"evaluation): {(peak_pss - tensors) / 1e9:.2f} GB"
    )
    shmem = at_peak.pop("(system Shmem)", 0)
    top = sorted(at_peak.items(), key=lambda kv: -kv[1])
    print("PSS by process at the peak: " + ", ".join(f"{n} {b / 1e9:.2f} GB" for n, b in top if b >= 20e6))
    print(f"shared memory in use on the machine at the peak (the object store's copy): {shmem / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
