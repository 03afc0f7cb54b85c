"""The Ray a pool runs on: a private local Ray it starts and stops, or a cluster it joins.

By default a private local Ray (``address="local"``: never an existing cluster found on the machine)
is started, bound to loopback, with its temporary files under the campaign directory, and exactly
that Ray is shut down at the end (never ``ray stop``, which would kill every Ray on the machine).
Given an address, that cluster is joined instead and left running.

Node loss: ``node_lost`` (the pool calls it on every poll) says why the Ray node is gone instead of
letting the pool wait forever on workers that will never come back. A private Ray's raylet or GCS
process exiting is seen at once; besides, every ``NODE_CHECK_EVERY`` seconds the GCS is asked whether
this driver's node is alive, which bounds the detection on a joined cluster at about 25 s (the GCS
marks a node dead after ~15 s of missed health checks) and a GCS that stops answering at
``NODE_CHECK_EVERY + GCS_TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from evomerge.errors import first_line

#: Unix socket paths are limited to 107 bytes; Ray puts ~70 characters of its own under its temp dir.
MAX_TEMP_DIR = 36
#: Seconds between asking the GCS whether this driver's node is alive.
NODE_CHECK_EVERY = 5.0
#: Seconds the GCS may take to answer before the connection counts as lost (well under the 60 s
#: after which Ray aborts a driver that cannot reach its GCS).
GCS_TIMEOUT = 5.0


def cluster_mode(address: str | None) -> bool:
    """Whether this driver joins ``address`` as a node of a multi-node cluster, so that Ray must find
    this node's own address (as ``ray start`` does by default), rather than a loopback-only Ray: a
    private one, or one whose address is the literal loopback (127.0.0.1, localhost), which Ray would
    otherwise rewrite to the machine's external address and miss."""
    if address in (None, "local"):
        return False
    if address.startswith("ray://"):
        return True
    if address == "auto":  # the cluster `ray start` made on this node, or RAY_ADDRESS
        try:
            from ray._private.services import get_ray_address_from_environment

            address = get_ray_address_from_environment("auto", None) or ""
        except Exception:
            return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host not in ("", "127.0.0.1", "localhost", "::1")


class RayRuntime:
    """Ray in this process: started privately (``address`` None or ``"local"``, temporary files in
    ``temp_dir``) or joined (any other address), watched for the loss of its node, and stopped."""

    def __init__(self, address: str | None = None, temp_dir: str | Path | None = None):
        self.address, self.temp_dir = address, Path(temp_dir) if temp_dir else None
        self.private = False  # this process started the Ray it is connected to
        self.lost: str | None = None  # why the Ray node is gone, once it is
        self._ray_dir: Path | None = None
        self._ray_temp: str | None = None  # the private Ray's temp dir, as Ray was given it
        self._reaper = None
        self._node_id = None
        self._next_node_check = 0.0

    def start(self, cpus: float, gpus: float, shared_bytes: int = 0) -> None:
        """Start the private Ray, or join the cluster; raises what ``ray.init`` raised.

        ``cpus``, ``gpus``: what every worker needs together (a private Ray gets the CPUs rounded, at
        least 1, and the GPUs rounded up); ``shared_bytes``: bytes of the models shared through the
        object store, which a private Ray's store is sized to hold beside Ray's own objects."""
        import ray
        from ray._private import ray_constants

        # evomerge's environment keeps Ray on loopback (SAFETY), which a private Ray needs; a driver that
        # joins a multi-node cluster must see this node's address as the cluster's nodes do (read per call)
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode(self.address)
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR", "namespace": "evomerge"}
        if self.address in (None, "local"):
            kwargs.update(self._private_options(cpus, gpus, shared_bytes))
            self.private = True
        else:
            kwargs["address"] = self.address
        try:
            _init_keeping_handlers(kwargs)
        except Exception:
            self.private = False
            raise
        self.lost, self._next_node_check = None, time.monotonic() + NODE_CHECK_EVERY
        self._node_id = ray.NodeID.from_hex(ray.get_runtime_context().get_node_id())
        if self.private:  # ends this Ray's leftovers should the controller be killed
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "evomerge.cluster.reaper", str(os.getpid()), self._ray_temp],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def _private_options(self, cpus: float, gpus: float, shared_bytes: int) -> dict[str, Any]:
        """``ray.init``'s arguments for a private Ray on loopback, its temp dir made."""
        self._ray_temp = self._private_temp_dir()
        options: dict[str, Any] = {
            "address": "local",
            "num_cpus": max(1, int(round(cpus))),
            "num_gpus": int(-(-gpus // 1)) if gpus else 0,
            "_node_ip_address": "127.0.0.1",
            "_temp_dir": self._ray_temp,
            "include_dashboard": False,
        }
        if shared_bytes:  # room for the shared models beside Ray's own objects, when its default is less
            default = int(0.3 * psutil.virtual_memory().available)
            options["object_store_memory"] = max(default, int(shared_bytes * 1.1) + (256 << 20))
        return options

    def _private_temp_dir(self) -> str:
        """Ray's temp dir: inside the campaign directory when its path is short enough for Ray's unix
        sockets, else a short directory in the system temp dir linked from the campaign directory."""
        if self.temp_dir is None:
            self._ray_dir = Path(tempfile.mkdtemp(prefix="evomerge-ray-"))
            return str(self._ray_dir)
        self.temp_dir.parent.mkdir(parents=True, exist_ok=True)
        if len(str(self.temp_dir.resolve())) <= MAX_TEMP_DIR:
            self.temp_dir.mkdir(exist_ok=True)
            return str(self.temp_dir.resolve())
        short = Path(tempfile.mkdtemp(prefix="emray-"))
        if self.temp_dir.is_symlink():  # an earlier run's link
            self.temp_dir.unlink()
        if not self.temp_dir.exists():
            self.temp_dir.symlink_to(short, target_is_directory=True)
        self._ray_dir = short
        return str(short)

    def stop(self) -> None:
        """Disconnect; a private Ray is shut down (and only it), a joined cluster is left running.
        Call once this process's actors on it are killed."""
        import ray

        from evomerge.cluster.reaper import reap

        if ray.is_initialized():
            if self.private:
                _stop_monitor()
            ray.shutdown()
        if self._reaper is not None:  # Ray is down: the watchdog has nothing left to guard
            self._reaper.kill()
            self._reaper.wait()
            self._reaper = None
        if self.private and self.lost:  # a dead node's orphans (agents, workers) outlive ray.shutdown
            reap(os.path.realpath(self._ray_temp))
        self.private = False

    def node_lost(self) -> str | None:
        """Why the Ray node is gone (sticky once set), or None while it is there."""
        import ray

        if self.lost:
            return self.lost
        if self.private:  # our own Ray: its core processes are this process's children
            for kind in ("raylet", "gcs_server"):
                for info in ray._private.worker._global_node.all_processes.get(kind, []):
                    if (code := info.process.poll()) is not None:
                        self.lost = f"the Ray node died: its {kind} exited ({_exit_status(code)})"
                        return self.lost
        now = time.monotonic()
        if now < self._next_node_check:
            return None
        self._next_node_check = now + NODE_CHECK_EVERY
        try:
            (alive,) = ray._private.worker.global_worker.gcs_client.check_alive([self._node_id], timeout=GCS_TIMEOUT)
        except Exception as e:
            self.lost = f"lost the connection to the Ray cluster: {first_line(e, with_type=True)}"
            return self.lost
        if not alive:
            self.lost = f"the Ray node died: the cluster marked this driver's node {self._node_id.hex()[:8]} dead"
        return self.lost


def _init_keeping_handlers(kwargs: dict[str, Any]) -> None:
    """``ray.init(**kwargs)``, with the caller's SIGTERM and SIGINT handlers back in place after it."""
    import ray

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ray.init(**kwargs)
    finally:  # ray.init installs its own SIGTERM handlers (C and Python): the caller's must win
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)


def _stop_monitor() -> None:
    """End a private Ray's autoscaler monitor at once: it outlasts the second ``ray.shutdown`` gives
    it after SIGTERM, so the shutdown would wait that second for nothing (a single node scales no
    further, and nothing talks to the monitor at the end)."""
    import ray

    try:  # Ray's internals: should they change, ray.shutdown ends the monitor as before
        node = ray._private.worker._global_node
        for info in node.all_processes.get("monitor", []) if node is not None else []:
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=5)
    except Exception:
        pass


def _exit_status(code: int) -> str:
    """A Popen return code in words: ``killed by SIGKILL``, ``exit code 1``."""
    if code >= 0:
        return f"exit code {code}"
    return "killed by " + next((s.name for s in signal.Signals if s == -code), f"signal {-code}")
