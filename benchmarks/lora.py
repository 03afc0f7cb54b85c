"""LoRA experts: resident bytes per expert at 8B-shaped layers, and time per candidate against full
experts, side by side.

    .venv/bin/python benchmarks/lora.py --zoo DIR [--repeats 5]

1. Bytes, from shapes alone (nothing of 8B is allocated): a Llama-3.1-8B-shaped model (hidden 4096,
   MLP 14336, 32 layers, 8 KV heads of 128, vocabulary 128256) and a rank-16 adapter of every linear
   module of its layers (q, k, v, o, gate, up, down; peft's ``all-linear``): the factors a worker
   keeps (16-bit and float32 adapters) against the full 16-bit task vector (2 B/param); and the
   transient a merge forms from the factors: a chunk's row block, or for methods whose statistics
   need a whole tensor (TIES, DARE with rescale, DELLA, PCB...), the largest adapted tensor's dense
   delta per expert, for the one tensor being merged.
   The formula is checked against ``ResidentMerge.expert_bytes()`` on the zoo's adapters.
2. Time: on the zoo (``evomerge zoo build --out DIR --lora`` adds its LoRA experts ``lora-*`` beside
   the full ones), one ``ResidentMerge`` over the three LoRA experts and one over the three full
   experts of the same skills (the full experts' task vectors stored in the model's float32); per
   method, the median of ``--repeats`` candidates' ``materialize`` time of each, taken in turns, with
   cache none (every statistic recomputed per candidate, what real-model scale does) and cache all.
   Then one whole candidate (merge and the zoo's lm-eval tasks) through ``CandidateScorer`` for each.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evomerge.merge.apply import ResidentMerge  # noqa: E402
from evomerge.merge.chunks import BLOCK, CHUNK, CHUNK_CUDA  # noqa: E402
from evomerge.merge.memory import MemoryPolicy  # noqa: E402
from evomerge.recipe import parse_recipe  # noqa: E402

SKILLS = ("add", "rev", "sort")
METHODS = {
    "task_arithmetic": ({"lambda": 1.0}, {"weight": 0.7}),
    "ties": ({}, {"weight": 0.7, "density": 0.5}),
    "dare_ties": ({}, {"weight": 0.7, "density": 0.5}),
    "pcb": ({}, {"weight": 1.0, "density": 0.3}),
}
GIB, MIB = 2**30, 2**20


def llama8b_linear_shapes(hidden=4096, mlp=14336, layers=32, kv=8 * 128) -> list[tuple[int, int]]:
    """(out, in) of every linear module of the layers."""
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden)]
    return (per_layer + [(hidden, mlp)]) * layers


def bytes_table(rank: int = 16) -> None:
    params = 8_030_261_248  # Llama-3.1-8B, embeddings and head included
    shapes = llama8b_linear_shapes()
    factors = sum(rank * (o + i) for o, i in shapes)
    largest = max(o * i for o, i in shapes)
    print(f"## bytes per expert, Llama-3.1-8B-shaped, rank {rank}, every linear module of the layers")
    adapted = sum(o * i for o, i in shapes)
    print(f"adapted tensors {len(shapes)}, their parameters {adapted / 1e9:.2f} B of {params / 1e9:.2f} B")
    print(f"full task vector, 16-bit:         {2 * params / GIB:8.2f} GiB  ({2 * params:,} B)")
    for name, size in (("LoRA factors, 16-bit:", 2), ("LoRA factors, float32:", 4)):
        held = size * factors
        print(f"{name:<34}{held / MIB:8.1f} MiB  ({held:,} B; {2 * params / held:.0f}x less)")
    cpu, cuda = 4 * max(BLOCK, CHUNK) / MIB, 4 * max(BLOCK, CHUNK_CUDA) / MIB
    print(f"transient of chunked reads (one row block, float32): about {cpu:.0f} MiB on CPU, {cuda:.0f} MiB on CUDA")
    print(
        f"transient for whole-tensor statistics: the largest adapted tensor's dense delta, 16-bit: "
        f"{2 * largest / MIB:.0f} MiB per expert, for the one tensor being merged"
    )  # fmt: skip


def zoo_models(zoo: Path, kind: str) -> dict[str, str]:
    prefix = "lora" if kind == "lora" else "expert"
    return {s: str(zoo / f"{prefix}-{s}") for s in SKILLS}


def resident(zoo: Path, kind: str, cache: str) -> ResidentMerge:
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate.candidate import _lora_factors, _Tensors
    from evomerge.merge.io import ModelSource

    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    experts = {}
    for name, folder in zoo_models(zoo, kind).items():
        if kind == "lora":
            experts[name] = _lora_factors(Path(folder), params, str(zoo / "base"), False)
        else:
            experts[name] = _Tensors(ModelSource(folder), list(params))
    base = {n: p.detach() for n, p in params.items()}
    return ResidentMerge(model, base, experts, base_name="base", memory=MemoryPolicy(cache=cache))


def recipe(method: str):
    shared, per_model = METHODS[method]
    models = [{"model": s, "parameters": per_model} for s in SKILLS]
    return parse_recipe({"merge_method": method, "base_model": "base", "models": models, "parameters": shared})


def check_bytes(zoo: Path, merges: dict) -> None:
    """The factors a worker holds are the adapter's bytes (its dtype as stored), counted from its tensors."""
    from evomerge.models.lora import lora_bytes

    lora = merges["lora"]
    for name, got in lora.expert_bytes().items():
        want = lora_bytes(zoo / f"lora-{name}")
        assert got == want, (name, got, want)
    full = merges["full"].expert_bytes()
    n = sum(p.numel() for p in lora.params.values())
    print(f"zoo: {n:,} parameters; resident per expert: LoRA {lora.expert_bytes()}, full {full} (bytes)")


def timings(zoo: Path, repeats: int) -> None:
    for cache in ("none", "all"):
        merges = {kind: resident(zoo, kind, cache) for kind in ("lora", "full")}
        if cache == "none":
            check_bytes(zoo, merges)
        print(f"\n## materialize per candidate, three experts, cache {cache} (median of {repeats}, s)")
        print(f"{'method':<16}{'LoRA':>9}{'full':>9}{'ratio':>8}")
        for method in METHODS:
            r = recipe(method)
            times = {kind: [] for kind in merges}
            for m in merges.values():
                m.materialize(r)  # first candidate: builds what the cache keeps
            for _ in range(repeats):
                for kind, m in merges.items():
                    times[kind].append(m.materialize(r).seconds)
            lora, full = statistics.median(times["lora"]), statistics.median(times["full"])
            print(f"{method:<16}{lora:9.4f}{full:9.4f}{lora / full:8.2f}")


def whole_candidate(zoo: Path, repeats: int) -> None:
    from evomerge.evaluate.candidate import CandidateScorer
    from evomerge.evaluate.config import load_evaluator

    evaluator = load_evaluator(Path(__file__).resolve().parents[1] / "evaluators" / "zoo_three_skills.yaml")
    print(f"\n## whole candidate (merge + the zoo's three skills, {evaluator.limit} documents each), ties, s")
    scorers = {}
    for kind in ("lora", "full"):
        models = {"base": str(zoo / "base"), **zoo_models(zoo, kind)}
        scorers[kind] = CandidateScorer(models, "base", evaluator, memory=MemoryPolicy(cache="none"))
    totals = {kind: [] for kind in scorers}
    values = {}
    for _ in range(repeats):
        for kind, scorer in scorers.items():
            score = scorer.score(recipe("ties"))
            totals[kind].append(score.timings["total"])
            values[kind] = score.values
    for kind in scorers:
        print(f"{kind:<6} total {statistics.median(totals[kind]):.3f}  scores {values[kind]}")


def one_tensor(repeats: int, rank: int = 16, shape=(4096, 14336)) -> None:
    """The merge of one 8B-shaped tensor (down_proj, 58.7M entries) over three experts: LoRA factors
    (rank ``rank``, bfloat16) against bfloat16 task vectors, per method, cache none, median."""
    from evomerge.merge.kernel import merge_tensor
    from evomerge.merge.lowrank import LowRankDelta
    from evomerge.merge.plan import RecipePlan
    from evomerge.merge.registry import METHODS
    from evomerge.merge.stats import DeltaStats

    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    draw = lambda *size: torch.randn(*size, generator=gen).to(torch.bfloat16)  # noqa: E731
    factors = [(draw(rank, shape[1]), draw(shape[0], rank)) for _ in range(3)]
    lowrank = [LowRankDelta(a, b * 1e-3, 2.0, shape, torch.bfloat16) for a, b in factors]
    dense = [d.dense() for d in lowrank]
    out = torch.empty(shape, dtype=torch.bfloat16)
    print(f"\n## one {shape[0]}x{shape[1]} tensor, three experts, rank {rank}, cache none (median of {repeats}, s)")
    print(f"{'method':<16}{'LoRA':>9}{'dense':>9}{'ratio':>8}")
    for method in ("task_arithmetic", "ties", "dare_ties"):
        params = RecipePlan(recipe(method), 32).resolve("model.layers.3.mlp.down_proj.weight")
        shared, per_model = params.shared, list(params.per_model)
        times = {"lora": [], "dense": []}
        for _ in range(repeats):
            for kind, deltas in (("lora", lowrank), ("dense", dense)):
                stats = [DeltaStats(d.to("cpu") if kind == "lora" else d, i + 1) for i, d in enumerate(deltas)]
                started = time.perf_counter()
                merge_tensor(METHODS[method], base, stats, shared, per_model, out)
                times[kind].append(time.perf_counter() - started)
        lora, full = statistics.median(times["lora"]), statistics.median(times["dense"])
        print(f"{method:<16}{lora:9.3f}{full:9.3f}{lora / full:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo", type=Path, help="a zoo with LoRA experts (evomerge zoo build --lora); without it, bytes only"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads, day = torch.get_num_threads(), time.strftime("%Y-%m-%d")
    print(f"{platform.machine()}, {threads} threads, torch {torch.__version__}, {day}")
    bytes_table()
    one_tensor(args.repeats)
    if args.zoo:
        timings(args.zoo, args.repeats)
        whole_candidate(args.zoo, max(1, args.repeats // 2))


if __name__ == "__main__":
    main()
