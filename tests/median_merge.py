"""A merge method of the tests' own, registered from this module alone: the entry-wise median of
the inputs' task vectors (the lower one for an even count), scaled by lambda and added to the base."""

from evomerge.merge.registry import Param, merge_method


@merge_method(
    "median_tv",
    (Param("lambda", per_model=False, default=1.0, low=0.0),),
    "the tests' own",
    min_models=2,
    in_mergekit=False,
)
def median_tv(method, base, stats, shared, per_model):
    import torch

    from evomerge.merge.kernel import Chunks

    lam = float(shared["lambda"])

    def mix(a: int, b: int) -> torch.Tensor:
        deltas = torch.stack([s.delta.reshape(-1)[a:b].float() for s in stats])
        return deltas.median(dim=0).values.mul_(lam)

    return Chunks(mix)
