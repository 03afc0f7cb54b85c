"""What a merge worker keeps in memory: the ``MemoryPolicy``, and the byte budget of cached statistics.

A worker holds its model, the base once (in the base's own dtype) and one task vector per expert.
Task vectors are stored 16-bit by default (2 B/param/expert). Per-element statistics that make a
candidate cheaper are optional accelerations, kept only within the policy's budget; without them the
merge recomputes what it needs per candidate, with identical results. Their sizes, per parameter and
expert: sorted magnitudes 4 B, their float64 prefix sums 8 B (TIES/breadcrumbs with rescale), the
seeded uniform field 4 B (DARE/DELLA), DELLA's row ranks 4 B, and per drop key: the keys 4 B (DELLA;
DARE's key is the uniform field itself), sorted 4 B, with float64 prefix sums 8 B.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: ``cache: auto`` without ``cache_bytes``, on any device: small models keep the cached speed (every
#: statistic of a TIES search up to ~90M params x 3 experts, of a DARE search up to ~20M: the zoo,
#: tests); large ones hold at most this on top of their 2 B/param/expert.
DEFAULT_CACHE_BYTES = 1 << 30
#: GPU memory a worker leaves free for the evaluation's activations when it checks that the models fit.
DEFAULT_RESERVE_BYTES = 4 << 30

if TYPE_CHECKING:  # torch is imported where tensors are handled: experiment files load without it
    import torch


class MemoryPolicy(BaseModel):
    """How a worker stores the base, the experts' task vectors and cached statistics.

    ``task_vector_dtype``: auto = the experts' dtype when it is 16-bit; else the model's dtype when
    that is 16-bit (its merged weights are rounded to 16 bits anyway); else float32 (all-float32
    inputs and model get exact float32 merges). ``cache``: auto = keep per-element statistics while
    their total stays within ``cache_bytes`` bytes (default ``DEFAULT_CACHE_BYTES``, any device); none =
    never; all = always (fastest; 4-40 B/param/expert depending on the method). ``experts_on``: where
    the task vectors live; host = CPU memory (pinned when CUDA is present), streamed to the device
    tensor by tensor. ``base_on``: where the base lives (default: with the experts, or on the host when
    it does not fit the GPU beside them and ``reserve_bytes`` for activations). ``share``: the
    workers of a campaign on one machine map one copy of the base and task vectors from Ray's
    object store (``evomerge.merge.shared``) instead of each holding its own; host copies that are
    shared are not pinned.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_vector_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    cache: Literal["auto", "none", "all"] = "auto"
    cache_bytes: int | None = Field(default=None, ge=0)
    experts_on: Literal["device", "host"] = "device"
    base_on: Literal["device", "host"] | None = None
    share: bool = True
    reserve_bytes: int = Field(default=DEFAULT_RESERVE_BYTES, ge=0)

    @model_validator(mode="after")
    def _budget_is_for_auto(self) -> MemoryPolicy:
        if self.cache_bytes is not None and self.cache != "auto":
            raise ValueError(f"cache_bytes applies to cache: auto, not cache: {self.cache}")
        return self

    def task_vector_dtype_name(self, expert_dtypes: set[str], model_dtype: str | None) -> str:
        """The dtype one tensor's task vectors are stored in, given the experts' dtypes for it and the
        model's (torch's names: ``bfloat16``, ``float32``...; torch-free, for the checks before a
        campaign too)."""
        if self.task_vector_dtype != "auto":
            return self.task_vector_dtype
        sixteen_bit = {"bfloat16", "float16"}
        if len(expert_dtypes) == 1 and next(iter(expert_dtypes)) in sixteen_bit:
            return next(iter(expert_dtypes))
        if model_dtype in sixteen_bit:
            return model_dtype
        return "bfloat16" if expert_dtypes <= sixteen_bit else "float32"

    def task_vector_dtype_for(self, expert_dtypes: set[torch.dtype], model_dtype: torch.dtype) -> torch.dtype:
        """``task_vector_dtype_name`` for torch dtypes."""
        import torch

        name = lambda dtype: str(dtype).removeprefix("torch.")
        return getattr(torch, self.task_vector_dtype_name({name(d) for d in expert_dtypes}, name(model_dtype)))

    def budget(self) -> CacheBudget | None:
        """The cache budget of one worker; None keeps nothing."""
        if self.cache == "none":
            return None
        if self.cache == "all":
            return CacheBudget(None)
        return CacheBudget(DEFAULT_CACHE_BYTES if self.cache_bytes is None else self.cache_bytes)

    def homes(self, device: torch.device) -> tuple[torch.device, torch.device]:
        """(where the base lives, where the task vectors live) for a merge on ``device``."""
        import torch

        experts = device if self.experts_on == "device" else torch.device("cpu")
        base = experts if self.base_on is None else (device if self.base_on == "device" else torch.device("cpu"))
        return base, experts


class CacheBudget:
    """Bytes of cached per-element statistics held against ``limit`` (None: no limit)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.used = 0

    def admit(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit; False (nothing reserved) if not."""
        if self.limit is not None and self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


def place(t: torch.Tensor, device: torch.device, pin: bool = True) -> torch.Tensor:
    """``t`` on ``device``, copied only when it moves; host tensors are pinned (``pin``) when CUDA is
    present, so that their copies to the GPU run asynchronously."""
    import torch

    if not pin or device.type != "cpu" or not torch.cuda.is_available() or t.is_pinned():
        return t.to(device)
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return pinned.copy_(t)


def fit_device(policy: MemoryPolicy, sizes: dict[str, int], free: int, device: str) -> MemoryPolicy:
    """The policy a worker on a GPU uses, given its ``free`` bytes; raises ValueError (one line naming
    the sizes) when the models do not fit. Held there: the model (``sizes['base']``: the base in the
    model's dtype is the model's size), the base and the experts' task vectors where the policy puts
    them, plus ``reserve_bytes`` for the evaluation's activations. With ``base_on`` unset and the
    experts on the device, a base that does not fit beside them is kept on the host instead (it is
    streamed into each candidate's merge: one host-to-device copy of the model per candidate)."""
    import torch

    def parts(p: MemoryPolicy) -> dict[str, int]:
        base_home, expert_home = p.homes(torch.device(device))
        held = {"model": sizes["base"]}
        if base_home.type != "cpu":
            held["base"] = sizes["base"]
        if expert_home.type != "cpu":
            held["experts' task vectors"] = sizes["experts"]
        held["reserve for activations"] = p.reserve_bytes
        return held

    if sum(parts(policy).values()) <= free:
        return policy
    if policy.base_on is None and policy.experts_on == "device":
        moved = policy.model_copy(update={"base_on": "host"})
        if sum(parts(moved).values()) <= free:
            return moved
    held = parts(policy)
    gib = lambda v: f"{v / 2**30:.1f} GiB"
    hint = (
        " (workers.memory.experts_on: host keeps the task vectors in host memory)"
        if policy.experts_on == "device"
        else ""
    )
    raise ValueError(
        f"the models do not fit {device}: {', '.join(f'{k} {gib(v)}' for k, v in held.items())}, "
        f"{gib(sum(held.values()))} in all; {gib(free)} of it is free{hint}"
    )


def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc keeps them after a load's temporaries are
    freed); nothing where the C library is not glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
