"""Memory per worker: exact resident bytes, peak RSS and time per candidate of each memory mode of
``ResidentMerge``, and what fits where, computed from the bytes measured.

    .venv/bin/python benchmarks/memory.py [--hidden 768 --layers 12 --vocab 10000 --experts 3 --repeats 3]

A random-weight Llama of about 100M parameters (float32, CPU) and ``--experts`` experts: the base
plus 0.01 N(0, 1) per entry, generated tensor by tensor as the merge reads them. Per mode (cache all
/ none x task vectors float32 / bfloat16) one ResidentMerge; per method, in turn: a first candidate
(it builds whatever the mode caches), then ``--repeats`` candidates with fresh random parameters,
each followed by a linear candidate (the ratio is taken side by side, median); then the bytes from
``resident_bytes()`` ("tensors held": model, base, task vectors, caches) and the process's peak RSS
(VmHWM, reset before each method after handing freed heap back to the OS); then the method's caches
are dropped. Each mode's merge of a method's first recipe is compared with the float32 cache-all
merge on four tensors: float32 modes must be identical; for bfloat16 the relative L2 change of the
merged task vector is printed. Linux with glibc only. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from random_llama import random_llama  # noqa: E402  (beside this script)

import evomerge.merge.chunks as chunks  # noqa: E402
import evomerge.merge.stats as stats  # noqa: E402
from evomerge.merge.apply import ResidentMerge  # noqa: E402
from evomerge.merge.memory import DEFAULT_CACHE_BYTES, MemoryPolicy  # noqa: E402
from evomerge.recipe import parse_recipe  # noqa: E402

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "della"]
MODES = [("float32", "all"), ("float32", "none"), ("bfloat16", "all"), ("bfloat16", "none")]
GIB = 2**30
#: (parameters, largest tensor: vocab x hidden) of the bases in the "what fits" table
BASES = {
    "1B (Llama-3.2-1B)": (1.236e9, 128256 * 2048),
    "3B (Llama-3.2-3B)": (3.213e9, 128256 * 3072),
    "8B (Llama-3.1-8B)": (8.030e9, 128256 * 4096),
    "70B (Llama-3.1-70B)": (70.554e9, 128256 * 8192),
}
GPU_GIB = 79.0  # an "80 GB" H100: 81,559 MiB, less the CUDA context
HOST_GIB = 24.0


class Perturbed(Mapping):
    """An expert: the base plus 0.01 N(0, 1) per entry, each tensor drawn (seeded) when read."""

    def __init__(self, base: dict[str, torch.Tensor], index: int):
        self.base, self.index = base, index

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.index + list(self.base).index(name))
        return self.base[name] + 0.01 * torch.randn(self.base[name].shape, generator=g)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def peak_rss_reset() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages: return them, so each peak is its own
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024 / GIB


def recipe_for(method: str, experts: list[str], rng: random.Random):
    per = {"weight": round(rng.uniform(0.2, 1.0), 3)}
    if method in ("ties", "dare_ties", "della"):
        per["density"] = round(rng.uniform(0.3, 0.7), 3)
    if method == "della":
        per["epsilon"] = 0.1
    models = [{"model": e, "parameters": dict(per)} for e in experts]
    if method == "linear":
        return parse_recipe({"merge_method": "linear", "models": models})
    return parse_recipe({"merge_method": method, "base_model": "base", "models": models})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    start_rss = peak_rss_gib()
    model = random_llama(args.vocab, args.hidden, args.layers)
    n = sum(p.numel() for p in model.parameters())
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    names = [f"e{i}" for i in range(args.experts)]
    watched = [
        k
        for k in base
        if k.endswith(
            (
                "embed_tokens.weight",
                "layers.0.self_attn.q_proj.weight",
                "layers.6.mlp.down_proj.weight",
                "model.norm.weight",
            )
        )
    ]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"model: random Llama, {n / 1e6:.1f}M parameters (float32, CPU), {args.experts} experts; "
        f"process RSS before the model {start_rss:.2f} GiB"
    )

    rows, measured, reference = [], {}, {}
    for tv_dtype, cache in MODES:
        policy = MemoryPolicy(task_vector_dtype=tv_dtype, cache=cache)
        started = time.perf_counter()
        resident = ResidentMerge(model, base, {e: Perturbed(base, i) for i, e in enumerate(names)}, memory=policy)
        setup = time.perf_counter() - started
        for method in METHODS:
            peak_rss_reset()
            rng = random.Random(method)  # every mode merges the same recipes
            first_recipe = recipe_for(method, names, rng)
            first = resident.materialize(first_recipe).seconds
            merged = {k: resident.params[k].detach().clone() for k in watched}
            ratios, times = [], []
            for _ in range(args.repeats):
                t = resident.materialize(recipe_for(method, names, rng)).seconds
                lin = resident.materialize(recipe_for("linear", names, random.Random(0))).seconds
                times.append(t)
                ratios.append(t / lin)
            held = resident.resident_bytes()
            rss = peak_rss_gib()
            counted = sum(v for k, v in held.items() if k != "scratch") / GIB
            resident.clear_cache()
            if (tv_dtype, cache) == MODES[0]:
                reference[method] = merged
                change = "reference"
            elif tv_dtype == "float32":
                same = all(torch.equal(merged[k], reference[method][k]) for k in watched)
                change = "identical" if same else "DIFFERENT"
            else:
                diff = sum(float(((merged[k] - reference[method][k]).double() ** 2).sum()) for k in watched)
                size = sum(float(((reference[method][k] - base[k]).double() ** 2).sum()) for k in watched)
                change = f"{(diff / size) ** 0.5:.1e} rel L2"
            per = n * args.experts
            tv = held["task_vectors"] / per
            cached = sum(held[k] for k in stats.CACHE_KINDS) / per
            measured[(tv_dtype, cache, method)] = (tv, cached)
            rows.append(
                (
                    f"{tv_dtype}, cache {cache}",
                    method,
                    tv,
                    cached,
                    counted,
                    rss,
                    first,
                    statistics.median(times),
                    statistics.median(ratios),
                    change,
                )
            )
            print(f"  {tv_dtype:>8} {cache:>4} {method:<16} done ({time.perf_counter() - started:.0f} s)", flush=True)
        print(
            f"  set-up of {tv_dtype}/{cache}: {setup:.1f} s; model {held['model'] / n:.1f}, "
            f"base {held['base'] / n:.1f} B/param; scratch {held['scratch'] / 2**20:.1f} MiB",
            flush=True,
        )
        del resident

    print(
        "\n| task vectors, cache | method | task vectors (B/param/expert) | cached (B/param/expert) | "
        "tensors held (GiB) | peak RSS (GiB) | first (s) | per candidate (s) | x linear | vs float32 cache all |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, method, tv, cached, counted, rss, first, per_candidate, ratio, change in rows:
        print(
            f"| {mode} | {method} | {tv:.2f} | {cached:.2f} | {counted:.2f} | {rss:.2f} | {first:.2f} | "
            f"{per_candidate:.3f} | {ratio:.2f} | {change} |"
        )
    fits(measured, len(chunks.SCRATCH._bufs), start_rss)


def fits(measured: dict, scratch_buffers: int, overhead_gib: float) -> None:
    """The "what fits" tables, from the bytes per parameter measured above; model and base in bf16."""
    tv = measured[("bfloat16", "none", "linear")][0]
    assert all(measured[("bfloat16", "none", m)] == (tv, 0.0) for m in METHODS)  # any method, cache none
    cache = DEFAULT_CACHE_BYTES / GIB
    # on the GPU: reused chunk buffers, plus a block's temporaries in a statistic's pass (~24 B/element)
    working = (scratch_buffers * 4 + 24) * chunks.CHUNK_CUDA / GIB
    print(
        f"\nWhat fits, default policy: bf16 task vectors ({tv:.2f} B/param/expert measured, any chunked method), "
        f"cache auto (at most {cache:.0f} GiB more, where the task vectors live); model and base bf16 (2 B/param). "
        f"GiB. GPU: {GPU_GIB:.0f} GiB usable, host: {HOST_GIB:.0f} GiB. GPU figures include {working:.2f} GiB of "
        "working buffers and, per tensor, the drop mask bits (E/8 B per element of the largest tensor) and what is "
        "streamed: the base's (2 B) and, with experts on host, the E task vectors' (2 B each) copies of the largest "
        f"tensor. CPU only: everything in host memory, plus {overhead_gib:.2f} GiB measured for Python and torch. "
        "Activations of the evaluation come on top."
    )
    print("\n| base | experts | all on GPU | base on host: GPU / host | experts on host: GPU / host | CPU only |")
    print("|---|---|---|---|---|---|")
    mark = lambda gib, cap: f"{gib:.1f} " + ("ok" if gib <= cap else "no")  # noqa: E731
    for label, (params, largest) in BASES.items():
        for e in (2, 3, 4):
            p, big = params / GIB, largest / GIB
            fixed = working + e / 8 * big
            all_gpu = 2 * p + 2 * p + e * tv * p + cache + fixed
            base_host = 2 * p + e * tv * p + cache + fixed + 2 * big
            experts_host = 2 * p + fixed + (e + 1) * 2 * big
            cpu = 2 * p + 2 * p + e * tv * p + cache + overhead_gib
            print(
                f"| {label} | {e} | {mark(all_gpu, GPU_GIB)} | {mark(base_host, GPU_GIB)} / {2 * p:.1f} | "
                f"{mark(experts_host, GPU_GIB)} / {2 * p + e * tv * p + cache:.1f} | {mark(cpu, HOST_GIB)} |"
            )
    params = BASES["8B (Llama-3.1-8B)"][0] / GIB
    print(
        "\n8B base, 3 experts, base and task vectors all on one GPU (GiB, model bf16, without working buffers): "
        "before (base and task vectors float32, every statistic cached, as ResidentMerge kept them), bf16 task "
        "vectors with cache all, and the default (bf16, cache auto)."
    )
    print("\n| method | before | bf16, cache all | default |\n|---|---|---|---|")
    for m in METHODS:
        tv32, cached32 = measured[("float32", "all", m)]
        tv16, cached16 = measured[("bfloat16", "all", m)]
        before = (2 + 4 + 3 * (tv32 + cached32)) * params
        print(
            f"| {m} | {before:.0f} | {(2 + 2 + 3 * (tv16 + cached16)) * params:.0f} | "
            f"{(2 + 2 + 3 * tv) * params + cache:.0f} |"
        )


if __name__ == "__main__":
    main()
