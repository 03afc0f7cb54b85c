"""On-disk merge: `evomerge merge` vs `mergekit-yaml`, same recipe and inputs, measured in one run.

    .venv/bin/python benchmarks/merge_disk.py [--hidden 768 --layers 12 --vocab 16000]

Builds a random-weight Llama (about 110M parameters by default, bfloat16, as checkpoints ship) and
two perturbed experts on disk, then runs each tool on linear, ties and dare_ties recipes. Each
command runs in its own wrapper process, so its peak RSS is that process tree's alone. Also prints
the machine's memory-copy bandwidth and evomerge's linear merge throughput as a fraction of it.
Target: evomerge at least 3x faster than mergekit on ties.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from random_llama import random_llama  # beside this script

BIN = Path(sys.executable).parent

RECIPES = {
    "linear": lambda d: {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "models": [
            {"model": str(d / "base"), "parameters": {"weight": 0.4}},
            {"model": str(d / "e0"), "parameters": {"weight": 0.3}},
            {"model": str(d / "e1"), "parameters": {"weight": 0.3}},
        ],
    },
    "ties": lambda d: {
        "merge_method": "ties",
        "base_model": str(d / "base"),
        "dtype": "bfloat16",
        "models": [
            {"model": str(d / "e0"), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(d / "e1"), "parameters": {"weight": 0.6, "density": 0.5}},
        ],
    },
    "dare_ties": lambda d: {
        "merge_method": "dare_ties",
        "base_model": str(d / "base"),
        "dtype": "bfloat16",
        "models": [
            {"model": str(d / "e0"), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(d / "e1"), "parameters": {"weight": 0.6, "density": 0.5}},
        ],
    },
}

WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
    "w = time.perf_counter() - t; "
    "print(r.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
    "sys.stderr.write(r.stderr[-1500:] if r.returncode else '')"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one command."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    rc, wall, rss_kb = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"{cmd[0]} failed:\n{out.stderr}")
    return float(wall), int(rss_kb) / 1024


def memcpy_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9  # read + write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=16000)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    bandwidth = memcpy_gbps()
    print(f"memory-copy bandwidth (torch copy_ of 1 GiB, read+write): {bandwidth:.2f} GB/s")
    root = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    try:
        model = random_llama(args.vocab, args.hidden, args.layers).to(torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(root / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for i in range(2):
            model.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base_state.items()})
            model.save_pretrained(root / f"e{i}")
        del model, base_state
        print(f"inputs: random Llama, {n / 1e6:.1f}M parameters, bfloat16, base + 2 experts on disk\n")
        print(
            f"{'method':<11}{'evomerge s':>11}{'mergekit s':>11}{'speed-up':>9}"
            f"{'evomerge MiB':>13}{'mergekit MiB':>13}{'mem ratio':>10}"
        )
        for name, make in RECIPES.items():
            recipe = root / f"{name}.yml"
            recipe.write_text(yaml.safe_dump(make(root)))
            ours = measure(
                [str(BIN / "evomerge"), "merge", str(recipe), "--out", str(root / f"ours-{name}"), "--quiet"]
            )
            theirs = measure([str(BIN / "mergekit-yaml"), str(recipe), str(root / f"theirs-{name}")])
            print(
                f"{name:<11}{ours[0]:>11.1f}{theirs[0]:>11.1f}{theirs[0] / ours[0]:>8.1f}x"
                f"{ours[1]:>13.0f}{theirs[1]:>13.0f}{theirs[1] / ours[1]:>9.1f}x"
            )
            if name == "linear":
                inputs = 3 * n * 2
                written = n * 2
                merge_s = json.loads((root / f"ours-{name}" / "evomerge.json").read_text())["seconds"]
                linear = (inputs + written) / merge_s / 1e9
            shutil.rmtree(root / f"ours-{name}", ignore_errors=True)
            shutil.rmtree(root / f"theirs-{name}", ignore_errors=True)
        print(
            f"\nevomerge linear merge loop (excluding start-up): {linear:.2f} GB/s of bfloat16 in+out, "
            f"{linear / bandwidth:.0%} of the memory-copy bandwidth"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
