"""One job on a thread of its own, started early so that it overlaps the caller's own work (the
parameter names read while Ray starts, MLflow's start while the workers load)."""

from __future__ import annotations

import threading


class Background:
    """``fn()`` on a thread of its own from ``start()``; ``result()`` (starting it if need be) waits for
    it and returns its value or raises what it raised; ``wait()`` only waits for a started one (for a
    clean-up that must not race it)."""

    def __init__(self, fn, name: str):
        self._box: dict = {}

        def target():
            try:
                self._box["value"] = fn()
            except BaseException as e:  # handed to whoever asks for the result
                self._box["error"] = e

        self._thread = threading.Thread(target=target, name=name, daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def wait(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()

    def result(self):
        self.start()
        self.wait()
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]
