"""Build the offline model zoo: tokenizer, base pretraining, expert fine-tunes, manifest.

The weights are a function of the seed *and* of where they are built: the torch version, its thread
count (``torch.get_num_threads()``), the CPU capability its kernels dispatch to
(``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512...) and the machine architecture; the
manifest records all four under ``reproducible_on``. A seed reproduces the same bytes only where all
four match. The cache key is the spec alone (a second build of the same spec returns at once): a zoo
built elsewhere stays valid, it is simply not bit-identical to one built here. The zoo is built in a
hidden sibling ``.NAME.partial-PID`` and renamed into place at the end, so an interrupted build
leaves nothing half-written at the target; what a killed build left there is removed by the next
build of the same target.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evomerge.staging import staging_dir, swap_into_place, sweep_stale_staging
from evomerge.zoo import skills
from evomerge.zoo.spec import LoraSpec, ZooSpec
from evomerge.zoo.tokenizer import train_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOKENIZER_CORPUS_SIZE = 2000

Progress = Callable[[str], None]


def build_model(spec: ZooSpec, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    """A freshly initialised causal LM of ``spec.architecture`` (weights from the global torch RNG)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=64,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    if spec.architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def _batches(vocab: dict[str, int], mixture: dict[str, float], steps: int, batch_size: int, rng: random.Random):
    """Yield (input_ids, labels) batches; loss only on what follows the prompt (whole line for text)."""
    for _ in range(steps):
        examples = skills.training_examples(rng, mixture, batch_size)
        length = max(len(e.text) for e in examples)
        ids = torch.zeros(batch_size, length, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        for row, ex in enumerate(examples):
            tokens = torch.tensor([vocab[c] for c in ex.text])
            ids[row, : len(tokens)] = tokens
            start = max(len(ex.prompt), 1)
            labels[row, start : len(tokens)] = tokens[start:]
        yield ids, labels


def train(model, vocab, mixture, steps, lr, batch_size, rng, label: str, progress: Progress) -> float:
    """AdamW with linear warm-up and cosine decay; returns the final batch loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    loss = float("nan")
    every = max(1, steps // 10)
    for step, (ids, labels) in enumerate(_batches(vocab, mixture, steps, batch_size, rng), 1):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if step % every == 0 or step == steps:
            progress(f"{label}: step {step}/{steps} loss {loss:.3f}")
    model.eval()
    return loss


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def load_manifest(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _cached(out: Path, spec: ZooSpec) -> dict | None:
    manifest = load_manifest(out)
    if not manifest or manifest.get("spec_fingerprint") != spec.fingerprint():
        return None
    if all((out / m["path"] / "model.safetensors").is_file() for m in manifest["models"]):
        return manifest
    return None


def build_zoo(out: str | os.PathLike, spec: ZooSpec, progress: Progress = lambda _: None) -> dict:
    """Build (or reuse) the zoo of ``spec`` in ``out`` and return its manifest.

    Layout: ``out/base``, ``out/expert-<skill>``: each a Hugging Face model directory
    (config.json, model.safetensors, tokenizer); ``out/manifest.json`` lists them with skills,
    seeds, parameter counts and sha256 hashes. Raises FileExistsError if ``out`` holds something
    that is not a zoo.
    """
    out = Path(out)
    sweep_stale_staging(out)
    cached = _cached(out, spec)
    if cached is not None:
        progress(f"zoo in {out} is up to date (spec {spec.fingerprint()})")
        return cached
    if out.exists() and any(out.iterdir()) and load_manifest(out) is None:
        raise FileExistsError(f"{out} exists and is not a zoo (no {MANIFEST}); choose an empty path")

    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out)
    staging.mkdir()
    try:
        manifest = _build_into(staging, spec, progress)
        manifest["build_seconds"] = round(time.time() - started, 1)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"zoo built in {manifest['build_seconds']} s -> {out}")
    return manifest


def _build_into(root: Path, spec: ZooSpec, progress: Progress) -> dict:
    """Train the base and the experts into ``root``; returns the manifest (the build time left out)."""
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)  # every seed is drawn from it, in this order: the zoo is reproducible
    model, tokenizer, vocab, n_params, base = _build_base(root, spec, rng, progress)
    entries = [base, *_build_experts(root, spec, rng, model, tokenizer, vocab, progress)]
    return _manifest(root, spec, entries, n_params)


def _build_base(root: Path, spec: ZooSpec, rng: random.Random, progress: Progress):
    """The tokenizer and the base model, trained and saved under ``root / "base"``. Returns the model,
    the tokenizer, its vocabulary, the number of parameters and the base's manifest entry."""
    corpus = skills.training_examples(rng, spec.base_mixture(), TOKENIZER_CORPUS_SIZE)
    tokenizer = train_tokenizer([e.text for e in corpus], chat_template=spec.chat_template)
    vocab = tokenizer.get_vocab()
    model = build_model(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    progress(f"base: {spec.architecture}, {n_params:,} parameters")

    base_seed = rng.randrange(2**31)
    base_loss = train(
        model,
        vocab,
        spec.base_mixture(),
        spec.base_steps,
        spec.base_lr,
        spec.batch_size,
        random.Random(base_seed),
        "base",
        progress,
    )
    _save(model, tokenizer, root / "base")
    entry = {
        "name": "base",
        "role": "base",
        "skill": None,
        "path": "base",
        "seed": base_seed,
        "final_loss": round(base_loss, 4),
    }
    return model, tokenizer, vocab, n_params, entry


def _build_experts(root: Path, spec: ZooSpec, rng: random.Random, model, tokenizer, vocab, progress: Progress):
    """Each expert fine-tuned from the trained base ``model`` (left holding the last expert) and saved
    under ``root / "expert-<skill>"``; returns their manifest entries."""
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    entries = []
    for skill in spec.experts:
        seed = rng.randrange(2**31)
        model.load_state_dict(base_state)
        torch.manual_seed(seed)
        loss = train(
            model,
            vocab,
            spec.expert_mixture(skill),
            spec.expert_steps,
            spec.expert_lr,
            spec.batch_size,
            random.Random(seed),
            f"expert-{skill}",
            progress,
        )
        _save(model, tokenizer, root / f"expert-{skill}")
        entries.append(
            {
                "name": f"expert-{skill}",
                "role": "expert",
                "skill": skill,
                "path": f"expert-{skill}",
                "seed": seed,
                "final_loss": round(loss, 4),
            }
        )
    return entries


def _manifest(root: Path, spec: ZooSpec, entries: list[dict], n_params: int) -> dict:
    """The zoo's manifest: each model's entry completed with its size and file hash, the content hash
    over all of them, and the versions the zoo was built with."""
    import transformers

    from evomerge import __version__

    content = hashlib.sha256()
    content.update(_file_sha256(root / "base" / "tokenizer.json").encode())
    for entry in entries:
        entry["parameters"] = n_params
        entry["sha256"] = _file_sha256(root / entry["path"] / "model.safetensors")
        content.update(entry["sha256"].encode())
    return {
        "format": FORMAT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "spec_fingerprint": spec.fingerprint(),
        "content_hash": content.hexdigest(),
        "models": entries,
        "skills": {s: skills.SKILLS[s].description for s in spec.experts},
        "versions": {"evomerge": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "reproducible_on": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
        },
    }


LORA_MANIFEST = "lora.json"


def build_lora_experts(out: str | os.PathLike, lora: LoraSpec, progress: Progress = lambda _: None) -> dict:
    """Train (or reuse) a LoRA adapter per expert skill of the zoo in ``out`` (needs peft): from its
    base, on the full expert's batches (its seed), saved as ``out/lora-<skill>`` (adapter_config.json
    naming ``../base``, adapter_model.safetensors); returns the manifest ``out/lora.json``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, manifest = Path(out), load_manifest(Path(out))
    spec = ZooSpec.model_validate(manifest["spec"])
    key = lora.fingerprint(spec)
    try:
        cached = json.loads((root / LORA_MANIFEST).read_text())
        if cached.get("fingerprint") == key and all((root / m["path"]).is_dir() for m in cached["models"]):
            progress(f"LoRA experts in {root} are up to date ({key})")
            return cached
    except (OSError, ValueError):
        pass
    vocab = json.loads((root / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    entries, started = [], time.time()
    for expert in (m for m in manifest["models"] if m["role"] == "expert"):
        skill, seed, path = expert["skill"], expert["seed"], root / f"lora-{expert['skill']}"
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets, lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        steps = lora.steps or spec.expert_steps
        mixture, batches = spec.expert_mixture(skill), random.Random(seed)
        loss = train(peft_model, vocab, mixture, steps, lora.lr, spec.batch_size, batches, path.name, progress)
        staged = staging_dir(path)
        peft_model.save_pretrained(staged)
        adapter_config = json.loads((staged / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = "../base"  # the zoo moves as one folder
        (staged / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        staged.rename(path)
        trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        entry = {"name": path.name, "skill": skill, "path": path.name, "seed": seed, "final_loss": round(loss, 4)}
        entries.append({**entry, "trained_parameters": trained})
    record = {"fingerprint": key, "lora": lora.model_dump(mode="json"), "models": entries}
    record["reproducible_on"] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    record["build_seconds"] = round(time.time() - started, 1)
    (root / LORA_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return record
