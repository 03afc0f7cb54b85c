"""PCB-Merging: parameter competition balancing, with its balance cached beside the task vectors.

The balance of each task vector depends on the inputs alone, not on a candidate's densities and
weights: where the memory budget admits it (8 B/element per input: the balance and its sorted
copy) it is computed once and a candidate's thresholds are lookups; otherwise nothing per element is
kept, the thresholds come from two histogram passes over the balance, recomputed a block at a time,
and give the same merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from evomerge.merge.registry import Param, merge_method

#: Fraction of each task vector's magnitudes clipped at either end before PCB's balancing (the
#: reference implementation's outlier clip).
PCB_CLIP = 1e-4


@merge_method(
    "pcb",
    (
        Param("weight", per_model=True, default=1.0),
        Param("density", per_model=True, default=0.1, low=0.0, high=1.0),
        Param("lambda", per_model=False, default=1.0),
    ),
    'Du et al., "Parameter Competition Balancing for Model Merging" (PCB-Merging), NeurIPS 2024, arXiv:2410.02396',
    min_models=2,
    in_mergekit=False,
)
def pcb(method, base, stats, shared, per_model):
    """PCB-Merging: balance each entry of each task vector by its own magnitude (intra) and its
    agreement with the others (inter), keep each task vector's top ``density`` fraction by balance,
    and merge as the balance-weighted mean, scaled by lambda.

    For input i with task vector d_i (n inputs, one tensor of N entries):
      a_i = clip(|d_i|, lo_i, hi_i), lo_i/hi_i its magnitudes' 1e-4 and 1 - 1e-4 quantiles;
      beta_i = exp(n * ((a_i - lo_i) / (hi_i - lo_i))^2) * tanh(d_i * sum_j d_j);
      t_i = beta_i's value at ascending rank floor(N * (1 - density_i)), T_i = max beta_i;
      s_i = (clip(beta_i, t_i, T_i) - t_i) / (T_i - t_i)  (entries below t_i get 0: dropped);
      merged = base + lambda * sum_i w_i s_i sign(d_i) a_i / max(sum_i s_i, 1e-12).
    Choices the paper leaves open, taken from its reference implementation: the per-model
    normalization of the intra term (its softmax's denominator cancels in the min-max step), tanh
    for the inter term, the 1e-4 outlier clip. Ours: statistics per tensor (the reference flattens
    the whole model), a per-model weight w_i (1 in the paper) in the numerator, a degenerate range
    (hi_i == lo_i: intra term 1; T_i == t_i or density 0: the input is left out of this tensor)
    instead of NaN.

    Reference: Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
    arXiv:2410.02396.
    """
    from evomerge.merge.kernel import Chunks  # here, not at import: the declaration is read without torch

    n, dev = base.numel(), base.device
    if n == 0:
        return Chunks(lambda a, b: None)  # no chunk to mix
    bounds = [_clip_bounds(s, n) for s in stats]
    scores = partial(_balance, stats, bounds, dev)
    # ascending rank floor(N (1 - density)) is the (N - rank)-th largest; density 0 keeps nothing
    ranks = [int(n * (1 - float(p["density"]))) for p in per_model]
    cached = _cached_balances(stats, scores, n, dev)
    if cached:
        cuts = [float(k[1][r]) if r < n else None for k, r in zip(cached, ranks)]
        tops = [float(k[1][-1]) for k in cached]
    else:
        ks = [min(n, n - r) if r < n else 1 for r in ranks]
        cuts, tops = _kth_largest_values(lambda a, b: scores(a, b)[0], n, ks, dev)
        cuts = [c if r < n else None for c, r in zip(cuts, ranks)]
    kept = [(i, t, top) for i, (t, top) in enumerate(zip(cuts, tops)) if t is not None and top > t]
    weights, lam = [float(p["weight"]) for p in per_model], float(shared["lambda"])
    return Chunks(partial(_mix, stats, scores, cached, bounds, weights, kept, lam, dev))


def _mix(stats, scores, cached, bounds, weights, kept, lam: float, dev, a: int, b: int):
    """The balance-weighted mean of the kept entries on flat range [a, b), scaled by lambda."""
    import torch

    from evomerge.merge.chunks import scratch

    L = b - a
    if cached:
        ds = [s.chunk(a, b, scratch(f"pcbd{i}", L, dev)) for i, s in enumerate(stats)]
        balances = [scratch(f"pcbs{i}", L, dev).copy_(k[0][a:b], non_blocking=True) for i, k in enumerate(cached)]
    else:
        balances, ds = scores(a, b)
    acc, den, part = scratch("acc", L, dev).zero_(), scratch("den", L, dev).zero_(), scratch("tmp", L, dev)
    for i, t, top in kept:
        (lo, hi), d, score = bounds[i], ds[i], balances[i]
        score.clamp_(t, top).sub_(t).mul_(1.0 / (top - t))
        den.add_(score)
        sign = torch.sign(d, out=scratch("sign", L, dev))
        torch.abs(d, out=part).clamp_(lo, hi).mul_(sign).mul_(score)  # sign(d) clip(|d|, lo, hi)
        acc.add_(part, alpha=weights[i])
    mixed = acc.div_(den.clamp_(min=1e-12))
    return mixed.mul_(lam) if lam != 1 else mixed


def _clip_bounds(s, n: int) -> tuple[float, float]:
    """The outlier clip (lo, hi) of one task vector: it depends on the task vector alone, computed once."""
    if "pcb_clip" not in s.scalars:
        low_rank, high_rank = int(n * PCB_CLIP), int(n * (1 - PCB_CLIP)) - 1
        high_rank += n if high_rank < 0 else 0
        s.scalars["pcb_clip"] = (s.kth_largest(n - low_rank), s.kth_largest(n - high_rank))
    return s.scalars["pcb_clip"]


def _balance(stats, bounds, dev, a: int, b: int):
    """(every input's balance on flat range [a, b), every input's delta there as float32)."""
    from evomerge.merge.chunks import scratch

    L, n_models = b - a, len(stats)
    ds = [s.chunk(a, b, scratch(f"pcbd{i}", L, dev)) for i, s in enumerate(stats)]
    total = scratch("pcbsum", L, dev).zero_()
    for d in ds:
        total.add_(d)
    tmp = scratch("pcbtmp", L, dev)
    outs = [scratch(f"pcbs{i}", L, dev) for i in range(n_models)]
    return [_pcb_score(d, total, lo, hi, n_models, o, tmp) for d, (lo, hi), o in zip(ds, bounds, outs)], ds


def _cached_balances(stats, scores, n: int, dev) -> list:
    """Every input's (balance, balance sorted ascending), cached with its task vector, computed now
    in one pass for those missing if the budget admits them all; [] when it does not (nothing kept).
    The input set is named by the inputs' cache dicts: one per resident task vector, for its life;
    one set is kept per task vector."""
    import torch

    from evomerge.merge.chunks import block_for, blocks

    budget = stats[0].budget
    if budget is None or any(s.budget is not budget for s in stats):
        return []
    inputs = ",".join(str(id(s.cache)) for s in stats)
    cached = [s.hit(f"pcb_balance@{inputs}") for s in stats]
    missing = [i for i, c in enumerate(cached) if c is None]
    for i in missing:
        stats[i].forget("pcb_balance")  # another input set's: one set per task vector
    if not missing:
        return cached
    if not budget.admit(8 * n * len(missing)):
        return []
    budget.release(8 * n * len(missing))  # each entry reserves its own bytes below
    wholes = {i: torch.empty(n, dtype=torch.float32, device=dev) for i in missing}
    for a, b in blocks(n, block_for(dev)):  # every missing balance in one pass
        balances = scores(a, b)[0]
        for i in missing:
            wholes[i][a:b] = balances[i]
    for i in missing:
        cached[i] = stats[i].kept(f"pcb_balance@{inputs}", 8 * n, partial(_with_sorted, wholes.pop(i)))
    return cached


def _with_sorted(balance):
    """(balance, the same sorted ascending); numpy's sort is much faster than torch's on CPU."""
    import torch

    if balance.device.type == "cpu":
        import numpy as np

        return balance, torch.from_numpy(np.sort(balance.numpy()))
    return balance, torch.sort(balance).values


def _order_keys(v):
    """float32 -> int32 keys ordered as the floats (negatives' magnitude bits flipped); an involution."""
    import torch

    bits = v.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _kth_largest_values(
    block_values: Callable[[int, int], list], n: int, ks: list[int], device
) -> tuple[list[float], list[float]]:
    """For m float32 fields of n entries that ``block_values(a, b)`` computes block by block (a list
    of m tensors for [a, b)): (each field's ks[i]-th largest value, signed and exact, 1 <= ks[i] <= n;
    each field's maximum). Two passes of bincounts of order-preserving keys, high then low 16 bits:
    nothing of size n is held."""
    import torch

    from evomerge.merge.chunks import block_for, blocks
    from evomerge.merge.stats import from_top

    m, size = len(ks), block_for(device)
    counts = torch.zeros(m, 1 << 16, dtype=torch.int64, device=device)
    maxima = [-math.inf] * m
    for a, b in blocks(n, size):
        for i, v in enumerate(block_values(a, b)):
            counts[i] += torch.bincount(((_order_keys(v) >> 16) + 32768).long(), minlength=1 << 16)
            maxima[i] = max(maxima[i], float(v.max()))
    found = [from_top(counts[i], k) for i, k in enumerate(ks)]
    low = torch.zeros(m, (1 << 16) + 1, dtype=torch.int64, device=device)
    for a, b in blocks(n, size):
        for i, v in enumerate(block_values(a, b)):
            key = _order_keys(v)
            inside = ((key >> 16) + 32768) == found[i][0]
            low[i] += torch.bincount(torch.where(inside, key & 0xFFFF, 1 << 16).long(), minlength=(1 << 16) + 1)
    values = []
    for i, (high, rank) in enumerate(found):
        lo_bits = from_top(low[i, : 1 << 16], rank)[0]
        key = torch.tensor([((high - 32768) << 16) | lo_bits], dtype=torch.int64).to(torch.int32)
        values.append(float(_order_keys(key).view(torch.float32)))
    return values, maxima


def _pcb_score(d, total, lo: float, hi: float, n: int, out, tmp):
    """PCB's balance of one task vector on a chunk, in ``out``: intra-balancing exp(n * norm(|d|)^2)
    (|d| clipped to [lo, hi] and min-max normalized; 0 when lo == hi) times inter-balancing
    tanh(d * sum_j d_j). ``tmp``: scratch of the chunk's size."""
    import torch

    torch.abs(d, out=out).clamp_(lo, hi)
    if hi > lo:
        out.sub_(lo).mul_(1.0 / (hi - lo)).square_().mul_(n).exp_()
    else:
        out.fill_(1.0)
    return out.mul_(torch.mul(d, total, out=tmp).tanh_())
