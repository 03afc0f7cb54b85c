"""Data for lm-eval's own built-in tasks, offline: ``gsm8k`` and ``mbpp`` as a networked user runs them.

lm-eval's task definitions name hub datasets (``openai/gsm8k``, config ``main``;
``google-research-datasets/mbpp``, config ``full``) and mbpp's metric loads ``evaluate``'s
``code_eval`` from the hub. A networked user's first run fetches them into the Hugging Face cache;
offline (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``) ``datasets`` and ``evaluate`` then read them
from that cache. ``write_builtin_data`` writes that cache itself, under a Hugging Face home of the
caller's choosing: the datasets in the layout ``datasets`` prepares (``<home>/datasets/openai___gsm8k/
main/0.0.0/<hash>/gsm8k-test.arrow`` with its ``dataset_info.json``), with rows generated here in the
real datasets' formats (word problems whose answer ends ``#### <number>``; small Python functions with
three ``assert`` tests each), and evomerge's own ``code_eval`` (``evomerge/zoo/code_eval.py``) in the
layout ``evaluate`` caches a hub metric. The task definitions, prompts, few-shot examples, filters
and metrics are lm-eval's own, unchanged.

Never point it at the Hugging Face home you use with a network: offline, the generated datasets
would stand in for the real ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

#: Rows per split (the real datasets: gsm8k 7,473 train / 1,319 test; mbpp full 374 / 500 / 90 / 10).
GSM8K_SPLITS = {"train": 100, "test": 400}
MBPP_SPLITS = {"train": 40, "test": 300, "validation": 20, "prompt": 10}
SEED = 20261205
MANIFEST = "evomerge-builtin.json"

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "shells", "stamps"]


def _word_problem(rng: random.Random) -> dict[str, str]:
    """A grade-school word problem in gsm8k's format: calculator annotations ``<<a+b=c>>`` in the
    worked answer, which ends ``#### <answer>``."""
    name, item, kind = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(4)
    a, b = rng.randint(12, 95), rng.randint(2, 40)
    if kind == 0:
        c = a + b
        question = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        steps = [f"{name} has {a} + {b} = <<{a}+{b}={c}>>{c} {item} now."]
    elif kind == 1:
        c = a - b
        question = f"{name} had {a} {item} and gave {b} of them away. How many {item} does {name} have left?"
        steps = [f"{name} has {a} - {b} = <<{a}-{b}={c}>>{c} {item} left."]
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(3, 15)
        c = a * b
        question = f"{name} buys {a} boxes of {item} with {b} {item} in each box. How many {item} is that?"
        steps = [f"That is {a} * {b} = <<{a}*{b}={c}>>{c} {item}."]
    else:
        d = rng.randint(1, a + b - 1)
        ab, c = a + b, a + b - d
        question = f"{name} has {a} {item}, finds {b} more and then gives {d} to a friend. How many {item} are left?"
        steps = [f"After finding some, {name} has {a} + {b} = <<{a}+{b}={ab}>>{ab} {item}."]
        steps.append(f"After giving some away, {ab} - {d} = <<{ab}-{d}={c}>>{c} {item} are left.")
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {c}"}


def _function(rng: random.Random) -> tuple[str, str, str, Callable, str, int]:
    """(name, description, body, reference implementation, argument kind, constant) of a small function."""
    k = rng.randint(2, 199)  # also a list's value range: about half its values pass each test
    families = [
        (f"add_{k}", f"Write a function to add {k} to a given number.", f"n + {k}", lambda n: n + k, "int"),
        (f"times_{k}", f"Write a function to multiply a number by {k}.", f"n * {k}", lambda n: n * k, "int"),
        (f"is_multiple_of_{k}", f"Write a function to check whether a number is a multiple of {k}.",
         f"n % {k} == 0", lambda n: n % k == 0, "int"),
        (f"count_above_{k}", f"Write a function to count the elements of a list that are greater than {k}.",
         f"len([x for x in n if x > {k}])", lambda n: len([x for x in n if x > k]), "list"),
        (f"repeat_{k % 5 + 2}", f"Write a function to repeat a string {k % 5 + 2} times.",
         f"n * {k % 5 + 2}", lambda n: n * (k % 5 + 2), "str"),
        (f"last_{k % 4 + 1}_chars", f"Write a function to get the last {k % 4 + 1} characters of a string.",
         f"n[-{k % 4 + 1}:]", lambda n: n[-(k % 4 + 1):], "str"),
        (f"sum_of_multiples_of_{k}", f"Write a function to sum the elements of a list that are multiples of {k}.",
         f"sum(x for x in n if x % {k} == 0)", lambda n: sum(x for x in n if x % k == 0), "list"),
    ]  # fmt: skip
    return (*families[rng.randrange(len(families))], k)


def _argument(rng: random.Random, kind: str, k: int):
    if kind == "int":
        return rng.randint(-50, 500)
    if kind == "list":
        return [rng.randint(0, 2 * k + 10) for _ in range(rng.randint(3, 7))]
    return "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))


def _program(rng: random.Random, task_id: int, seen: set[str]) -> dict:
    """A small Python function in mbpp's format: description, reference code, three asserts."""
    while True:
        name, text, body, reference, kind, k = _function(rng)
        if name not in seen:
            break
    seen.add(name)
    tests = []
    for _ in range(3):
        arg = _argument(rng, kind, k)
        tests.append(f"assert {name}({arg!r}) == {reference(arg)!r}")
    return {
        "task_id": task_id,
        "text": text,
        "code": f"def {name}(n):\r\n  return {body}",
        "test_list": tests,
        "test_setup_code": "",
        "challenge_test_list": [],
    }


def gsm8k_rows(seed: int = SEED) -> dict[str, list[dict]]:
    """The generated gsm8k splits (every question distinct)."""
    rng, seen, out = random.Random(f"gsm8k:{seed}"), set(), {}
    for split, n in GSM8K_SPLITS.items():
        rows = []
        while len(rows) < n:
            row = _word_problem(rng)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        out[split] = rows
    return out


def mbpp_rows(seed: int = SEED) -> dict[str, list[dict]]:
    """The generated mbpp splits (every function name distinct across splits)."""
    rng, seen, out, task_id = random.Random(f"mbpp:{seed}"), set(), {}, 1
    for split, n in MBPP_SPLITS.items():
        out[split] = []
        for _ in range(n):
            out[split].append(_program(rng, task_id, seen))
            task_id += 1
    return out


def _features(name: str):
    import datasets

    if name == "gsm8k":
        return datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string")})
    text, ints = datasets.Value("string"), datasets.Value("int32")
    return datasets.Features(
        {
            "task_id": ints,
            "text": text,
            "code": text,
            "test_list": datasets.Sequence(text),
            "test_setup_code": text,
            "challenge_test_list": datasets.Sequence(text),
        }
    )


#: (hub id, config, dataset name in file names, rows)
DATASETS = [
    ("openai/gsm8k", "main", "gsm8k", gsm8k_rows),
    ("google-research-datasets/mbpp", "full", "mbpp", mbpp_rows),
]


def _content_hash(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()


def _write_dataset(home: Path, repo: str, config: str, name: str, splits: dict[str, list[dict]]) -> Path:
    """One dataset config in the layout ``datasets`` prepares; replaces an earlier one of ours."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    namespace, base = repo.split("/")
    root = home / "datasets" / f"{namespace}___{base}" / config / "0.0.0"
    target = root / _content_hash(repo, config, splits)[:40]
    if (target / "dataset_info.json").is_file():
        return target
    staging = root / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    features, infos = _features(name), datasets.SplitDict(dataset_name=name)
    for split, rows in splits.items():
        with ArrowWriter(features=features, path=str(staging / f"{name}-{split}.arrow")) as writer:
            for row in rows:
                writer.write(row)
            count, size = writer.finalize()
        infos.add(datasets.SplitInfo(name=split, num_examples=count, num_bytes=size, dataset_name=name))
    info = datasets.DatasetInfo(features=features, splits=infos, config_name=config, dataset_name=name)
    info.builder_name, info.version = "parquet", datasets.Version("0.0.0")
    info.write_to_directory(str(staging))
    for old in root.iterdir():  # an earlier generation of ours: the offline reader takes the newest
        if old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old)
    staging.rename(target)
    return target


def _write_metric(home: Path) -> Path:
    """evomerge's ``code_eval`` in the layout ``evaluate`` caches a hub metric."""
    source = (Path(__file__).parent / "code_eval.py").read_text()
    folder = home / "modules" / "evaluate_modules" / "metrics" / "evaluate-metric--code_eval"
    target = folder / hashlib.sha256(source.encode()).hexdigest()
    if not (target / "code_eval.py").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        target.mkdir(parents=True)
        for init in (home / "modules" / "evaluate_modules" / "__init__.py", folder / "__init__.py"):
            init.touch()
        (target / "__init__.py").touch()
        (target / "code_eval.py").write_text(source)
    return target / "code_eval.py"


def write_builtin_data(home: str | os.PathLike, seed: int = SEED) -> dict:
    """Write the generated gsm8k and mbpp datasets and the code_eval metric under the Hugging Face
    home ``home`` (set ``HF_HOME`` to it, with ``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1``, to use
    them); returns the manifest (also written to ``home/evomerge-builtin.json``). Idempotent."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    manifest = {"seed": seed, "datasets": {}, "metrics": {}}
    for repo, config, name, rows in DATASETS:
        splits = rows(seed)
        path = _write_dataset(home, repo, config, name, splits)
        manifest["datasets"][repo] = {
            "config": config,
            "path": str(path.relative_to(home)),
            "rows": {s: len(r) for s, r in splits.items()},
        }
    manifest["metrics"]["code_eval"] = str(_write_metric(home).relative_to(home))
    (home / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
