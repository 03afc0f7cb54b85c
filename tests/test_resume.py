"""A campaign's lifecycle through the CLI: Ctrl-C, SIGTERM and SIGKILL, each resumed, to exactly the budget
and the same trials as the campaign run in one go; one process at a time; pareto and export of the result;
read-only directories. One interrupted campaign serves every test here."""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
from test_campaign import (
    cli,
    experiment,
    frozen_workers,
    session_processes,
    start,
    stop_after,
    tells,
    told_trials,
    wait_for,
    write_evaluator,
)


@pytest.fixture(scope="module")
def resumed(zoo, tmp_path_factory):
    """A 16-candidate campaign stopped by Ctrl-C, resumed, SIGTERMed, resumed, SIGKILLed, resumed to
    the end; and the same campaign run uninterrupted, to compare."""
    tmp = tmp_path_factory.mktemp("resume")
    # a few tenths of a second per candidate; stop_after freezes the workers, so no signal comes too late
    slow = write_evaluator(tmp, limit=60, batch_size=20, name="slow-evaluator.yaml")
    path = experiment(
        tmp,
        zoo,
        budget={"max_evaluations": 16},
        optimizer={"name": "cma", "options": {"popsize": 4}},
        objectives=["add", "sort"],
        evaluator=str(slow),
    )
    directory = tmp / "campaign"
    log = {}
    proc = start("run", path, cwd=tmp)
    try:
        stop_after(proc, directory, 4, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        log["interrupted"] = (proc.returncode, out, err, len(tells(directory)))

        proc = start("resume", directory, cwd=tmp)
        wait_for(lambda: len(tells(directory)) >= 7, 180, "7 results")
        with frozen_workers(proc):
            log["second resume"] = cli("resume", directory, cwd=tmp)  # while the first still runs
            log["second run"] = cli("run", path, cwd=tmp)
            log["resumer pid"] = proc.pid
            os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        log["terminated"] = (proc.returncode, out, err, len(tells(directory)))
        from mlflow import MlflowClient

        from evomerge import campaign

        loaded = campaign.open_campaign(directory, check=False)
        log["parent after SIGTERM"] = (
            MlflowClient(tracking_uri=loaded.tracking()[0]).get_run(loaded.state["parent_run_id"]).info.status
        )

        proc = start("resume", directory, cwd=tmp)
        stop_after(proc, directory, 10, signal.SIGKILL)  # the controller only: its Ray must go away by itself
        proc.wait(timeout=30)
        pgid = proc.pid
        deadline = time.time() + 30
        while time.time() < deadline and session_processes(pgid):
            time.sleep(0.5)
        log["left_after_kill"] = session_processes(pgid)
        log["killed_at"] = len(tells(directory))
        log["final"] = cli("resume", directory, cwd=tmp)
        log["uninterrupted"] = cli("run", path, "--out", tmp / "uninterrupted", cwd=tmp)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tmp, directory, log


def test_ctrl_c_sigterm_and_sigkill_then_resume_finish_the_exact_budget(resumed):
    from mlflow import MlflowClient

    from evomerge import campaign

    tmp, directory, log = resumed
    code, out, err, told = log["interrupted"]
    assert code == 130 and "stopped (interrupted); continue with: evomerge resume" in out, err[-2000:]
    assert 4 <= told < 16
    code, out, err, told = log["terminated"]
    assert code == 143 and "stopped (terminated); continue with: evomerge resume" in out, err[-2000:]
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert log["parent after SIGTERM"] == "KILLED"
    assert 7 <= told < 16
    assert not log["left_after_kill"], "Ray processes outlived the SIGKILLed controller"
    assert 10 <= log["killed_at"] < 16
    final = log["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    ids = tells(directory)
    assert len(ids) == 16 and sorted(ids) == list(range(16))  # exactly the budget, none twice
    loaded = campaign.open_campaign(directory, check=False)
    assert loaded.state["finished"] and loaded.state["elapsed_s"] > 0
    uri, _ = loaded.tracking()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t-campaign")
    everything = client.search_runs([exp.experiment_id], max_results=1000)
    assert not [r.info.run_id for r in everything if r.info.status == "RUNNING"]  # no orphans
    parent = client.get_run(loaded.state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = [r for r in everything if r.data.tags.get("evomerge.campaign_run") == parent.info.run_id]
    assert sorted(int(r.data.tags["evomerge.trial"]) for r in children) == list(range(16))
    status = cli("status", directory, cwd=tmp)
    assert status.returncode == 0 and "evaluations 16/16" in status.stdout and "finished" in status.stdout
    exp_id, run_id = loaded.state["experiment_id"], loaded.state["parent_run_id"]
    assert f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}/artifactPath/front.png" in status.stdout
    # every session that ended by itself recorded its stages, in order; the SIGKILLed one could not
    sessions = loaded.state["sessions"]
    assert [s["status"] for s in sessions] == ["KILLED", "KILLED", "FINISHED"]
    order = ["checked", "ray", "shared", "workers", "tracking", "kinship", "first_result", "last_result", "shutdown"]
    for session in sessions:  # each was stopped after its first results
        assert list(session["stages"]) == order
        at = list(session["stages"].values())
        assert at == sorted(at) and 0 < at[0]
    last = sessions[-1]["stages"]
    assert (
        f"last session (finished): start-up checks {last['checked']:.1f}, Ray {last['ray']:.1f}, shared copy "
        f"{last['shared']:.1f}, workers {last['workers']:.1f}, MLflow {last['tracking']:.1f} s; results from "
        f"{last['first_result']:.1f} to {last['last_result']:.1f} s; stopped at {last['shutdown']:.1f} s\n"
    ) in status.stdout


def test_a_campaign_is_run_by_one_process_at_a_time(resumed):
    tmp, directory, log = resumed
    second = log["second resume"]
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [
        f"evomerge: error: {directory}: the campaign is in use by another evomerge process "
        f"(pid {log['resumer pid']}); wait for it to end or stop it"
    ]
    again = log["second run"]
    assert again.returncode == 2 and "already holds a campaign; continue it with `evomerge resume" in again.stderr
    # the SIGKILLed controller's lock did not block the last resume (asserted above: it finished)


def test_a_resumed_campaign_equals_its_uninterrupted_self(resumed):
    """One worker, three interruptions (SIGINT, SIGTERM, SIGKILL): the same trials with the same genes
    and the same scores as the campaign run in one go."""
    tmp, directory, log = resumed
    assert log["uninterrupted"].returncode == 0, log["uninterrupted"].stderr[-3000:]
    interrupted, straight = told_trials(directory), told_trials(tmp / "uninterrupted")
    assert len(straight) == 16 and [t[:3] for t in interrupted] == [t[:3] for t in straight]
    assert [t[3] for t in interrupted] == [t[3] for t in straight]


def test_pareto_and_export(resumed):
    from evomerge import campaign
    from evomerge.recipe import load_recipe

    tmp, directory, _ = resumed
    pareto = cli("pareto", directory, cwd=tmp)
    assert pareto.returncode == 0, pareto.stderr
    assert (directory / "front.png").read_bytes()[:4] == b"\x89PNG" and (directory / "front.html").exists()
    search = campaign.open_campaign(directory, check=False).search()
    front = search.front()
    lines = pareto.stdout.splitlines()
    listed = lines.index("experts alone:")  # the front's rows, then the experts alone, each with where it is
    assert {int(line.split()[0]) for line in lines[1:listed]} == {t.id for t in front}
    alone = [t for t in search.trials if t.kind == "expert alone"]
    assert [line.split()[0] for line in lines[listed + 1 : -2]] == [str(t.id) for t in alone]
    assert all(line.endswith(("(on the front)", "(dominated)")) for line in lines[listed + 1 : -2])
    # then the best mean of a searched candidate, of a seed (the experts' average) and of an expert
    # alone (the space expresses each exactly: task arithmetic, its weight 1, the other's 0), each
    # named; no hand baselines here; then the plot
    mean = lambda t: (t.values[0] + t.values[1]) / 2  # noqa: E731
    labels = [t.label for t in search.trials if t.seeded]
    assert labels == ["uniform average", "expert-add alone", "expert-sort alone"]
    kinds = {
        "searched": [t for t in search.finished if not t.seeded],
        "seed": [t for t in search.finished if t.label == "uniform average"],
        "expert alone": [t for t in search.finished if t.seeded and t.label.endswith(" alone")],
    }
    top = {kind: max(ts, key=lambda t: (mean(t), -t.id)) for kind, ts in kinds.items()}
    assert lines[-2] == "best mean over the 2 objectives: " + ", ".join(
        f"{kind} {mean(t):.4g} (trial {t.id}" + (f", {t.label})" if t.label else ")") for kind, t in top.items()
    )
    assert lines[-1].startswith("plot: ")

    best_add = max(front, key=lambda t: (t.values[0], -t.id))
    out = tmp / "export-add"
    result = cli(
        "export", directory, "--weights", "add=1,sort=0", "--out", out, "--quiet", "--register", "t-model", cwd=tmp
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "evomerge.json").read_text())
    assert meta["trial"] == best_add.id and meta["search_scores"] == {
        "add": best_add.values[0],
        "sort": best_add.values[1],
    }
    assert set(meta["report_scores"]) == {"add", "sort"} and "registered in MLflow: t-model version 1" in result.stdout
    assert meta["report_scored_on"] == {"device": "cpu", "dtype": "as saved"}  # auto: no CUDA here
    # the documents scored: the campaign's search tasks' and the export's report tasks' (separate files here)
    assert {split for splits in meta["documents"].values() for split in splits} == {"search", "report"}
    assert all(ids for splits in meta["documents"].values() for ids in splits.values())
    recipe = load_recipe(out / "mergekit_config.yml")
    assert recipe.base_model.endswith("/base") and all(m.model.startswith("/") for m in recipe.models)
    assert "(report split)" in (out / "README.md").read_text()

    again = cli("export", directory, "--trial", "1", "--out", out, cwd=tmp)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    forced = cli("export", directory, "--trial", "1", "--out", out, "--force", "--no-eval", "--quiet", cwd=tmp)
    assert forced.returncode == 0 and json.loads((out / "evomerge.json").read_text())["trial"] == 1
    for args, message in (
        (["--weights", "speed=1"], "unknown objective(s) speed"),
        (["--trial", "99"], "the campaign has trials 0..15"),
        (["--trial", "1", "--device", "cuda:7"], "--device: device 'cuda:7'"),  # no such device here
    ):
        bad = cli("export", directory, *args, "--out", tmp / "never", cwd=tmp)
        assert bad.returncode == 2 and message in bad.stderr and not (tmp / "never").exists()


# -- read-only directories: one line, exit 2 ---------------------------------------------------------
@contextlib.contextmanager
def read_only(path):
    """``path`` made read-only: a read-only bind mount as root (permission bits do not stop root),
    else the write bits removed."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot bind-mount as root here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_directories_give_one_line_and_exit_2(zoo, resumed, tmp_path):
    import shutil

    _, finished, _ = resumed
    directory = tmp_path / "ro" / "campaign"
    shutil.copytree(finished, directory, symlinks=True)
    path = experiment(tmp_path, zoo)
    why = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    with read_only(tmp_path / "ro"):
        new = cli("run", path, "--out", tmp_path / "ro" / "new", cwd=tmp_path)
        resume = cli("resume", directory, cwd=tmp_path)
        status = cli("status", directory, cwd=tmp_path)
        pareto = cli("pareto", directory, cwd=tmp_path)
        elsewhere = cli("pareto", directory, "--plot", tmp_path / "front.png", cwd=tmp_path)
    for result, line in (
        (new, f"evomerge: error: output_dir {tmp_path / 'ro' / 'new'}: cannot create it ({why})"),
        (resume, f"evomerge: error: {directory}: campaign directory not writable ({why})"),
        (
            pareto,
            f"evomerge: error: cannot write the plot {directory / 'front.png.tmp.png'}: {why} "
            "(choose another path with --plot)",
        ),
    ):
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], result.stderr[-2000:]
    assert status.returncode == 0 and "evaluations 16/16" in status.stdout, status.stderr[-2000:]
    assert elsewhere.returncode == 0 and (tmp_path / "front.png").exists()


def test_a_journal_line_that_is_not_an_event_stops_status_and_resume_in_one_line(resumed, tmp_path):
    """JSON that is not an event (here a tell of a trial never asked) in the middle of the journal:
    ``status`` and ``resume`` name the file and line, exit 2, and leave the journal as it was."""
    import shutil

    _, finished, _ = resumed
    directory = tmp_path / "campaign"
    shutil.copytree(finished, directory, ignore=shutil.ignore_patterns("ray"))  # Ray's sockets do not copy
    journal = directory / "journal.jsonl"
    lines = journal.read_text().splitlines()
    lines.insert(5, '{"event": "tell", "id": 999, "values": [0.5, 0.5]}')
    journal.write_text("\n".join(lines) + "\n")
    before = journal.read_bytes()
    for command in ("status", "resume"):
        result = cli(command, directory, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            f"evomerge: error: {journal}:6: tell event for trial 999, which was never asked (1 so far)"
        ], result.stderr[-2000:]
    assert journal.read_bytes() == before
