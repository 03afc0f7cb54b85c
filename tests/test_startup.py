"""The pieces of a campaign's start and stop that run in the controller: the clock its stages are
counted on, work on a thread of its own, the shared copy's size from the safetensors headers, the
store that answers only once it has published, the tracker that ends its run while the caller
works, and the line `evomerge status` prints for a session."""

import threading
import time

import psutil
import pytest
import torch

from evomerge.background import Background
from evomerge.campaign import Stages, process_started
from evomerge.cli import _session_line
from evomerge.cluster.store import SharedStore
from evomerge.merge.shared import Inputs, plan_bytes, stored_names, with_names


def test_the_stage_clock_starts_with_the_process():
    started = process_started()
    # psutil's create_time counts from the boot time rounded to the second; /proc is to the tick
    assert abs(started - psutil.Process().create_time()) <= 1.05
    assert started <= time.time()
    stages = Stages()
    assert stages.origin == pytest.approx(started, abs=0.02)
    stages.mark("ray", when=stages.origin + 1.23456)
    stages.mark("ray", when=stages.origin + 9.0)  # a stage is reached once: the first mark stays
    assert stages.at == {"ray": 1.235}


def test_without_proc_the_stage_clock_falls_back_to_psutil_then_to_now(monkeypatch):
    import builtins

    real_open, created = builtins.open, psutil.Process().create_time()

    def no_proc_self(path, *args, **kwargs):  # psutil reads /proc/<pid>/ itself, and keeps working
        if str(path) in ("/proc/self/stat", "/proc/uptime"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc_self)
    assert process_started() == created

    def no_process_table(*args, **kwargs):
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil, "Process", no_process_table)
    before = time.time()
    assert before <= process_started() <= time.time()


def test_background_hands_over_its_value_or_its_error():
    done = threading.Event()
    job = Background(lambda: done.set() or 42, "answer")
    job.wait()  # not started: nothing to wait for
    assert not done.is_set()
    assert job.result() == 42 and done.is_set()  # result() starts it when nobody did
    failing = Background(lambda: 1 / 0, "failing")
    failing.start()
    failing.start()  # once only
    with pytest.raises(ZeroDivisionError):
        failing.result()


def inputs(zoo, **kw):
    return Inputs({n: str(zoo / n) for n in ("base", "expert-add", "expert-sort")}, "base", None, {}, **kw)


def test_the_shared_copys_size_from_the_headers_is_the_exact_size_on_the_zoo(zoo, tmp_path):
    exact = with_names(inputs(zoo))
    stored = stored_names(inputs(zoo))
    assert set(stored) == set(exact.names) and len(stored) == len(exact.names)
    estimate = plan_bytes(inputs(zoo, names=stored))
    assert estimate == plan_bytes(exact)
    base = sum(t.numel() * t.element_size() for t in _state(zoo / "base").values())
    assert estimate["base"] == base and estimate["experts"] == 2 * base  # two float32 task vectors
    # a pickled checkpoint cannot be listed without loading it: no estimate
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((zoo / "base" / "config.json").read_text())
    torch.save(_state(zoo / "base"), pickled / "pytorch_model.bin")
    both = Inputs({"base": str(pickled), "expert-add": str(zoo / "expert-add")}, "base", None, {}, allow_pickle=True)
    assert stored_names(both) is None


def test_a_pool_sizes_pickled_checkpoints_exactly_before_ray_starts(zoo, tmp_path):
    """No header to read: the names come first, and the size Ray is started with is the exact one."""
    from evomerge.cluster.pool import WorkerPool
    from evomerge.cluster.worker import WorkerSpec

    models = {}
    for name in ("base", "expert-add"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((zoo / name / "config.json").read_text())
        torch.save(_state(zoo / name), d / "pytorch_model.bin")
        models[name] = str(d)
    spec = WorkerSpec(models=models, base="base", evaluator={}, allow_pickle=True)
    pool = WorkerPool(spec)
    naming, estimate = pool._read_models()
    exact = with_names(Inputs(models, "base", None, {}, allow_pickle=True))
    assert estimate == sum(plan_bytes(exact).values()) == pool._shared_bytes(naming)
    assert pool._inputs.names == exact.names


def test_parameter_names_are_kept_per_config_and_transformers_and_read_without_it(zoo, tmp_path, monkeypatch):
    """The names cache: the list built from the config the first time, read back in a process
    that then imports neither transformers nor torch; another config is another entry; a damaged
    entry or an unwritable cache only costs a build; a config naming its own code is not kept."""
    import json
    import subprocess
    import sys

    from evomerge.models.config import _built_names, parameter_names

    cache = tmp_path / "cache"
    monkeypatch.setenv("EVOMERGE_CACHE", str(cache))
    built = _built_names(zoo / "base", False)
    assert "model.embed_tokens.weight" in built and len(built) == len(set(built))
    assert parameter_names(zoo / "base") == built
    [entry] = (cache / "parameter-names").iterdir()
    assert json.loads(entry.read_text()) == built
    read = (
        "import json, sys; from evomerge.models.config import parameter_names; "
        f"names = parameter_names({str(zoo / 'base')!r}); "
        "print(json.dumps([names, 'transformers' in sys.modules, 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == [built, False, False]
    # one layer fewer: another entry, with that layer's names gone
    smaller = tmp_path / "smaller"
    smaller.mkdir()
    config = json.loads((zoo / "base" / "config.json").read_text())
    last = config["num_hidden_layers"] - 1
    (smaller / "config.json").write_text(json.dumps({**config, "num_hidden_layers": last}))
    names = parameter_names(smaller)
    assert names == [n for n in built if not n.startswith(f"model.layers.{last}.")] != built
    assert len(list((cache / "parameter-names").iterdir())) == 2
    entry.write_text('["model.embed_tokens.weight", 3')  # cut short: built again, and kept whole
    assert parameter_names(zoo / "base") == built and json.loads(entry.read_text()) == built
    entry.write_text('["model.embed_tokens.weight", 3]')  # not a list of names
    assert parameter_names(zoo / "base") == built
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    assert parameter_names(custom) == built
    assert len(list((cache / "parameter-names").iterdir())) == 2  # its code could change: not kept
    monkeypatch.setenv("EVOMERGE_CACHE", str(entry))  # a file where the folder should be
    assert parameter_names(smaller) == names


def _state(model_dir):
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_the_store_answers_refs_only_once_publish_has_ended():
    import ray

    class Watched(threading.Event):
        """The store's settled flag, saying when someone waits on it."""

        waiting = threading.Event()

        def wait(self, timeout=None):
            self.waiting.set()
            return super().wait(timeout)

    store = SharedStore()
    store._settled = Watched()
    answers = []
    asking = threading.Thread(target=lambda: answers.append(store.refs()), daemon=True)
    asking.start()
    assert Watched.waiting.wait(timeout=60)  # the question came before publish ended: it waits
    assert not answers
    store.published = {"experts": ["a"], "refs": {}}
    store._settled.set()
    asking.join(timeout=60)
    assert ray.cloudpickle.loads(answers[0]) == {"experts": ["a"], "refs": {}}
    failed = SharedStore()
    failed._settled.set()  # publish ended without a copy
    with pytest.raises(RuntimeError, match="could not be made"):
        failed.refs()


def test_the_tracker_ends_its_run_while_the_caller_works(tmp_path):
    from mlflow import MlflowClient

    from evomerge.tracking.mlflow_tracker import Tracker, local_store

    uri, artifacts = local_store(tmp_path)
    tracker = Tracker(uri, "t-finish", ["a"], ["maximize"], artifacts)
    parent = tracker.open(None, {}, {}, None)
    ending, may_end = threading.Event(), threading.Event()
    set_terminated = tracker.client.set_terminated

    def held(run_id, status):  # the tracking thread ends the run only once the test lets it
        ending.set()
        assert may_end.wait(timeout=60)
        set_terminated(run_id, status)

    tracker.client.set_terminated = held
    tracker.finish("KILLED")  # returns at once: the caller stops its workers meanwhile
    tracker.finish("FINISHED")  # the end is queued once: the first status stands
    assert ending.wait(timeout=60)  # the thread is ending the run while the caller goes on
    assert MlflowClient(tracking_uri=uri).get_run(parent).info.status == "RUNNING"
    may_end.set()
    tracker.join()
    tracker.join()  # nothing left to wait for
    assert MlflowClient(tracking_uri=uri).get_run(parent).info.status == "KILLED"


def test_the_status_line_of_a_session():
    session = {
        "status": "FINISHED",
        "stages": {
            "checked": 2.04,
            "ray": 6.18,
            "shared": 9.62,
            "workers": 12.76,
            "tracking": 12.81,
            "kinship": 12.84,
            "first_result": 13.03,
            "last_result": 17.54,
            "shutdown": 18.2,
        },
    }
    assert _session_line(session) == (
        "last session (finished): start-up checks 2.0, Ray 6.2, shared copy 9.6, workers 12.8, MLflow 12.8 s; "
        "results from 13.0 to 17.5 s; stopped at 18.2 s"
    )
    # stopped before its workers were ready (a path space has no shared copy): what it reached
    assert _session_line({"status": "KILLED", "stages": {"checked": 1.0, "ray": 4.0, "shutdown": 4.5}}) == (
        "last session (killed): start-up checks 1.0, Ray 4.0 s; stopped at 4.5 s"
    )
