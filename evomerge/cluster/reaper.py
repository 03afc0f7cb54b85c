"""Watchdog for a private local Ray: when the controller dies, end that Ray's remaining processes.

Ray ends its GCS and raylet with the driver that started them, but a SIGKILLed driver leaves the
raylet's agents (dashboard agent, runtime-env agent) running, re-parented to init. The pool starts
this watchdog beside its private Ray; once the controller's process is gone, it kills every process
that has the private Ray's temp directory in its command line or among its open files, and only
those (another Ray on the machine is never touched). On a normal shutdown the pool stops the
watchdog first.

    python -m evomerge.cluster.reaper CONTROLLER_PID RAY_TEMP_DIR
"""

from __future__ import annotations

import os
import signal
import sys
import time


def belongs(proc, ray_dir: str) -> bool:
    try:
        if any(ray_dir in part for part in proc.cmdline()):
            return True
        return any(f.path.startswith(ray_dir) for f in proc.open_files())
    except Exception:  # gone, or not ours to inspect
        return False


def reap(ray_dir: str, rounds: int = 10) -> list[int]:
    import psutil

    me, killed = os.getpid(), []
    for _ in range(rounds):
        found = [p for p in psutil.process_iter() if p.pid != me and belongs(p, ray_dir)]
        if not found:
            break
        for p in found:
            try:
                p.kill()
                killed.append(p.pid)
            except Exception:
                pass
        time.sleep(0.5)
    return killed


def main(argv: list[str]) -> int:
    import psutil

    controller, ray_dir = int(argv[0]), os.path.realpath(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the controller
    while True:
        try:
            if psutil.Process(controller).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(1.0)
    reap(ray_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
