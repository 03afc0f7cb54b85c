"""A campaign on a real Ray cluster of two nodes started with `ray start`, as a user runs one.

The cluster lives on this machine: a head and a second node, each with one CPU and its own resource
label, so two one-CPU workers must be placed one per node. Ray's cluster mode replaces the literal
loopback address (127.0.0.1, localhost) with the machine's external one, so the nodes use 127.0.0.2,
another loopback address; in cluster mode Ray's processes listen on every interface, so the cluster
asks for a random auth token (RAY_AUTH_MODE=token) for the few seconds it lives. Only the processes
this test started are stopped: the `ray start --block` commands' process groups, then anything still
holding the cluster's temp dir (and the test fails if there was any); never `ray stop`, which would
stop every Ray on the machine.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import REPO
from test_campaign import cli, experiment, free_port, tells, wait_for

HOST = "127.0.0.2"
RAY = REPO / ".venv" / "bin" / "ray"


def started(log: Path, procs) -> bool:
    """Whether the `ray start` writing ``log`` is up; fails at once if one of ``procs`` exited."""
    for p in procs:
        if p.poll() is not None:
            raise AssertionError(f"a `ray start` exited with {p.returncode}: {log.read_text()[-2000:]}")
    return "Ray runtime started" in log.read_text()


@pytest.fixture
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="emrc-"))  # short: Ray's unix sockets live under it
    port = free_port()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # a multi-node cluster (evomerge's own Ray is private)
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    ray = str(RAY) if RAY.exists() else "ray"
    common = ["--block", "--node-ip-address", HOST, "--num-cpus", "1", "--temp-dir", str(temp)]
    common += ["--object-store-memory", str(256 << 20), "--disable-usage-stats"]
    nodes = {
        "head": [
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--ray-client-server-port",
            str(free_port()),
            "--resources",
            json.dumps({"evomerge-head": 1}),
        ],
        "node-b": ["--address", f"{HOST}:{port}", "--resources", json.dumps({"evomerge-node-b": 1})],
    }
    procs, logs = [], []
    try:
        for name, args in nodes.items():
            log = temp / f"{name}.log"
            procs.append(
                subprocess.Popen(
                    [ray, "start", *common, "--dashboard-agent-listen-port", str(free_port()), *args],
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
            logs.append(log)
            wait_for(lambda log=log: started(log, procs), 120, f"{name} to start")
        yield f"{HOST}:{port}", env, temp, procs
    finally:  # a throwaway cluster: no graceful drain (it takes Ray ~30 s), its process groups killed
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        left = [p for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
        for p in left:  # started by this cluster and outliving its `ray start`: only these
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"cluster processes outlived their `ray start`: {[p.pid for p in left]}"


def test_a_campaign_runs_on_a_two_node_ray_cluster(zoo, tmp_path, cluster):
    from evomerge import campaign

    address, env, temp, procs = cluster
    path = experiment(
        tmp_path, zoo, budget={"max_evaluations": 6}, workers={"count": 2, "cpus_per_worker": 1, "address": address}
    )
    result = cli("run", path, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 worker(s) ready on 2 Ray node(s)" in result.stdout + result.stderr
    directory = tmp_path / "campaign"
    assert sorted(tells(directory)) == list(range(6))  # the whole budget
    loaded = campaign.open_campaign(directory, check=False)
    assert loaded.state["finished"]
    workers = loaded.state["workers"]
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2  # one worker per node
    labels = sorted(next(iter(w["node_resources"])) for w in workers)
    assert labels == ["evomerge-head", "evomerge-node-b"]
    assert {w["node_address"] for w in workers} == {HOST}
    assert not (directory / "ray").exists()  # a joined cluster: no private Ray was started
    assert all(p.poll() is None for p in procs)  # and the cluster is left running


def test_custom_resources_need_a_cluster(zoo, tmp_path):
    path = experiment(tmp_path, zoo, workers={"resources": {"big-gpu-node": 1}})
    result = cli("run", path, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"evomerge: error: {path}: workers.resources: custom resources are offered by the nodes of a Ray "
        "cluster; set workers.address to join one (a private local Ray has none)"
    ]
    assert not (tmp_path / "campaign").exists()
