"""Models named by hub id, found offline in a Hugging Face cache (``HF_HOME``) laid out as
huggingface_hub writes it: ``hub/models--ORG--NAME/{blobs,refs/main,snapshots/REV/}``, snapshot
files being links to content-addressed blobs. A campaign and an export run with ``--offline``;
``HF_ENDPOINT`` points at a local server that records every request, and none may arrive.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import yaml
from conftest import REPO
from test_campaign import cli, tells, write_evaluator

ORG = "evomerge-zoo"


def add_to_cache(hub, repo_id, folder, revision):
    """Put a model directory into the hub cache the way a download leaves it."""
    root = hub / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


class Recorder(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_GET(self):  # noqa: N802
        self.requests.append(self.path)
        self.send_error(404)

    do_HEAD = do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(zoo, tmp_path):
    """An HF_HOME holding the zoo's models as hub ids, and a recording HF_ENDPOINT."""
    home = tmp_path / "hf-home"
    for i, name in enumerate(("base", "expert-add", "expert-sort")):
        add_to_cache(home / "hub", f"{ORG}/{name}", zoo / name, f"{i + 1:040x}")
    Recorder.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))},
        "HF_HOME": str(home),
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
    }
    yield env, Recorder.requests
    server.shutdown()


def write_experiment(tmp_path, models, budget=6):
    path = tmp_path / "hub.yaml"
    data = {
        "name": "t-hub",
        "seed": 0,
        "models": models,
        "search_space": str(REPO / "search_spaces" / "two_experts_layer_groups.yaml"),
        "evaluator": str(write_evaluator(tmp_path)),
        "optimizer": {"name": "random"},
        "budget": {"max_evaluations": budget},
        "output_dir": str(tmp_path / "campaign"),
        "tracking": {"refresh_s": 0.5},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_recorder_sees_a_hub_request_when_not_offline(hub):
    """The control: without offline mode, the hub client goes to HF_ENDPOINT and is recorded."""
    env, requests = hub
    code = f"from huggingface_hub import hf_hub_download; hf_hub_download('{ORG}/absent', 'config.json')"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and any("absent" in r for r in requests)


def test_a_campaign_and_an_export_by_hub_id_offline_from_the_cache(hub, tmp_path):
    env, requests = hub
    models = {"base": f"{ORG}/base", "expert-add": f"{ORG}/expert-add", "expert-sort": f"{ORG}/expert-sort"}
    path = write_experiment(tmp_path, models)
    result = cli("run", path, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    directory = tmp_path / "campaign"
    assert sorted(tells(directory)) == list(range(6))
    out = tmp_path / "export"
    result = cli("export", directory, "--best", "--out", out, "--quiet", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["base_model"] == f"{ORG}/base"  # the recipe names the models as the user did
    assert {m["model"] for m in config["models"]} <= set(models.values())
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert requests == []  # nothing tried the network


def test_a_hub_id_missing_from_the_cache_is_one_line_before_compute(hub, tmp_path):
    env, requests = hub
    models = {"base": f"{ORG}/base", "expert-add": f"{ORG}/expert-add", "expert-sort": f"{ORG}/expert-sortt"}
    path = write_experiment(tmp_path, models)
    result = cli("run", path, cwd=tmp_path, env=env, timeout=60)
    assert result.returncode == 2
    hub_dir = env["HF_HOME"] + "/hub"
    assert result.stderr.strip().splitlines() == [
        f"evomerge: error: {path}: models.expert-sort: '{ORG}/expert-sortt' is not a local directory nor a model "
        f"in the local hub cache ({hub_dir}); offline mode forbids fetching it"
    ]
    assert not (tmp_path / "campaign").exists() and requests == []


def test_space_show_reads_the_layer_count_of_a_hub_id_in_the_cache_or_a_config_file(hub, zoo, tmp_path):
    env, requests = hub
    space = str(REPO / "search_spaces" / "real_three_experts_ties_groups.yaml")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads((zoo / "base" / "config.json").read_text()), "num_hidden_layers": 80}))
    for model, layers in ((f"{ORG}/base", 4), (str(config), 80)):
        shown = subprocess.run(
            [sys.executable, "-m", "evomerge", "--offline", "space", "show", space, "--model", model],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stderr
        genes = 3 * 2 * -(-layers // 8)  # three experts, weight and density, groups of 8 layers
        assert f"{genes} genes for a {layers}-layer model" in shown.stdout
    absent = subprocess.run(
        [sys.executable, "-m", "evomerge", "--offline", "space", "show", space, "--model", f"{ORG}/absent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert absent.returncode == 2 and "nor a model in the local hub cache" in absent.stderr
    assert not requests  # nothing was asked of the hub
