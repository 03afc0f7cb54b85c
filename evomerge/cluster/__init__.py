#: Resources Ray defines itself (set by cpus/gpus per worker and the nodes), not custom node labels.
RAY_STANDARD_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
