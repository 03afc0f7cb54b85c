"""pass@k of generated Python programs against their tests, as Hugging Face ``evaluate``'s
``code_eval`` metric computes it: the metric lm-eval's code tasks (``mbpp``, ``humaneval``) load with
``evaluate.load("code_eval")``.

A networked user's ``evaluate`` fetches that metric from the hub the first time and keeps it in its
module cache. Offline, evomerge writes this module there instead (``evomerge zoo builtin``), with
the same interface: ``compute(predictions=[[program, ...], ...], references=[test, ...], k=[1])``
returns ``({"pass@1": ...}, per-program results)``, and refuses to run anything unless the
environment says ``HF_ALLOW_CODE_EVAL=1`` (evomerge sets it in the processes that score an objective
with ``confirm_run_unsafe_code: true``).

Each program runs with its test appended in a fresh isolated interpreter (``python -I``) in an empty
temporary folder, in its own process group (killed whole at the time limit), with limits on memory,
CPU time, file size and core dumps. That contains accidents (an endless loop, a huge allocation);
it is not a sandbox against hostile code.

This file is read as text and copied into the module cache; it is not imported by evomerge.
"""

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import datasets
import evaluate

#: Address space of a program (bytes), its CPU seconds beyond the wall-clock limit, its files' size.
MEMORY_LIMIT = 2 << 30
CPU_GRACE_S = 1
FILE_LIMIT = 16 << 20

REFUSAL = (
    "code_eval runs programs written by a model; set HF_ALLOW_CODE_EVAL=1 to allow it "
    "(evomerge: confirm_run_unsafe_code: true on the objective)"
)


#: Run first in the program's interpreter: the limits, then the program as ``__main__``.
BOOT = (
    "import resource, runpy, sys\n"
    "for kind, value in ((resource.RLIMIT_AS, {memory}), (resource.RLIMIT_CPU, {cpu}),\n"
    "                    (resource.RLIMIT_FSIZE, {files}), (resource.RLIMIT_CORE, 0)):\n"
    "    resource.setrlimit(kind, (value, value))\n"
    "runpy.run_path(sys.argv[1], run_name='__main__')\n"
)


def run_program(source: str, timeout: float) -> str:
    """ "passed", "failed: <last line of its error>" or "timed out"."""
    with tempfile.TemporaryDirectory(prefix="code_eval-") as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        boot = BOOT.format(memory=MEMORY_LIMIT, cpu=int(timeout) + CPU_GRACE_S, files=FILE_LIMIT)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", boot, path],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return "timed out"
        if proc.returncode == 0:
            return "passed"
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return f"failed: {lines[-1] if lines else f'exit {proc.returncode}'}"


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which ``correct`` pass: one minus the
    chance that k samples drawn without replacement all fail, C(n - c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    fail = 1.0
    for i in range(n - correct + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


class CodeEval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="pass@k of generated programs run against their tests",
            citation="",
            inputs_description="predictions: candidate programs per problem; references: each problem's test code",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 10, 100), num_workers=4, timeout=3.0):
        if os.environ.get("HF_ALLOW_CODE_EVAL", "0") != "1":
            raise ValueError(REFUSAL)
        pairs = enumerate(zip(predictions, references))
        jobs = [(i, program + "\n" + test) for i, (programs, test) in pairs for program in programs]
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            outcomes = list(pool.map(lambda job: run_program(job[1], timeout), jobs))
        results = {i: [] for i in range(len(references))}
        for (i, _), outcome in zip(jobs, outcomes):
            results[i].append((len(results[i]), {"passed": outcome == "passed", "result": outcome}))
        counts = [(len(r), sum(o["passed"] for _, o in r)) for r in results.values()]
        ks = [k] if isinstance(k, int) else list(k)
        scores = {
            f"pass@{kk}": sum(pass_at_k(n, c, kk) for n, c in counts) / max(1, len(counts))
            for kk in ks
            if all(n >= kk for n, _ in counts)
        }
        return scores, results
