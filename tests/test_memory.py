"""Memory policy of the resident merge: bytes counted by hand, cached = uncached = host = on disk bit
for bit with float32 task vectors, and how far bfloat16 task vectors move a merge."""

import pytest
import torch
from conftest import REPO
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import evomerge.merge.chunks as chunks
import evomerge.merge.stats as stats
from evomerge.merge.apply import ResidentMerge, compute_tensor
from evomerge.merge.memory import DEFAULT_CACHE_BYTES, MemoryPolicy
from evomerge.recipe import parse_recipe

EXPERTS = ("expert-add", "expert-rev", "expert-sort")
METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "breadcrumbs_ties",
    "dare_ties",
    "dare_linear",
    "della",
    "della_linear",
    "pcb",
    "consensus_ta",
    "consensus_ties",
    "darex",
]


@pytest.fixture(scope="module")
def states(zoo):
    return load_file(zoo / "base" / "model.safetensors"), {e: load_file(zoo / e / "model.safetensors") for e in EXPERTS}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks and blocks far smaller than the zoo's tensors and not multiples of their rows, so every
    chunked path (redrawn fields, rows ranked in blocks, mask bits) crosses boundaries."""
    monkeypatch.setattr(chunks, "CHUNK", 1000)
    monkeypatch.setattr(chunks, "BLOCK", 1504)


def resident(zoo, states, dtype=torch.float32, **policy) -> ResidentMerge:
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True, dtype=dtype).eval()
    base, experts = states
    return ResidentMerge(model, base, experts, memory=MemoryPolicy(**policy))


def recipe(method, seed=5, lines=None):
    per = {} if method in ("linear", "task_arithmetic", "consensus_ta") else {"density": 0.45}
    if method.startswith("della"):
        per["epsilon"] = 0.1
    if method.startswith("consensus"):
        per["tall_lambda"] = 0.5
    if method == "darex":
        per["q"] = 0.6
    models = [{"model": e, "parameters": {**per, "weight": 0.5 + 0.2 * i}} for i, e in enumerate(EXPERTS)]
    if method == "linear":
        models.insert(0, {"model": "base", "parameters": {"weight": 0.3}})
    data = {
        "merge_method": method,
        "base_model": "base",
        "models": models,
        "evomerge": {"seed": seed},
        "parameters": {"rescale": True} if method in ("ties", "breadcrumbs_ties") else {},
    }
    if lines:
        data["evomerge"]["lines"] = lines
    return parse_recipe(data)


def merged(r: ResidentMerge, rec) -> dict[str, torch.Tensor]:
    r.materialize(rec)
    result = r.materialize(rec)  # the second candidate reads whatever the first one cached
    assert result.ok
    return {k: v.detach().clone() for k, v in r.model.named_parameters()}


def cached(r: ResidentMerge) -> dict[str, int]:
    return {k: v for k, v in r.resident_bytes().items() if k in stats.CACHE_KINDS}


def test_policy_defaults_dtype_rule_and_validation():
    p = MemoryPolicy()
    assert (p.task_vector_dtype, p.cache, p.cache_bytes) == ("auto", "auto", None)
    assert (p.experts_on, p.base_on) == ("device", None)
    assert p.budget().limit == DEFAULT_CACHE_BYTES == 1 << 30
    assert MemoryPolicy(cache="none").budget() is None and MemoryPolicy(cache="all").budget().limit is None
    rule = p.task_vector_dtype_for
    assert rule({torch.bfloat16}, torch.float32) == torch.bfloat16  # 16-bit experts keep their dtype
    assert rule({torch.float32}, torch.bfloat16) == torch.bfloat16  # the model rounds merges to 16 bits anyway
    assert rule({torch.float32}, torch.float32) == torch.float32  # all float32: exact merges
    assert rule({torch.float16, torch.bfloat16}, torch.float32) == torch.bfloat16
    fixed = MemoryPolicy(task_vector_dtype="float16")
    assert fixed.task_vector_dtype_for({torch.float32}, torch.float32) == torch.float16
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert p.homes(cuda) == (cuda, cuda)
    assert MemoryPolicy(experts_on="host").homes(cuda) == (cpu, cpu)
    assert MemoryPolicy(experts_on="host", base_on="device").homes(cuda) == (cuda, cpu)
    assert MemoryPolicy(base_on="host").homes(cuda) == (cpu, cuda)
    with pytest.raises(ValidationError, match="cache_bytes applies to cache: auto"):
        MemoryPolicy(cache="all", cache_bytes=10)
    with pytest.raises(ValidationError):
        MemoryPolicy(experts_on="disk")


def test_resident_bytes_equal_hand_counts(zoo, states):
    r = resident(zoo, states, task_vector_dtype="bfloat16", cache="none")
    n = sum(p.numel() for p in r.model.parameters())
    held = r.resident_bytes()
    assert (held["model"], held["base"], held["task_vectors"]) == (4 * n, 4 * n, 2 * n * 3)  # bf16: 2 B/param/expert
    for method in ("ties", "dare_ties", "della"):
        r.materialize(recipe(method))
    assert cached(r) == dict.fromkeys(stats.CACHE_KINDS, 0)  # cache none keeps nothing

    r = resident(zoo, states, task_vector_dtype="float32", cache="all")  # what every merge kept before
    assert r.resident_bytes()["task_vectors"] == 4 * n * 3
    r.materialize(recipe("ties"))  # sorted magnitudes 4 B + their float64 prefix sums 8 B (rescale)
    assert cached(r) == {
        "sorted": 4 * n * 3,
        "cumsum": 8 * n * 3,
        "uniform": 0,
        "della_rank": 0,
        "drop_keys": 0,
        "pcb_balance": 0,
    }
    r.clear_cache()
    r.materialize(recipe("dare_ties"))  # uniform field 4 B (= DARE's key), sorted keys 4 B + prefix sums 8 B
    assert cached(r) == {
        "sorted": 0,
        "cumsum": 0,
        "uniform": 4 * n * 3,
        "della_rank": 0,
        "drop_keys": 12 * n * 3,
        "pcb_balance": 0,
    }
    r.materialize(recipe("della"))  # + ranks 4 B, and DELLA's own keys 4 B + sorted 4 B + prefix sums 8 B
    assert cached(r) == {
        "sorted": 0,
        "cumsum": 0,
        "uniform": 4 * n * 3,
        "della_rank": 4 * n * 3,
        "drop_keys": (12 + 16) * n * 3,
        "pcb_balance": 0,
    }
    assert r.budget.used == sum(cached(r).values())
    r.clear_cache()
    assert r.budget.used == 0 and sum(cached(r).values()) == 0
    # PCB: sorted magnitudes 4 B (its outlier clip), the balance 4 B + its sorted copy 4 B, per input set
    r.materialize(recipe("pcb"))
    assert cached(r) == dict.fromkeys(stats.CACHE_KINDS, 0) | {"sorted": 4 * n * 3, "pcb_balance": 8 * n * 3}
    two = parse_recipe(
        {
            "merge_method": "pcb",
            "base_model": "base",
            "models": [{"model": e, "parameters": {"density": 0.3}} for e in EXPERTS[:2]],
        }
    )
    r.materialize(two)  # another input set replaces its inputs' balances: one set per task vector at most
    assert cached(r)["pcb_balance"] == 8 * n * 3
    held = {id(s): [k for k in s.cache if k.startswith("pcb_balance@")] for row in r.stats.values() for s in row}
    assert all(len(keys) == 1 for keys in held.values())
    assert r.budget.used == sum(cached(r).values())


def test_pcb_balances_are_admitted_together_or_not_at_all(zoo, states):
    r = resident(zoo, states, cache="auto", cache_bytes=20 * sum(p.numel() for p in states[0].values()))
    n = sum(p.numel() for p in r.model.parameters())
    r.materialize(recipe("pcb"))  # 8 B x 3 experts fits beside the 12 B of sorted magnitudes, not all
    assert r.budget.used == sum(cached(r).values()) <= r.budget.limit
    rows = [row for row in r.stats.values()]
    for row in rows:  # per tensor: every expert's balance kept, or none
        assert len({bool(s.held("pcb_balance")) for s in row}) == 1
    assert 0 < cached(r)["pcb_balance"] < 8 * n * 3


def test_the_cache_budget_is_kept(zoo, states):
    r = resident(zoo, states, cache="auto", cache_bytes=300_000)
    for method in ("ties", "dare_ties", "della"):
        r.materialize(recipe(method))
    assert 0 < sum(cached(r).values()) == r.budget.used <= 300_000


@pytest.mark.parametrize("method", METHODS)
def test_cached_uncached_host_and_disk_agree_bit_for_bit(method, zoo, states, small_chunks):
    rec = recipe(method)
    reference = merged(resident(zoo, states, task_vector_dtype="float32", cache="all"), rec)
    for policy in (
        {"cache": "none"},
        {"cache": "auto", "cache_bytes": 200_000},
        {"cache": "none", "experts_on": "host"},
        {"cache": "all", "experts_on": "host"},
        {"cache": "none", "base_on": "host"},
    ):
        got = merged(resident(zoo, states, task_vector_dtype="float32", **policy), rec)
        assert all(torch.equal(got[k], reference[k]) for k in reference), policy
    # the on-disk path (tensors in, nothing kept) gives the same merge
    base, experts = states
    r = resident(zoo, states, task_vector_dtype="float32", cache="none")
    plan = r.plan(rec)
    for name in reference:
        inputs = [base[name] if m == "base" else experts[m][name] for m in plan.inputs]
        assert torch.equal(compute_tensor(plan, name, base[name], inputs=inputs), reference[name]), name


#: Relative L2 change of the merged task vector, bf16 task vectors against float32, on the zoo
#: (measured: 1.5e-3 for the linear ones, 1.7e-2 to 4.5e-2 where a mask or a sign election flips
#: for entries that bf16 rounding moves across a threshold or into a tie; 6.3e-2 for consensus_ties,
#: where TIES's trim and the TALL masks are two thresholds in a row, and 6.2e-2 for consensus_ta on
#: a zoo trained on another CPU kind: the zoo's weights, so which entries sit at a threshold, vary).
BF16_CHANGE = {
    "linear": 3e-3,
    "task_arithmetic": 3e-3,
    "dare_linear": 3e-3,
    "consensus_ta": 8e-2,
    "consensus_ties": 8e-2,
}


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_task_vectors_against_float32(method, zoo, states, small_chunks):
    rec = recipe(method)
    exact = merged(resident(zoo, states, task_vector_dtype="float32", cache="none"), rec)
    rounded = merged(resident(zoo, states, task_vector_dtype="bfloat16", cache="none"), rec)
    again = merged(resident(zoo, states, task_vector_dtype="bfloat16", cache="all"), rec)
    assert all(torch.equal(rounded[k], again[k]) for k in rounded)  # cached = uncached in bf16 too
    base = states[0]
    change = sum(float(((rounded[k] - exact[k]).double() ** 2).sum()) for k in exact)
    size = sum(float(((exact[k] - base[k]).double() ** 2).sum()) for k in exact)
    assert 0 < (change / size) ** 0.5 < BF16_CHANGE.get(method, 6e-2)


@pytest.mark.parametrize("lines", [None, {"alpha": 0.5, "beta": 1.0}])
def test_a_bfloat16_model_gets_the_float32_merge_rounded_once(lines, zoo, states):
    rec = recipe("ties", lines=lines)
    r = resident(zoo, states, dtype=torch.bfloat16, task_vector_dtype="float32")
    got = merged(r, rec)
    base, experts = states
    plan = r.plan(rec)
    for name, value in got.items():
        assert value.dtype == torch.bfloat16
        expected = compute_tensor(plan, name, base[name], inputs=[experts[m][name] for m in plan.inputs])
        assert torch.equal(value, expected.to(torch.bfloat16)), name
    auto = resident(zoo, states, dtype=torch.bfloat16)  # float32 experts, bf16 model: bf16 task vectors
    assert {s.delta.dtype for row in auto.stats.values() for s in row} == {torch.bfloat16}


def test_candidate_scorer_takes_the_policy_and_keeps_its_own_base(zoo):
    from evomerge.evaluate.candidate import CandidateScorer
    from evomerge.evaluate.config import parse_evaluator

    objective = {"name": "ppl", "perplexity": "zoo/data/general_{split}.txt", "unit": "line"}
    ev = parse_evaluator({"limit": 5, "objectives": [objective]}, REPO / "evaluators" / "inline.yaml")
    models = {"base": str(zoo / "base"), "expert-add": str(zoo / "expert-add"), "expert-sort": str(zoo / "expert-sort")}
    scorer = CandidateScorer(models, "base", ev, memory=MemoryPolicy(task_vector_dtype="bfloat16", cache="none"))
    n = sum(p.numel() for p in scorer.model.parameters())
    assert scorer.resident.resident_bytes()["task_vectors"] == 2 * n * 2
    before = {k: v.clone() for k, v in scorer.resident.base.items()}
    score = scorer.score(
        parse_recipe(
            {
                "merge_method": "dare_ties",
                "base_model": "base",
                "models": [
                    {"model": "expert-add", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": "expert-sort", "parameters": {"weight": 1.0, "density": 0.5}},
                ],
            }
        )
    )
    assert score.status == "done" and "device_peak_gib" not in score.timings  # CUDA only
    assert all(torch.equal(before[k], v) for k, v in scorer.resident.base.items())  # merges went to the model only


@pytest.fixture(scope="module")
def local_ray():
    """A private local Ray in this process (loopback, no dashboard), for the object store."""
    import ray

    from evomerge import environment

    environment.configure()
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def test_one_shared_copy_maps_zero_copy_and_merges_bit_for_bit(zoo, states, local_ray):
    """The store actor's shared base and task vectors: every worker's view maps the same memory,
    its merges equal a private worker's for every method, and candidates never write into it."""
    from dataclasses import asdict

    import ray

    from evomerge.cluster.store import SharedStoreActor
    from evomerge.merge.shared import Inputs, fetch, plan_bytes

    models = {"base": str(zoo / "base"), **{e: str(zoo / e) for e in EXPERTS}}
    policy = MemoryPolicy(task_vector_dtype="bfloat16", cache="none")
    inputs = Inputs(models, "base", None, policy.model_dump())
    store = SharedStoreActor.options(num_cpus=0).remote()
    n = sum(t.numel() for t in resident(zoo, states).params.values())
    assert ray.get(store.publish.remote(asdict(inputs))) == len(resident(zoo, states).params)
    published = ray.cloudpickle.loads(ray.get(store.refs.remote()))
    one, two = fetch(published), fetch(published)
    # float32 base once + 3 bfloat16 task vectors, as planned from the headers alone
    assert one.nbytes == n * (4 + 3 * 2)
    assert plan_bytes(inputs) == {"base": 4 * n, "experts": 3 * 2 * n}
    name = "model.layers.0.mlp.down_proj.weight"
    assert one.base[name].data_ptr() == two.base[name].data_ptr()  # the same pages, not copies
    assert one.deltas["expert-add"][name].dtype == torch.bfloat16

    model = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True).eval()
    shared = ResidentMerge(model, states[0], states[1], memory=policy, shared=one)
    private = resident(zoo, states, task_vector_dtype="bfloat16", cache="none")
    assert shared.shared_tensors == len(shared.params) and private.shared_tensors == 0
    counts = shared.resident_bytes()
    assert counts["task_vectors"] == 3 * 2 * n and counts["base"] == 4 * n  # the views, not copies
    before = (
        {k: v.clone() for k, v in two.base.items()},
        {e: {k: v.clone() for k, v in d.items()} for e, d in two.deltas.items()},
    )
    for method in METHODS:
        a, b = merged(shared, recipe(method)), merged(private, recipe(method))
        assert all(torch.equal(a[k], b[k]) for k in a), method
    assert all(torch.equal(before[0][k], v) for k, v in two.base.items())
    assert all(torch.equal(before[1][e][k], v) for e, d in two.deltas.items() for k, v in d.items())

    # a worker whose model dtype is not the one published against computes privately, same result
    bf16 = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True, dtype=torch.bfloat16).eval()
    params = dict(bf16.named_parameters())
    mixed = ResidentMerge(bf16, {k: p.detach() for k, p in params.items()}, states[1], memory=policy, shared=one)
    assert mixed.shared_tensors == 0
    other = AutoModelForCausalLM.from_pretrained(zoo / "base", use_safetensors=True, dtype=torch.bfloat16).eval()
    alone = ResidentMerge(other, {k: p.detach() for k, p in other.named_parameters()}, states[1], memory=policy)
    a, b = merged(mixed, recipe("dare_ties")), merged(alone, recipe("dare_ties"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_gpu_that_cannot_hold_the_models_is_refused_with_the_sizes():
    from evomerge.merge.memory import fit_device

    gib = 2**30
    sizes = {"base": 15 * gib, "experts": 45 * gib}  # an 8B-class bf16 base, 3 experts
    policy = MemoryPolicy()
    assert fit_device(policy, sizes, 80 * gib, "cuda:0") is policy  # 15 + 15 + 45 + 4 reserve = 79
    moved = fit_device(policy, sizes, 70 * gib, "cuda:0")  # the base goes to the host: 64 GiB
    assert (moved.base_on, moved.experts_on) == ("host", "device")
    with pytest.raises(ValueError) as e:
        fit_device(policy, sizes, 60 * gib, "cuda:0")
    assert str(e.value) == (
        "the models do not fit cuda:0: model 15.0 GiB, base 15.0 GiB, experts' task vectors 45.0 GiB, "
        "reserve for activations 4.0 GiB, 79.0 GiB in all; 60.0 GiB of it is free "
        "(workers.memory.experts_on: host keeps the task vectors in host memory)"
    )
    with pytest.raises(ValueError, match="base 15.0 GiB, .* 79.0 GiB in all; 70.0 GiB"):  # asked for: kept
        fit_device(MemoryPolicy(base_on="device"), sizes, 70 * gib, "cuda:0")
    assert fit_device(MemoryPolicy(experts_on="host", reserve_bytes=0), sizes, 15 * gib, "cuda:0").base_on is None
    with pytest.raises(ValueError, match=r"^the models do not fit cuda:1: model 15.0 GiB, reserve for activations 4.0"):
        fit_device(MemoryPolicy(experts_on="host"), sizes, 18 * gib, "cuda:1")


def test_more_early_askers_than_the_stores_threads_are_all_answered_once_it_publishes(zoo, local_ray):
    """Workers (restarted ones too) may ask for the refs before the controller's publish arrives, more
    of them than the store has threads: publish has a thread of its own, so every asker is answered."""
    from dataclasses import asdict

    import ray

    from evomerge.cluster.store import SharedStoreActor
    from evomerge.merge.shared import Inputs

    models = {"base": str(zoo / "base"), **{e: str(zoo / e) for e in EXPERTS}}
    store = SharedStoreActor.options(num_cpus=0, max_concurrency=1).remote()
    asked = [store.refs.remote() for _ in range(3)]  # one thread: the first waits, two queue behind it
    # were publish queued behind the waiting askers, it would never run: this get would time out
    count = ray.get(store.publish.remote(asdict(Inputs(models, "base", None, {}))), timeout=120)
    answers = [ray.cloudpickle.loads(a) for a in ray.get(asked, timeout=120)]
    assert len(answers) == 3 and all(len(a["refs"]) == count and a["experts"] == list(EXPERTS) for a in answers)
