"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end here, on the CPU, as its dry run:
every stage writes its table, every registered method is compared, the campaign scores candidates.
(The dry run's device side is the CPU too; what the comparison tolerates is checked on its own.)"""

import subprocess
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (beside the other benchmarks, not a package)

from evomerge.merge.registry import METHODS  # noqa: E402


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Each ``### title`` section's table as rows of header -> cell."""
    out, title, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            out[title] = []
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-"):
                out[title].append(dict(zip(header, cells)))
    return out


def section(found: dict, prefix: str) -> list[dict[str, str]]:
    return next(rows for title, rows in found.items() if title.startswith(prefix))


def _module(kernel) -> str:
    return getattr(kernel, "func", kernel).__module__  # a family's variants are partials of its kernel


def test_the_cpu_dry_run_writes_every_stage_with_every_method_passing(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-dry-run", "--campaigns", "host",
         "--out", str(out), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = tables(out.read_text())
    assert out.read_text() in done.stdout  # the same tables are printed

    assert section(found, "1. Models")[0]["model"] == "random Llama (tiny)"
    methods = section(found, "2. Merge methods")
    # the built-in methods (a test module of this process may have registered one of its own)
    builtin = [m for m, method in METHODS.items() if _module(method.kernel).startswith("evomerge.merge.methods.")]
    assert sorted((r["method"], r["dtype"]) for r in methods) == sorted(
        (m, d) for m in builtin for d in ("float32", "bfloat16")
    )
    assert {r["result"] for r in methods} == {"pass"}

    (campaign,) = section(found, "3. Campaigns")
    assert (campaign["experts_on"], campaign["exit"], campaign["candidates done"], campaign["failed"]) == (
        "host", "0", "3", "0",
    )  # fmt: skip
    assert "first_result" in campaign["stages reached (s)"]
    assert "evaluations 3 (3 done" in (tmp_path / "gpu_check_campaign-host.log").read_text()  # the whole log
    (memory,) = section(found, "4. Device memory")
    assert memory["experts_on"] == "host" and float(memory["predicted (fit table)"]) > 0
    (speed,) = section(found, "5. Scoring speed")
    assert speed["candidates"] == "3" and speed["documents each"] == "16"
    assert float(speed["docs/s min"]) > 0
    assert not list(tmp_path.glob("evomerge-gpu-check-*")), "the temporary directory is removed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_refuses_in_one_line_unless_dry_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x.md")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--cpu-dry-run" in done.stderr
    assert not (tmp_path / "x.md").exists()


def test_the_comparison_tolerates_rounding_and_counts_flipped_entries():
    g = torch.Generator().manual_seed(0)
    base = {"w": 0.02 * torch.randn(1000, generator=g)}
    reference = {"w": base["w"] + 0.002 * torch.randn(1000, generator=g)}
    scale = float((reference["w"] - base["w"]).abs().max())

    assert gpu_check.compare(reference, {"w": reference["w"].clone()}, base, "float32")[:4] == (0.0, 0.0, 0, 1000)
    ulps = reference["w"].clone()
    ulps[:10] = torch.nextafter(torch.nextafter(ulps[:10], torch.tensor(1.0)), torch.tensor(1.0))
    assert gpu_check.compare(reference, {"w": ulps}, base, "float32")[2] == 0  # two float32 ulps: inside

    flipped = reference["w"].clone()
    flipped[3] = base["w"][3]  # one entry's task vector dropped on one side only
    worst, relative, outside, total, finite = gpu_check.compare(reference, {"w": flipped}, base, "float32")
    assert outside == 1 and finite and relative == pytest.approx(worst / scale)

    bf16 = {k: v.to(torch.bfloat16) for k, v in reference.items()}
    bits = bf16["w"].view(torch.int16).clone()
    bits[:5] += 1  # one bf16 ulp up
    assert gpu_check.compare(bf16, {"w": bits.view(torch.bfloat16)}, base, "bfloat16")[2] == 0
    bits[:5] += 2  # three ulps
    assert gpu_check.compare(bf16, {"w": bits.view(torch.bfloat16)}, base, "bfloat16")[2] == 5

    broken = reference["w"].clone()
    broken[0] = float("nan")
    assert gpu_check.compare(reference, {"w": broken}, base, "float32")[4] is False
