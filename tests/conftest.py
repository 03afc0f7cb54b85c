"""Shared fixtures: offline environment, a guard against outbound sockets, the cached default zoo."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

from evomerge import environment

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "evaluators" / "zoo"
#: Where the session's zoo is cached: the same place `make demo` builds it, so either pays once.
ZOO_DIR = Path(os.environ.get("EVOMERGE_TEST_ZOO", REPO / ".cache" / "zoo"))

#: The parameter-names cache of every campaign the tests start (their subprocesses inherit it): in
#: the checkout, not the user's home.
os.environ.setdefault("EVOMERGE_CACHE", str(REPO / ".cache" / "evomerge"))

environment.configure(offline=True)


class OutboundConnection(AssertionError):
    pass


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS: not local


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    if not _is_local(address):
        raise OutboundConnection(f"test attempted an outbound connection to {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise OutboundConnection(f"test attempted an outbound connection to {address!r}")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_local((host,)):
        raise OutboundConnection(f"test attempted to resolve {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Every test runs with outbound sockets forbidden: loopback and unix sockets only."""
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo
    yield
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex
    socket.getaddrinfo = _real_getaddrinfo


@pytest.fixture(scope="session")
def zoo() -> Path:
    """The default zoo (170k-parameter models), built once and cached by its spec fingerprint; one
    builder at a time (the suite runs in several processes, and a build sweeps stale staging)."""
    import fcntl

    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.spec import PRESETS

    ZOO_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(ZOO_DIR.parent / f".{ZOO_DIR.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build_zoo(ZOO_DIR, PRESETS["default"])
    return ZOO_DIR
