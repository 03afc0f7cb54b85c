"""The built-in merge methods, one family per module; each registers itself with
``evomerge.merge.registry`` when the registry is first imported. A module here imports torch only
inside its kernels: the search side reads the declarations without torch."""
