"""The owner of a node's shared copy of the base and task vectors (``evomerge.merge.shared``).

``SharedStore`` is a Ray actor that imports nothing heavy. It calls a one-off generator task (its
process exits after) that reads the models one tensor at a time and yields the objects; a task's
results belong to its caller, so the objects live as long as the store does, while the store's own
process stays small. Workers ask the store for the refs (``refs``, pickled); the controller only
holds the store's handle, so it owns no object and never talks to the object store (Ray terminates
a process whose object store connection breaks, and the controller must outlive a dead node to stop
the campaign cleanly), and the workers' constructor arguments stay small.
"""

from __future__ import annotations

import ray


class SharedStore:
    """A threaded actor: ``publish`` runs in a concurrency group of its own ("publish", one thread),
    each ``refs`` waits for it in a thread of the default group (``max_concurrency``: the workers),
    since Ray does not order calls from different callers (a worker that starts quickly, or a store
    that starts slowly, would otherwise ask before the controller's ``publish`` arrived), and however
    many callers wait (restarted workers included), ``publish`` still has its thread."""

    def __init__(self):
        import threading

        self.published = None
        self._settled = threading.Event()  # publish ended, well or not

    @ray.method(concurrency_group="publish")
    def publish(self, inputs: dict) -> int:
        """Make the shared copy of ``evomerge.merge.shared.Inputs(**inputs)``; returns its number of
        tensors. Raises RuntimeError with the reason when the models cannot be read."""
        try:
            task = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(_produce)
            stream = task.remote(inputs)
            refs = list(stream)
            ray.get(stream.completed())  # raises if the task's process died
            status, detail, *held = ray.get(refs[-1])  # small: returned inline
            if status != "ok":
                raise RuntimeError(detail)
            if len(detail) != len(refs) - 1:
                raise RuntimeError(f"the shared copy holds {len(refs) - 1} tensors, the model has {len(detail)}")
            self.published = {"experts": held[0], "refs": dict(zip(detail, refs))}  # LoRA experts: none
            return len(detail)
        finally:
            self._settled.set()

    def refs(self) -> bytes:
        """The published refs, pickled (``evomerge.merge.shared.fetch`` takes them unpickled), once
        ``publish`` has ended, however early the call comes."""
        self._settled.wait()
        if self.published is None:
            raise RuntimeError("the shared copy could not be made (see the pool's error)")
        return ray.cloudpickle.dumps(self.published)


def _produce(inputs: dict):
    from evomerge.merge.shared import produce_stream

    yield from produce_stream(inputs)


#: The store as Ray runs it (``.options(...)`` adds the name, CPUs and ``max_concurrency``).
SharedStoreActor = ray.remote(concurrency_groups={"publish": 1})(SharedStore)
