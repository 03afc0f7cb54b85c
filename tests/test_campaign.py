"""Campaigns end to end through the CLI: bad files, a real MLflow server, Ctrl-C, SIGKILL, resume, export."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import yaml
from conftest import REPO

TASKS = REPO / "evaluators" / "zoo"


def write_evaluator(tmp_path, limit=20, batch_size=20, name="evaluator.yaml"):
    path = tmp_path / name
    path.write_text(
        yaml.safe_dump(
            {
                "limit": limit,
                "seed": 0,
                "batch_size": batch_size,
                "objectives": [
                    {"name": "add", "task": str(TASKS / "zoo_add_{split}.yaml"), "metric": "exact_match"},
                    {"name": "sort", "task": str(TASKS / "zoo_sort_{split}.yaml"), "metric": "acc"},
                ],
            }
        )
    )
    return path


def experiment(tmp_path, zoo, name="exp.yaml", **overrides):
    data = {
        "name": "t-campaign",
        "seed": 3,
        "models": {m: str(zoo / m) for m in ("base", "expert-add", "expert-sort")},
        "search_space": str(REPO / "search_spaces" / "two_experts_layer_groups.yaml"),
        "evaluator": str(write_evaluator(tmp_path)),
        "optimizer": {"name": "nsga2", "options": {"sampler_options": {"population_size": 4}}},
        "reference_point": {"add": 0.0, "sort": 0.0},
        "budget": {"max_evaluations": 12},
        "workers": {"count": 1},
        "output_dir": str(tmp_path / "campaign"),
        "tracking": {"refresh_s": 0.5},
    }
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        elif key in ("budget", "workers", "tracking", "optimizer") and isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args, cwd, timeout=300, **kw):
    return subprocess.run(
        [sys.executable, "-m", "evomerge", "--offline", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def start(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge", "--offline", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def tells(directory):
    path = directory / "journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event["event"] == "tell":
            out.append(event["id"])
    return out


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def session_processes(pgid):
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return out


# -- bad input: one line, exit 2, nothing computed or written -------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {
    "missing budget": ({"budget": None}, r"exp.yaml: missing required field 'budget'"),
    "unknown optimizer": ({"optimizer": {"name": "sgd"}}, "exp.yaml: optimizer.name: unknown optimizer 'sgd'"),
    "missing model": (
        {"models": {"expert-add": "/nonexistent/model"}},
        "exp.yaml: models.expert-add: model directory not found",
    ),
    "space model not given": ({"models": "drop-sort"}, "exp.yaml: models: the search space uses model 'expert-sort'"),
    "unknown objective": ({"objectives": ["add", "speed"]}, "exp.yaml: objectives[1]: 'speed' is not an objective"),
    "bad reference": (
        {"reference_point": {"add": 0.0}},
        "exp.yaml: reference_point: give one value for each objective",
    ),
    "unreachable tracking": (
        {"tracking": {"uri": "http://127.0.0.1:PORT"}},
        "exp.yaml: tracking.uri: tracking server http://127.0.0.1:PORT unreachable",
    ),
    "incompatible architecture": (
        {"models": "wide-sort"},
        "exp.yaml: models.expert-sort: incompatible with the base 'base': hidden_size",
    ),
    "tensor shape differs": (
        {"models": "reshaped-sort"},
        "exp.yaml: models.expert-sort: cannot be merged with the base 'base': "
        "tensor 'model.layers.0.mlp.up_proj.weight' has shape (129, ",
    ),
    "unknown optimizer option": (
        {"optimizer": {"options": {"popsiz": 8}}},
        "exp.yaml: optimizer.options: popsiz: not an option of optimizer 'nsga2'; valid: sampler_options",
    ),
    "unknown sampler option": (
        {"optimizer": {"options": {"sampler_options": {"population_siz": 4}}}},
        "exp.yaml: optimizer.options: sampler_options: NSGAIISampler takes no option(s) population_siz",
    ),
    "bad optimizer option value": (
        {"optimizer": {"name": "cma", "options": {"popsize": 1}}},
        "exp.yaml: optimizer.options: popsize: Input should be greater than or equal to 2",
    ),
    "metric not reported": (
        {"evaluator": "metric:no_such_metric"},
        "exp.yaml: evaluator: EVALUATOR: objectives[1].metric: "
        "task zoo_sort_search does not report 'no_such_metric'; it reports: acc",
    ),
    "unknown memory option": (
        {"workers": {"memory": {"cach": "none"}}},
        "exp.yaml: unsupported key 'workers.memory.cach'",
    ),
    "rung not below limit": (
        {"fidelity": {"rungs": [5, 20]}},
        "exp.yaml: fidelity.rungs: every rung must score fewer documents than the evaluator's limit (20); got 20",
    ),
    "promotion fraction": (
        {"fidelity": {"rungs": [5], "promote": 1.5}},
        "exp.yaml: fidelity.promote: Input should be less than or equal to 1",
    ),
    "multi-fidelity on perplexity": (
        {"fidelity": {"rungs": [5]}, "evaluator": "perplexity:data/general_{split}.txt"},
        "exp.yaml: fidelity: objective 'sort' is a perplexity: multi-fidelity subsets lm-eval documents only",
    ),
    "racing with multi-fidelity": (
        {"racing": {}, "fidelity": {"rungs": [5]}},
        "exp.yaml: racing: racing and fidelity (multi-fidelity) exclude each other; keep one",
    ),
    "racing without a check": (
        {"racing": {"check": 0}},
        "exp.yaml: racing.check: racing without any full-fidelity check: give a share above 0",
    ),
    "more anchors than the pool": (
        {"racing": {"anchors": 25}},
        "exp.yaml: racing.anchors: 25 anchor documents is not fewer than the 20 documents objective 'add' scores",
    ),
    "racing's mean rule over objectives of both directions": (
        {"racing": {"rule": "mean"}, "evaluator": "direction:minimize"},
        "exp.yaml: racing.rule: the mean rule needs objectives of one direction (all maximized or all minimized)",
    ),
    "racing with an unknown estimate": (
        {"racing": {"estimate": "median"}},
        "exp.yaml: racing.estimate: Input should be 'neighbours' or 'strata'",
    ),
    "racing's gain without the hypervolume rule": (
        {"racing": {"rule": "dominance", "gain": 0.1}},
        "exp.yaml: racing: gain applies to rule: hypervolume only (this rule is dominance)",
    ),
    "racing on perplexity": (
        {"racing": {}, "evaluator": "perplexity:data/general_{split}.txt"},
        "exp.yaml: racing: objective 'sort' is a perplexity: it has no per-document scores to race on",
    ),
    "unknown lm-eval task": (
        {"evaluator": "task:no_such_task_xyz"},
        "exp.yaml: evaluator: EVALUATOR: objectives: unknown lm-eval task(s) ['no_such_task_xyz']",
    ),
}


def edited_model(source, out, edit):
    """A copy of the model directory ``source`` at ``out`` whose weights went through ``edit(state)``."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def reshaped_expert(zoo, tmp_path):
    """expert-sort with one MLP tensor a row taller than the base's (same config.json)."""
    import torch

    name = "model.layers.0.mlp.up_proj.weight"
    return edited_model(
        zoo / "expert-sort",
        tmp_path / "reshaped",
        lambda state: state.__setitem__(name, torch.cat([state[name], state[name][:1]])),
    )


@pytest.mark.parametrize("case", list(BAD))
def test_bad_experiments_fail_in_one_line_before_any_compute(zoo, tmp_path, case):
    overrides, message = BAD[case]
    port = str(free_port())
    overrides = json.loads(json.dumps(overrides).replace("PORT", port))
    message = message.replace("PORT", port)
    if overrides.get("models") == "drop-sort":
        overrides["models"] = {m: str(zoo / m) for m in ("base", "expert-add")}
    elif overrides.get("models") == "wide-sort":
        wide = tmp_path / "wide"
        wide.mkdir()
        config = json.loads((zoo / "expert-sort" / "config.json").read_text())
        (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
        (wide / "model.safetensors").write_bytes((zoo / "expert-sort" / "model.safetensors").read_bytes())
        overrides["models"] = {m: str(zoo / m) for m in ("base", "expert-add")} | {"expert-sort": str(wide)}
    elif overrides.get("models") == "reshaped-sort":
        overrides["models"] = {m: str(zoo / m) for m in ("base", "expert-add")} | {
            "expert-sort": str(reshaped_expert(zoo, tmp_path))
        }
    elif "models" in overrides:
        overrides["models"] = {m: str(zoo / m) for m in ("base", "expert-add", "expert-sort")} | overrides["models"]
    if str(overrides.get("evaluator", "")).startswith(("metric:", "task:", "perplexity:", "direction:")):
        kind, value = overrides["evaluator"].split(":")
        evaluator = write_evaluator(tmp_path, name="broken-evaluator.yaml")
        data = yaml.safe_load(evaluator.read_text())
        if kind == "perplexity":
            data["objectives"][1] = {"name": "sort", "perplexity": str(TASKS / value), "unit": "line"}
        else:
            data["objectives"][1 if kind == "metric" else 0][kind] = value
        evaluator.write_text(yaml.safe_dump(data))
        overrides["evaluator"] = str(evaluator)
        message = message.replace("EVALUATOR", str(evaluator))
    path = experiment(tmp_path, zoo, **overrides)
    result = cli("run", path, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"evomerge: error: {path}: "), result.stderr
    assert message.replace("exp.yaml", str(path)).split(": ", 1)[1] in lines[0]
    assert not (tmp_path / "campaign").exists()  # nothing written


def test_an_alias_bomb_in_an_option_value_is_refused_before_it_grows(zoo, tmp_path):
    """A few hundred bytes of YAML aliases standing for 9 ** 9 values, where only the option's
    name used to be checked: refused in one line naming the file, nothing written."""
    laughs = ["lol"] * 9
    for _ in range(8):
        laughs = [laughs] * 9  # one list nine times: safe_dump writes it as an anchor and aliases
    path = experiment(
        tmp_path, zoo, optimizer={"name": "tpe", "options": {"sampler_options": {"n_startup_trials": laughs}}}
    )
    assert len(path.read_bytes()) < 5000
    result = cli("run", path, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"evomerge: error: {path}: its aliases (*name) expand it beyond 100,000 values (a YAML alias bomb?); "
        "refusing to read it"
    ]
    assert not (tmp_path / "campaign").exists()


# -- a real MLflow server --------------------------------------------------------------------------
class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a sqlite store under ``root``: started, killed and
    started again on the same store and port."""

    def __init__(self, root):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        mlflow = REPO / ".venv" / "bin" / "mlflow"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        self.proc = subprocess.Popen(
            [
                str(mlflow) if mlflow.exists() else "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        wait_for(self.answers, 90, "the MLflow server")

    def answers(self):
        try:
            return urllib.request.urlopen(self.url + "/health", timeout=1).status == 200
        except OSError:
            return False

    def end(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:  # a graceful stop waits out its clients' idle connections (about 10 s): not checked here
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_service(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.end()


@pytest.fixture
def mlflow_server(mlflow_service):
    if mlflow_service.proc.poll() is not None:  # a test killed it: the same store again
        mlflow_service.start()
    return mlflow_service.url


def rest(url, path, body=None):
    if body is None:
        req = urllib.request.Request(url + path)
    else:
        req = urllib.request.Request(
            url + path, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
        )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def runs(url, experiment_id, filter_string):
    return rest(
        url,
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000},
    ).get("runs", [])


def test_campaign_tracks_runs_front_and_artifacts_on_a_real_mlflow_server(zoo, tmp_path, mlflow_server):
    from evomerge import campaign

    path = experiment(tmp_path, zoo, tracking={"uri": mlflow_server, "experiment": "t-server", "log_samples": True})
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluations 12 (" in result.stdout and f"MLflow: {mlflow_server}" in result.stdout

    created = rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=t-server")["experiment"]
    exp_id = created["experiment_id"]
    # a model-training experiment, so that MLflow's UI opens it on the runs table
    assert {t["key"]: t["value"] for t in created["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = runs(mlflow_server, exp_id, "tags.`evomerge.campaign_dir` != ''")
    pid = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED"
    front_link = (
        f"{mlflow_server}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=pareto-front"
    )
    assert f"  front:      {front_link}\n" in result.stdout
    assert f"/#/experiments/{exp_id}/runs/{pid}/artifactPath/front.png?workflowType=machine_learning\n" in result.stdout
    # the saved view the front's link opens: the front, the objectives as columns
    view = json.loads({t["key"]: t["value"] for t in created["tags"]}["mlflow.sharedViewState.pareto-front"])
    assert view["name"] == "Pareto front"
    state = json.loads(view["state"])
    assert state["searchFilter"] == "tags.pareto = 'true'" and state["selectedColumns"] == [
        "metrics.`add`",
        "metrics.`sort`",
    ]
    note = {t["key"]: t["value"] for t in parent["data"]["tags"]}["mlflow.note.content"]
    assert f"get-artifact?path=front.png&run_uuid={pid}" in note
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["experiment.seed"] == "3" and params["experiment.optimizer.name"] == "nsga2"
    assert "versions.torch" in params and "versions.lm_eval" in params
    children = runs(mlflow_server, exp_id, f"tags.evomerge.campaign_run = '{pid}'")
    assert len(children) == 12
    # flat: no run is nested under the campaign run, so the UI lists front members as rows
    assert not runs(mlflow_server, exp_id, f"tags.mlflow.parentRunId = '{pid}'")
    trial_of = {int({t["key"]: t["value"] for t in c["data"]["tags"]}["evomerge.trial"]): c for c in children}
    assert sorted(trial_of) == list(range(12))

    loaded = campaign.open_campaign(tmp_path / "campaign", check=False)
    search = loaded.search()
    for trial in search.trials:
        c = trial_of[trial.id]
        metrics = {m["key"]: m["value"] for m in c["data"]["metrics"]}
        cparams = {p["key"]: p["value"] for p in c["data"]["params"]}
        assert c["info"]["status"] == ("FINISHED" if trial.status == "done" else "FAILED")
        if trial.status == "done":
            assert [metrics["add"], metrics["sort"]] == trial.values
        assert metrics["time_evaluate_s"] > 0
        assert float(cparams["gene.weight.expert-add.0"]) == pytest.approx(trial.genome[0])
        assert json.loads(cparams["recipe.expert-add.weight"])[0] == pytest.approx(trial.genome[0])
    # the UI's filter finds exactly the front
    front = runs(mlflow_server, exp_id, "tags.pareto = 'true'")
    assert sorted(int({t["key"]: t["value"] for t in r["data"]["tags"]}["evomerge.trial"]) for r in front) == sorted(
        t.id for t in search.front()
    )
    assert all({t["key"]: t["value"] for t in r["data"]["tags"]}["pareto_rank"] == "1" for r in front)
    history = rest(mlflow_server, f"/api/2.0/mlflow/metrics/get-history?run_id={pid}&metric_key=hypervolume")["metrics"]
    assert history and history[-1]["step"] == 12
    assert history[-1]["value"] == pytest.approx(search.hypervolume([0.0, 0.0]))
    files = {f["path"] for f in rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={pid}")["files"]}
    assert {"front.json", "front.html", "front.png", "experiment.yaml"} <= files
    # per-sample records of a candidate: 20 documents per task, their answers and metrics
    done = next(t for t in search.trials if t.status == "done")
    run_id = trial_of[done.id]["info"]["run_id"]
    assert "samples.json" in {
        f["path"] for f in rest(mlflow_server, f"/api/2.0/mlflow/artifacts/list?run_id={run_id}")["files"]
    }
    from mlflow import MlflowClient

    records = MlflowClient(tracking_uri=mlflow_server).download_artifacts(run_id, "samples.json", str(tmp_path))
    samples = json.loads(open(records).read())
    assert sorted(samples) == ["zoo_add_search", "zoo_sort_search"] and len(samples["zoo_add_search"]) == 20
    assert sum(r["exact_match"] for r in samples["zoo_add_search"]) / 20 == done.values[0]


# -- a tracking server that dies or stops answering ------------------------------------------------
def candidate_runs(url, experiment_id):
    """trial id -> the run ids of that candidate (active runs only: deleted ones are gone)."""
    out = {}
    for r in runs(url, experiment_id, "tags.`evomerge.role` = 'candidate'"):
        tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        out.setdefault(int(tags["evomerge.trial"]), []).append((r["info"]["run_id"], r["info"]["status"]))
    return out


def test_a_tracking_server_killed_mid_campaign_never_holds_it_and_resume_logs_what_it_missed(
    zoo, tmp_path, mlflow_service
):
    """The server's process group SIGKILLed after 2 results: the campaign finishes its budget with
    MLflow's retries bounded (evomerge's defaults), exits 4 naming the results MLflow lacks; once
    the server is back on the same store, resume logs exactly those, and a second resume nothing."""
    from evomerge import campaign
    from evomerge.campaign import id_ranges

    url = mlflow_service.url
    if mlflow_service.proc.poll() is not None:
        mlflow_service.start()
    evaluator = write_evaluator(tmp_path, limit=10, batch_size=10)
    tracking = {"uri": url, "experiment": "t-dies"}
    path = experiment(tmp_path, zoo, evaluator=str(evaluator), budget={"max_evaluations": 6}, tracking=tracking)
    directory = tmp_path / "campaign"
    proc = start("run", path, cwd=tmp_path)
    try:
        wait_for(lambda: len(tells(directory)) >= 2, 240, "2 results")
        with frozen_workers(proc):  # the rest of the campaign comes after the server is gone
            mlflow_service.end(signal.SIGKILL)
            told_before = len(tells(directory))
        began = time.monotonic()
        out, err = proc.communicate(timeout=180)  # unbounded retries held it for hours
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 4, err[-3000:]
    assert time.monotonic() - began < 180
    state = json.loads((directory / "campaign.json").read_text())
    assert state["finished"] and len(tells(directory)) == 6
    missing = state["untracked"]["trials"]
    assert len(missing) >= 6 - told_before
    (line,) = [ln for ln in err.splitlines() if "did not reach MLflow" in ln]
    assert line.startswith(
        f"evomerge: warning: {len(missing)} of 6 results (trials {id_ranges(missing)}) did not reach MLflow at {url} ("
    ), err
    assert line.endswith(f"kept in the journal: once the server answers, `evomerge resume {directory}` logs them")

    status = cli("status", directory, cwd=tmp_path)
    assert status.returncode == 0 and line.removeprefix("evomerge: warning: ") in status.stdout
    mlflow_service.start()  # the same store: what reached MLflow before the kill is there
    exp_id = rest(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=t-dies")["experiment"]["experiment_id"]
    finished = {t for t, rs in candidate_runs(url, exp_id).items() if any(st != "RUNNING" for _, st in rs)}
    lacking = sorted(set(range(6)) - finished)
    # the line names what MLflow lacks, and at most the one result whose last call the server took
    # but never answered (killed in between): the controller cannot know that it arrived
    assert set(lacking) <= set(missing) and len(missing) - len(lacking) <= 1, (lacking, missing)
    result = cli("resume", directory, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MLflow: logged {len(lacking)} result(s) it lacked (trials {id_ranges(lacking)})" in result.stdout
    logged = candidate_runs(url, exp_id)
    assert sorted(logged) == list(range(6)) and all(len(rs) == 1 for rs in logged.values()), logged
    assert all(st != "RUNNING" for rs in logged.values() for _, st in rs)
    names = {}
    for r in runs(url, exp_id, "tags.`evomerge.role` = 'candidate'"):
        tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        names[int(tags["evomerge.trial"])] = tags["mlflow.runName"]
    for trial in campaign.open_campaign(directory, check=False).search().trials:  # resume's named as run's
        what = f" ({trial.baseline or trial.label})" if trial.baseline or trial.label else ""
        assert names[trial.id] == f"trial-{trial.id:05d} add={trial.values[0]:.3g} sort={trial.values[1]:.3g}{what}"
    (parent,) = runs(url, exp_id, "tags.`evomerge.role` = 'campaign'")
    assert parent["info"]["status"] == "FINISHED"
    assert "untracked" not in json.loads((directory / "campaign.json").read_text())
    loaded = campaign.open_campaign(directory, lock=True)  # again: nothing more to log
    try:
        again = campaign.run(loaded)
    finally:
        loaded.release()
    assert again["synced"] == [] and again["exit"] == 0 and not again["untracked"]
    assert candidate_runs(url, exp_id) == logged


def test_a_tracking_server_that_stops_answering_is_waited_for_once_within_the_bound(mlflow_service, monkeypatch):
    """SIGSTOP: connections accepted, never answered. One request waits out its bound, then the
    store counts as down: the rest is not waited for, ``close`` returns within the bound and says
    what MLflow lacks; reopened once the server answers, the tracker logs exactly that."""
    from evomerge.recipe import parse_recipe
    from evomerge.search.study import FrontSnapshot, Trial
    from evomerge.tracking.mlflow_tracker import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    if mlflow_service.proc.poll() is not None:
        mlflow_service.start()
    url = mlflow_service.url
    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]})
    trials = [Trial(i, None, None, recipe, status="done", values=[i / 10]) for i in range(4)]
    snapshot = FrontSnapshot({i: 1 if i == 3 else 2 for i in range(4)}, [3], 4, 0, None)
    tracker = Tracker(url, "t-stops", ["a"], ["maximize"])
    parent = tracker.open(None, {}, {}, None)
    tracker.candidate(trials[0], [])
    wait_for(lambda: tracker.logged == {0}, 60, "the first candidate logged")
    os.killpg(mlflow_service.proc.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        for trial in trials[1:]:
            tracker.candidate(trial, [])
        tracker.close("FINISHED", lambda: snapshot)
        took = time.monotonic() - began
    finally:
        os.killpg(mlflow_service.proc.pid, signal.SIGCONT)
    assert took < 30, took  # one request (2 s) and one /health (5 s), not one per call
    assert tracker.missing(trials) == [1, 2, 3] and not tracker.ended
    assert tracker.problem == "no answer (timed out)"
    wait_for(mlflow_service.answers, 60, "the server answering again")
    again = Tracker(url, "t-stops", ["a"], ["maximize"])
    assert again.open(parent, {}, {}, None) == parent and again.logged == {0}
    for trial in trials[1:]:
        again.candidate(trial, [])
    again.close("FINISHED", lambda: snapshot)
    assert again.missing(trials) == [] and again.ended and again.problem is None
    exp_id = again.experiment_id
    done = {t: [r for r, st in rs if st == "FINISHED"] for t, rs in candidate_runs(url, exp_id).items()}
    assert {t: len(rs) for t, rs in done.items()} == {0: 1, 1: 1, 2: 1, 3: 1}


def test_a_tracker_whose_server_is_gone_when_it_opens_holds_nothing_up():
    """The server gone between the start's check and the campaign run's creation: the tracker is
    down for the session (with evomerge's bounds, seconds), every result counts as missing."""
    from evomerge.recipe import parse_recipe
    from evomerge.search.study import Trial
    from evomerge.tracking.mlflow_tracker import Tracker

    recipe = parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]})
    trials = [Trial(i, None, None, recipe, status="done", values=[0.5]) for i in range(3)]
    began = time.monotonic()
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "t-gone", ["a"], ["maximize"])
    assert tracker.open(None, {}, {}, None) is None
    for trial in trials:
        tracker.candidate(trial, [])
    tracker.close("FINISHED")
    assert time.monotonic() - began < 30
    assert tracker.problem == "connection refused" and tracker.missing(trials) == [0, 1, 2] and not tracker.ended


def test_a_tracking_server_that_never_answers_is_refused_at_start(zoo, tmp_path):
    with socket.socket() as silent:  # the kernel accepts connections; nothing ever answers them
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        path = experiment(tmp_path, zoo, tracking={"uri": url})
        result = cli("run", path, cwd=tmp_path, timeout=120)
    line = f"evomerge: error: {path}: tracking.uri: tracking server {url} unreachable: timed out"
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], result.stderr[-2000:]
    assert not (tmp_path / "campaign").exists()


# -- Ctrl-C, SIGTERM, SIGKILL, resume, then export -------------------------------------------------
def workers_of(proc):
    """The controller's Ray scoring worker processes."""
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "ScoringWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@contextlib.contextmanager
def frozen_workers(proc):
    """The controller's workers suspended (the campaign cannot move on), then resumed."""
    frozen = workers_of(proc)
    for p in frozen:
        p.suspend()
    try:
        yield
    finally:
        for p in frozen:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass


def stop_after(proc, directory, results, sig):
    """Once ``results`` candidates are told, freeze the workers (so the campaign cannot finish first)
    and send ``sig`` to the controller: the signal lands mid-campaign."""
    wait_for(lambda: len(tells(directory)) >= results, 180, f"{results} results")
    with frozen_workers(proc):
        os.kill(proc.pid, sig)


def told_trials(directory):
    """(id, unit point, replicate, values) of every told trial, by id, from the journal."""
    asked, out = {}, {}
    for line in (directory / "journal.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "ask":
            asked[event["id"]] = (event["unit"], event.get("replicate", 0))
        elif event["event"] == "tell":
            out[event["id"]] = (*asked[event["id"]], event["values"])
    return [(i, *out[i]) for i in sorted(out)]


def test_shipped_experiments_are_valid(zoo):
    from evomerge.experiment import check_experiment, load_experiment

    for path in sorted((REPO / "experiments").glob("*.yaml")):
        exp = load_experiment(path)
        if path.name.startswith("template"):
            assert exp.workers.gpus_per_worker == 1  # parses; names hub models, so not checked offline
            continue
        if path.name == "lora_experts.yaml":  # the zoo's LoRA experts (zoo build --lora): test_lora_campaign.py
            continue
        if path.name == "ps_dfs_zoo.yaml":  # step 2 of a chain: its PS merge is `make demo`'s export
            assert exp.models["ps-merge"] == str(REPO / "runs" / "demo" / "export")
            exp = exp.model_copy(update={"models": {**exp.models, "ps-merge": str(zoo / "expert-add")}})
        # lm-eval's built-in tasks need the data `evomerge zoo builtin` writes (tests/test_builtin_tasks.py)
        checked = check_experiment(exp, path, check_tracking=False, check_tasks=path.name != "builtin_tasks.yaml")
        assert exp.budget.max_evaluations
        if checked.space.kind == "path":
            assert set(checked.layer_counts.values()) == {4}
        else:
            assert checked.num_layers == 4


def test_a_child_run_cut_off_mid_write_is_replaced_on_resume(tmp_path):
    """SIGKILL between creating a child run and ending it leaves it RUNNING: reopening the parent
    deletes it, so the journal's candidate is logged anew and no run stays RUNNING."""
    from mlflow import MlflowClient

    from evomerge.tracking.mlflow_tracker import CAMPAIGN_TAG, PARENT_TAG, TRIAL_TAG, Tracker, local_store

    uri, artifacts = local_store(tmp_path)
    tracker = Tracker(uri, "t-cut", ["a"], ["maximize"], artifacts)
    parent = tracker.open(None, {}, {}, None)
    tracker.close("KILLED")
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("t-cut").experiment_id
    cut = client.create_run(exp_id, tags={CAMPAIGN_TAG: parent, TRIAL_TAG: "0"}).info.run_id
    # a candidate nested the way earlier versions logged them, and an exported winner's run
    older = client.create_run(exp_id, tags={PARENT_TAG: parent, TRIAL_TAG: "1"}).info.run_id
    client.log_metric(older, "a", 0.5)
    client.set_terminated(older)
    export = client.create_run(exp_id, tags={CAMPAIGN_TAG: parent, TRIAL_TAG: "1", "evomerge.role": "export"})
    client.set_terminated(export.info.run_id)
    again = Tracker(uri, "t-cut", ["a"], ["maximize"], artifacts)
    assert again.open(parent, {}, {}, None) == parent and again.logged == {1}
    assert again._runs[1] == older
    again.close()
    assert client.get_run(cut).info.lifecycle_stage == "deleted"
    assert not client.search_runs([exp_id], "attributes.status = 'RUNNING'")


# -- a systemic failure halts the campaign, resumably ------------------------------------------------
def nan_base(zoo, tmp_path):
    """The base with a NaN in one tensor: every merge has non-finite weights, for the same reason."""
    return edited_model(
        zoo / "base",
        tmp_path / "nan-base",
        lambda state: state["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")),
    )


def test_when_the_first_candidates_all_fail_alike_the_campaign_halts_and_resumes(zoo, tmp_path):
    from mlflow import MlflowClient

    from evomerge import campaign

    base = nan_base(zoo, tmp_path)
    path = experiment(
        tmp_path,
        zoo,
        models={"base": str(base), "expert-add": str(zoo / "expert-add"), "expert-sort": str(zoo / "expert-sort")},
        budget={"max_evaluations": 6},
    )
    directory = tmp_path / "campaign"
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    reason = (
        "the first 3 candidates all failed: non-finite weights after merging (1 tensors, first: "
        "model.layers.1.mlp.down_proj.weight)"
    )
    assert f"stopped (halted: {reason}); continue with: evomerge resume {directory}" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == f"evomerge: campaign halted: {reason}"
    assert tells(directory) == []  # held back: evaluated again on resume, not burnt from the budget
    loaded = campaign.open_campaign(directory, check=False)
    client = MlflowClient(tracking_uri=loaded.tracking()[0])
    assert client.get_run(loaded.state["parent_run_id"]).info.status == "FAILED"
    assert not loaded.state["finished"]

    (base / "model.safetensors").write_bytes((zoo / "base" / "model.safetensors").read_bytes())  # the fix
    result = cli("resume", directory, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(tells(directory)) == list(range(6))
    assert client.get_run(loaded.state["parent_run_id"]).info.status == "FINISHED"


def test_a_lost_ray_node_halts_the_campaign_resumably(zoo, tmp_path):
    """SIGKILL of the private Ray's DashboardAgent takes the raylet down: the controller stops with the
    reason (exit 3) instead of hanging, and the campaign is left resumable."""
    path = experiment(tmp_path, zoo, budget={"max_evaluations": 8})
    directory = tmp_path / "campaign"
    proc = start("run", path, cwd=tmp_path)
    try:
        wait_for(lambda: len(tells(directory)) >= 2, 180, "2 results")
        with frozen_workers(proc):  # so that the campaign cannot finish before the node dies
            (agent,) = [
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if "DashboardAgent" in " ".join(p.cmdline())
            ]
            agent.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 3, err[-3000:]
    assert "stopped (halted: the Ray node died: " in out and f"continue with: evomerge resume {directory}" in out
    assert 2 <= len(tells(directory)) < 8
    # resumable: the state says so (resume itself is exercised after every kind of stop above)
    status = cli("status", directory, cwd=tmp_path)
    assert status.returncode == 0 and "not finished (evomerge resume to continue)" in status.stdout


def test_a_campaign_whose_workers_cannot_start_leaves_no_directory(zoo, tmp_path):
    """What only loading can find (here an activation transformers does not know) is reported in one
    line, and the campaign directory made for it is removed: the corrected file runs at once."""
    models = {}
    for name in ("base", "expert-add", "expert-sort"):  # all alike: the configs agree, and none loads
        models[name] = edited_model(zoo / name, tmp_path / f"broken-{name}", lambda state: None)
        config = json.loads((models[name] / "config.json").read_text())
        (models[name] / "config.json").write_text(json.dumps({**config, "hidden_act": "no_such_activation"}))
    broken = models["base"]
    path = experiment(tmp_path, zoo, models={n: str(d) for n, d in models.items()})
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("evomerge: error:")]
    # the controller reads the models' configs as it makes the shared copy, before any worker starts
    assert line == (
        f"evomerge: error: cannot read the models: {broken}: cannot build the model of its config.json: "
        "KeyError: 'no_such_activation'"
    ), line
    assert not (tmp_path / "campaign").exists()


def _huge_models(zoo, tmp_path) -> dict[str, str]:
    """Three models whose safetensors header declares an 80 GB tensor, with no data behind it."""
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [200_000, 100_000], "data_offsets": [0, 80_000_000_000]}})
    models = {}
    for name in ("base", "expert-add", "expert-sort"):
        d = tmp_path / f"huge-{name}"
        d.mkdir()
        (d / "config.json").write_text((zoo / "base" / "config.json").read_text())
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
        models[name] = str(d)
    return models


def test_models_that_cannot_fit_this_machine_are_refused_before_anything_is_written(zoo, tmp_path):
    """Sizes come from the safetensors headers: three models whose header declares an 80 GB tensor
    (no data behind it) are refused in one line naming the sizes, and nothing is read or written."""
    models = _huge_models(zoo, tmp_path)
    path = experiment(tmp_path, zoo, models=models)
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"evomerge: error: {path}: workers: the models do not fit this machine: 1 worker(s) ")
    assert (
        "each hold a model of 74.5 GiB and a cache of up to 1.0 GiB, with the base (74.5 GiB) and the experts' "
        "task vectors (149.0 GiB) once, shared by the workers, and about 1.0 GiB for the processes (the "
        "controller, Ray, each worker's Python): 300.0 GiB in all;" in line
    ), line
    assert line.endswith("of memory is available")
    assert not (tmp_path / "campaign").exists()


def test_a_gpu_pools_shared_copy_must_fit_host_memory_too(zoo, tmp_path):
    """GPU workers hold their models on the device, but the shared copy of the base and the task
    vectors lives in host memory: the same 80 GB headers are refused for a GPU pool, naming it."""
    models = _huge_models(zoo, tmp_path)
    path = experiment(tmp_path, zoo, models=models, workers={"gpus_per_worker": 1})
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"evomerge: error: {path}: workers: the shared copy does not fit this machine's memory: the base (74.5 GiB) "
        "and the experts' task vectors (149.0 GiB) are held once in host memory for the GPU workers, and about "
        "1.0 GiB for the processes (the controller, Ray, each worker's Python): 224.5 GiB;"
    ), line
    assert not (tmp_path / "campaign").exists()


def test_workers_that_are_still_loading_when_the_start_limit_passes_say_so(zoo, tmp_path):
    path = experiment(tmp_path, zoo, workers={"start_timeout_s": 0.5})
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("evomerge: error:")]
    assert lines == [
        "evomerge: error: worker(s) 0 of 1 were still loading their models (3) and tasks after 0.5 s; "
        "give them longer with workers.start_timeout_s"
    ], result.stderr[-2000:]
    assert not (tmp_path / "campaign").exists()


def test_the_start_limit_follows_the_bytes_to_read(zoo):
    from evomerge.campaign import START_BASE_S, START_READ_BYTES_PER_S, start_limit

    size = sum(f.stat().st_size for n in ("base", "expert-add") for f in (zoo / n).glob("*.safetensors"))
    assert start_limit([str(zoo / "base"), str(zoo / "expert-add"), "org/not-cached"]) == pytest.approx(
        START_BASE_S + size / START_READ_BYTES_PER_S
    )


def test_baselines_and_multi_fidelity_in_a_campaign(zoo, tmp_path):
    """Hand baselines are scored in full and tagged; new candidates climb rungs of 5 and 10 documents
    per task before the full 20; only full results reach the front; MLflow records rung and documents."""
    from mlflow import MlflowClient

    from evomerge import campaign

    path = experiment(
        tmp_path,
        zoo,
        seeds={"uniform_average": False, "experts_alone": False, "baselines": True},
        fidelity={"rungs": [5, 10], "promote": 0.34},
        budget={"max_evaluations": 16},
        optimizer={"name": "random", "options": {}},
    )
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # progress only: no warning from Ray about the shared copy
    progress = ("starting", "evaluations", "1 worker(s) ready", "kinship")
    assert all(line.startswith(progress) for line in result.stderr.splitlines()), result.stderr
    loaded = campaign.open_campaign(tmp_path / "campaign", check=False)
    search = loaded.search()
    assert f"documents scored {search.documents};" in result.stdout
    baselines = [t for t in search.trials if t.baseline]
    assert [t.baseline for t in baselines] == [label for label, *_ in campaign.BASELINES]
    assert all(t.rung == 2 and t.documents == 2 * 20 and t.status == "done" for t in baselines)
    ta1 = next(t.recipe for t in baselines if t.baseline == "task_arithmetic lambda=1.0")
    assert ta1.merge_method == "task_arithmetic" and ta1.parameters == {"lambda": 1.0}
    assert [(m.model, m.parameters) for m in ta1.models] == [
        ("expert-add", {"weight": 1.0}),
        ("expert-sort", {"weight": 1.0}),
    ]
    searched = [t for t in search.trials if not t.baseline]
    assert len(searched) == 9 and searched[0].rung == 2  # alone at each rung so far: promoted twice
    assert all(t.documents == 2 * sum((5, 10, 20)[: t.rung + 1]) for t in searched if t.status == "done")
    assert {t.id for t in search.front()} <= {t.id for t in search.trials if t.status == "done" and t.rung == 2}
    # per-document records: every evaluation's documents and scores, each rung's ids nested in the next
    records = loaded.document_records().read()
    for t in search.trials:
        rungs = [(r, records[(t.id, r)]) for r in range(3) if (t.id, r) in records]
        assert [r for r, _ in rungs] == (list(range(t.rung + 1)) if not t.baseline else [2])
        for r, record in rungs:
            for o in ("add", "sort"):
                ((_, (ids, scores)),) = record[o].items()
                assert len(ids) == (5, 10, 20)[r] and set(scores) <= {0.0, 1.0}
        for (_, lower), (_, higher) in zip(rungs, rungs[1:]):
            for o in ("add", "sort"):
                ((task, (ids, _)),) = lower[o].items()
                assert set(ids) <= set(higher[o][task][0])
        final = records[(t.id, t.rung)]
        for j, o in enumerate(("add", "sort")):
            scores = next(iter(final[o].values()))[1]
            assert sum(scores) / len(scores) == pytest.approx(t.values[j])  # the mean is the objective

    client = MlflowClient(tracking_uri=loaded.tracking()[0])
    exp = client.get_experiment_by_name("t-campaign")
    children = {
        int(r.data.tags["evomerge.trial"]): r
        for r in client.search_runs([exp.experiment_id], "tags.`evomerge.trial` != ''")
    }
    assert sorted(children) == list(range(16))
    for t in search.trials:
        tags, metrics = children[t.id].data.tags, children[t.id].data.metrics
        assert tags.get("baseline") == ("true" if t.baseline else None)
        values = "".join(f" {o}={v:.3g}" for o, v in zip(("add", "sort"), t.values if t.status == "done" else ()))
        assert tags["mlflow.runName"] == f"trial-{t.id:05d}{values}" + (f" ({t.baseline})" if t.baseline else "")
        assert tags["rung"] == str(t.rung) and tags["full_fidelity"] == str(t.rung == 2).lower()
        assert metrics["documents"] == t.documents
        if tags["pareto"] == "true":
            assert t.rung == 2

    pareto = cli("pareto", tmp_path / "campaign", cwd=tmp_path)
    assert pareto.returncode == 0, pareto.stderr
    lines = pareto.stdout.splitlines()
    listed = lines[lines.index("hand baselines:") + 1 :][: len(baselines)]
    assert [line.split("  ")[-1].rsplit(" (", 1)[0] for line in listed] == [t.baseline for t in baselines]
    # the best mean of each kind, searched against the hand baselines (no seeds in this campaign)
    mean = lambda t: (t.values[0] + t.values[1]) / 2  # noqa: E731
    top = {
        kind: max(ts, key=lambda t: (mean(t), -t.id))
        for kind, ts in (
            ("searched", [t for t in search.finished if not t.baseline]),
            ("hand baseline", [t for t in search.finished if t.baseline]),
        )
    }
    assert lines[lines.index("hand baselines:") + 1 + len(baselines)] == (
        "best mean over the 2 objectives: "
        + ", ".join(
            f"{kind} {mean(t):.4g} (trial {t.id}" + (f", {t.baseline})" if t.baseline else ")")
            for kind, t in top.items()
        )
    )


def test_racing_on_anchor_documents_in_a_campaign(zoo, tmp_path):
    """After the hand baselines (in full), candidates are raced on 4 anchor documents per task (the
    default rule, hypervolume, from the experiment's reference point): the stopped ones cost only
    those, the rest are scored in full again; the front holds full results only; MLflow gets the
    estimate's error on the check sample. SIGKILLed once racing has begun and
    resumed, it ends with exactly its budget, each candidate told once and scored as often as its
    decisions say (that it equals its uninterrupted self is tested on the search: test_racing.py)."""
    from mlflow import MlflowClient

    from evomerge import campaign
    from evomerge.search import racing

    path = experiment(
        tmp_path,
        zoo,
        seeds={"uniform_average": False, "experts_alone": False, "baselines": True},
        racing={"anchors": 0.2, "check": 0.2, "z": 1.0, "min_full": 7, "refit": 4},  # the default rule
        budget={"max_evaluations": 16},
        optimizer={"name": "random", "options": {}},
    )
    directory = tmp_path / "campaign"
    proc = start("run", path, cwd=tmp_path)
    stop_after(proc, directory, 9, signal.SIGKILL)  # 7 baselines, then raced candidates
    proc.communicate(timeout=60)
    result = cli("resume", directory, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(tells(directory)) == list(range(16))
    loaded = campaign.open_campaign(directory, check=False)
    search = loaded.search()
    raced = search.raced
    assert [t.id for t in raced] == list(range(7, 16)) and all(t.baseline for t in search.trials[:7])
    anchors = search.anchor_documents()
    assert sorted(anchors) == ["zoo_add_search", "zoo_sort_search"] and all(len(a) == 4 for a in anchors.values())
    stopped = search.stopped_early
    assert stopped and all(t.documents == 2 * 4 and t.status == "done" for t in stopped)  # the anchors only
    # promoted: the anchors, then the rest of the pools only, a full evaluation's cost; its value is the
    # mean over the whole pools, anchors' scores included, as recorded
    assert all(t.documents == 2 * 20 for t in raced if t.full)
    records = loaded.document_records().read()
    for t in (t for t in raced if t.full):
        whole = records[(t.id, 1)]
        assert [len(whole[o.name][f"zoo_{o.name}_search"][0]) for o in loaded.objectives] == [20, 20]
        means = [sum(whole[o.name][f"zoo_{o.name}_search"][1]) / 20 for o in loaded.objectives]
        assert means == pytest.approx(t.values, abs=1e-12)
    records = loaded.document_records().read()
    for t in raced:
        assert {task: ids for task, (ids, _) in records[(t.id, 0)]["add"].items()} == {
            "zoo_add_search": anchors["zoo_add_search"]
        }
    # the front: the results in full that no other result in full dominates (both maximized), never
    # a candidate stopped on its anchors, whatever its estimate
    done = [t for t in search.trials if t.status == "done" and t.full]
    beats = lambda a, b: all(x >= y for x, y in zip(a, b)) and a != b  # noqa: E731
    front = {t.id for t in done if not any(beats(o.values, t.values) for o in done)}
    assert front and {t.id for t in search.front()} == front and not front & {t.id for t in stopped}
    assert f"{len(raced)} raced on anchor documents, {len(stopped)} stopped on their anchor documents" in result.stdout

    # the hypervolume rule, from the experiment's reference point
    reference = loaded.reference_point
    assert reference == [0.0, 0.0]
    for t in stopped:
        before = [f.values for f in search.finished if f.id < t.id]
        assert racing.gain(t.estimate, [0.0, 0.0], before, search.directions, reference) < 0.05

    client = MlflowClient(tracking_uri=loaded.tracking()[0])
    parent = client.get_run(loaded.state["parent_run_id"])
    assert {"anchors.mae.add", "anchors.rmse.sort", "anchors.spearman.add", "anchors.checked"} <= set(
        parent.data.metrics
    )
    assert parent.data.params["experiment.racing.rule"] == "hypervolume"
    assert parent.data.params["experiment.racing.gain"] == "0.05"
    exp = client.get_experiment_by_name("t-campaign")
    runs = client.search_runs([exp.experiment_id], "tags.`evomerge.trial` != ''")
    assert {int(r.data.tags["evomerge.trial"]) for r in runs if r.data.tags.get("pareto") == "true"} == front
    for r in runs:
        t = search.trials[int(r.data.tags["evomerge.trial"])]
        if t.top is not None:
            assert r.data.tags["full_fidelity"] == str(t.full).lower()
            assert r.data.metrics["estimate.add"] == t.estimate[0]  # the anchors' estimate, raced or stopped
    status = cli("status", tmp_path / "campaign", cwd=tmp_path)
    assert f"{len(raced)} raced on anchor documents, {len(stopped)} stopped on their anchors" in status.stdout


def _expert_copy(zoo, tmp_path, name, config=None, tokenizer=None):
    import shutil

    d = tmp_path / f"changed-{name}"
    shutil.copytree(zoo / name, d)
    if config:
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **config}))
    if tokenizer:
        data = json.loads((d / "tokenizer.json").read_text())
        tokenizer(data)
        (d / "tokenizer.json").write_text(json.dumps(data))
    return str(d)


def test_soft_config_and_tokenizer_differences_are_warned_hard_ones_refused(zoo, tmp_path):
    from evomerge.experiment import check_experiment, load_experiment

    def swap_two_tokens(data):
        vocab = data["model"]["vocab"]
        a, b = sorted(vocab)[:2]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    def add_special(data):
        data["added_tokens"].append({**data["added_tokens"][-1], "id": 47, "content": "<|im_start|>"})

    soft = {
        "base": str(zoo / "base"),
        "expert-add": _expert_copy(zoo, tmp_path, "expert-add", {"rms_norm_eps": 0.001}),
        "expert-sort": _expert_copy(zoo, tmp_path, "expert-sort", tokenizer=add_special),
    }
    path = experiment(tmp_path, zoo, models=soft)
    warnings = check_experiment(load_experiment(path), path, check_tracking=False, check_tasks=False).warnings
    eps = json.loads((zoo / "base" / "config.json").read_text())["rms_norm_eps"]
    assert warnings == (
        f"{path}: models.expert-add: rms_norm_eps is 0.001, the base's is {eps!r} "
        "(merged anyway: the merged model takes the base's)",
        f"{path}: models.expert-sort: its tokenizer's added tokens differ from the base's ('<|im_start|>') "
        "(merged anyway: the merged model takes the base's)",
    )
    for models, message in (
        (
            {"expert-add": _expert_copy(zoo, tmp_path / "i", "expert-add", {"intermediate_size": 1})},
            "intermediate_size",
        ),
        ({"expert-sort": _expert_copy(zoo, tmp_path / "v", "expert-sort", tokenizer=swap_two_tokens)}, "other ids"),
    ):
        path = experiment(tmp_path, zoo, models={**soft, **models})
        result = cli("run", path, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"evomerge: error: {path}: models.") and "incompatible with the base 'base'" in line
        assert message in line and not (tmp_path / "campaign").exists()
    soft_path = experiment(tmp_path, zoo, "soft.yaml", models=soft, budget={"max_evaluations": 2})
    ran = cli("run", soft_path, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    printed = [ln for ln in ran.stderr.splitlines() if ln.startswith("evomerge: warning:")]
    assert printed == [f"evomerge: warning: {w.replace(str(path), str(soft_path))}" for w in warnings]


def test_models_that_ask_for_custom_code_are_refused_unless_trusted(zoo, tmp_path):
    """A model whose config.json maps to its own code (auto_map) would be merged and scored as the
    plain architecture its model_type names: refused before compute, in one line naming the model
    and the class, by run, merge and model loading, unless trust_remote_code is on; a model_type
    transformers does not know, with no code given, is refused either way."""
    from evomerge.experiment import ExperimentError, check_experiment, load_experiment
    from evomerge.merge.ondisk import merge_to_disk
    from evomerge.merge.registry import MergeError
    from evomerge.models.loading import load_causal_lm
    from evomerge.models.source import ModelLoadError
    from evomerge.recipe import parse_recipe

    custom = {"auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    expert = _expert_copy(zoo, tmp_path, "expert-sort", custom)
    models = {"base": str(zoo / "base"), "expert-add": str(zoo / "expert-add"), "expert-sort": expert}
    path = experiment(tmp_path, zoo, models=models)
    asks = "its config.json asks for custom code: modeling_x.XForCausalLM (auto_map)"
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"evomerge: error: {path}: models.expert-sort: {asks}, which runs only with trust_remote_code: true"
    ]
    assert not (tmp_path / "campaign").exists()
    trusted = experiment(tmp_path, zoo, "trusted.yaml", models=models, trust_remote_code=True)
    check_experiment(load_experiment(trusted), trusted, check_tracking=False, check_tasks=False)
    unknown = _expert_copy(tmp_path, tmp_path / "u", "changed-expert-sort", {"model_type": "x", "auto_map": None})
    with pytest.raises(ExperimentError, match="models.expert-sort: its model_type 'x' is not one transformers knows"):
        path = experiment(tmp_path, zoo, "u.yaml", models={**models, "expert-sort": unknown}, trust_remote_code=True)
        check_experiment(load_experiment(path), path, check_tracking=False, check_tasks=False)
    recipe = parse_recipe(
        {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1}} for m in models.values()]}
    )
    with pytest.raises(MergeError, match=f"{expert}: {re.escape(asks)}, which runs only with trust_remote_code"):
        merge_to_disk(recipe, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ModelLoadError, match=f"{expert}: {re.escape(asks)}, which runs only with trust_remote_code"):
        load_causal_lm(expert)


def test_seed_recipes_of_a_parameter_space_are_read_before_anything_is_written(zoo, tmp_path):
    """A seed recipe that does not parse, or is not a point of the space, used to surface as a
    traceback once the campaign directory existed."""
    from evomerge.experiment import ExperimentError, check_experiment, load_experiment

    good = tmp_path / "good.yml"
    checked = check_experiment(load_experiment(experiment(tmp_path, zoo)), "x", check_tracking=False, check_tasks=False)
    genome = checked.genome()
    good.write_text(yaml.safe_dump(genome.decode(genome.uniform_average()).model_dump(mode="json", exclude_none=True)))
    path = experiment(tmp_path, zoo, seeds={"recipes": [str(good)]})
    check_experiment(load_experiment(path), path, check_tracking=False, check_tasks=False)
    for text, message in (
        ("merge_method: [unclosed\n", "not valid YAML"),
        ("- a list\n", "must be a mapping"),
    ):
        (tmp_path / "bad.yml").write_text(text)
        path = experiment(tmp_path, zoo, seeds={"recipes": [str(good), str(tmp_path / "bad.yml")]})
        with pytest.raises(ExperimentError, match=rf"{path}: seeds.recipes\[1\]: .*{message}"):
            check_experiment(load_experiment(path), path, check_tracking=False, check_tasks=False)
