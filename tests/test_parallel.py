"""Expert parallelism (tutorial_moe.parallel) against the single-process MoELayer.

The distributed tests fork 2 and 4 CPU ranks on 127.0.0.1 with gloo. Each rank builds the same
single-process oracle (``MoELayer(dispatch="dense")``, every expert on every token) from the same
seed, takes its shard with ``from_moe_layer`` and compares outputs and gradients of
``sum(out * upstream)`` with the oracle's on the full batch. Every collective has a short
timeout (init_process_group(timeout=...)) and every launch an overall one (run_ranks), so a
bug fails in seconds instead of hanging; no rank outlives its launch.
"""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from tutorial_moe import MoELayer, TopKRouter
from tutorial_moe.parallel import (
    CollectiveTap,
    CommCounter,
    ExpertParallelMoELayer,
    all_to_all_bytes,
    default_backend,
    equivalence_report,
    expert_shard,
    init_distributed,
    overlap_model,
    run_ranks,
)

COLLECTIVE_TIMEOUT_S = 20.0  # per collective; a healthy one here takes milliseconds
LAUNCH_TIMEOUT_S = 60.0  # per launch of all ranks; the whole healthy launch takes a few seconds
TOL = 1e-5

# name: (layer kwargs, tokens per rank for 2 ranks, for 4 ranks)
SCENARIOS = {
    "top2_uneven": (dict(d_model=8, d_hidden=16, num_experts=8, k=2), [5, 9], [5, 0, 7, 3]),
    "swiglu_top1": (dict(d_model=8, d_hidden=12, num_experts=4, k=1, expert="swiglu"), [6, 6], [4, 4, 4, 4]),
    "capacity": (dict(d_model=8, d_hidden=16, num_experts=4, k=2, capacity_factor=0.5), [12, 10], [12, 10, 8, 9]),
    "few_tokens": (dict(d_model=8, d_hidden=16, num_experts=8, k=1), [2, 1], [1, 2, 1, 1]),
}


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def _max_abs(a, b):
    return float((a - b).abs().max()) if a.numel() else 0.0


def _compare(layer: MoELayer, x_full, splits, ep: ExpertParallelMoELayer, rank, average=False):
    """Max |difference| (this rank) of outputs and gradients between ``ep`` and the oracle ``layer``.

    ``average``: the ranks' gradients are reduced as for the mean of their losses (DDP's
    convention), so the weights' gradients must be the oracle's divided by the world size.
    """
    upstream = torch.randn(x_full.shape, generator=torch.Generator().manual_seed(7))
    capacity = layer.router.capacity_factor is not None
    x_ref = x_full.clone().requires_grad_(True)
    # With a capacity factor each rank's batch is its own capacity group, so the oracle runs per rank.
    out_ref = torch.cat([layer(part) for part in x_ref.split(splits)]) if capacity else layer(x_ref)
    (out_ref * upstream).sum().backward()

    start = sum(splits[:rank])
    mine = slice(start, start + splits[rank])
    x = x_full[mine].clone().requires_grad_(True)
    out = ep(x)
    (out * upstream[mine]).sum().backward()
    ep.reduce_gradients(average=average)  # each rank's router saw only its tokens: sum them
    first, stop = ep.expert_ids.start, ep.expert_ids.stop
    scale = 1 / ep.world_size if average else 1.0
    return {
        "output": _max_abs(out.detach(), out_ref.detach()[mine]),
        "input_grad": _max_abs(x.grad, x_ref.grad[mine]),
        "expert_grad": max(_max_abs(_grad(p), scale * _grad(getattr(layer.experts, n))[first:stop])
                           for n, p in ep.experts.named_parameters()),
        "router_grad": max(_max_abs(_grad(p), scale * _grad(q))
                           for p, q in zip(ep.router.parameters(), layer.router.parameters())),
        "splits": dict(ep.last_splits),
        "dropped_pairs": ep.k * splits[rank] - int(ep.last_routing.mask.sum()),
    }


def _skewed(rank, world):
    """Every rank's tokens go to one expert of the last rank: ranks 0..W-2 receive nothing at all."""
    torch.manual_seed(3)
    E, d = 2 * world, 8
    layer = MoELayer(d, 16, E, 1, dispatch="dense", losses={})
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        for j in range(2):
            layer.router.gate.weight[E - 2 + j, j] = 5.0
    splits = [3 + r for r in range(world)]
    x = torch.randn(sum(splits), d) * 0.1
    x[:, 0] += torch.arange(sum(splits)) % 2 == 0  # even tokens to expert E-2, odd ones to E-1
    x[:, 1] += torch.arange(sum(splits)) % 2 == 1
    ep = ExpertParallelMoELayer.from_moe_layer(layer)
    return _compare(layer, x, splits, ep, rank)


def _worker(scenario_names, collective="c10d"):
    rank, world, _ = init_distributed("gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
    try:
        out = {}
        for name in scenario_names:
            kwargs, split2, split4 = SCENARIOS[name]
            splits = split2 if world == 2 else split4
            torch.manual_seed(len(name))  # the same seed on every rank: the same oracle and batch
            layer = MoELayer(**kwargs, dispatch="dense", losses={})
            x_full = torch.randn(sum(splits), kwargs["d_model"])
            out[name] = _compare(layer, x_full, splits, ExpertParallelMoELayer.from_moe_layer(layer, collective=collective),
                                 rank)
        out["skewed"] = _skewed(rank, world)
        kwargs, split2, split4 = SCENARIOS["top2_uneven"]
        torch.manual_seed(1)
        layer = MoELayer(**kwargs, dispatch="dense", losses={})
        splits = split2 if world == 2 else split4
        x_full = torch.randn(sum(splits), kwargs["d_model"])
        out["mean_loss"] = _compare(layer, x_full, splits, ExpertParallelMoELayer.from_moe_layer(layer), rank,
                                    average=True)

        # Auxiliary losses come from the local routing, as MoELayer's on this rank's tokens.
        torch.manual_seed(11)
        layer = MoELayer(8, 16, 2 * world, 2, dispatch="dense", losses={"switch": 0.01, "z": 0.001})
        x_local = torch.randn(world * 6, 8)[rank * 6:(rank + 1) * 6]
        ep = ExpertParallelMoELayer.from_moe_layer(layer)
        ep(x_local), layer(x_local)
        out["aux_diff"] = abs(float((ep.aux_loss - layer.aux_loss).detach()))

        # Bytes: counted from the splits of a forward+backward, summed over ranks.
        ep.comm.reset()
        xg = x_local.clone().requires_grad_(True)
        with CollectiveTap() as tap:
            ep(xg).sum().backward()
        out["comm"] = ep.comm.all_reduce()
        out["tap"] = tap.as_dict()
        out["tap_restored"] = dist.all_to_all_single is tap._original
        out["tokens_total"] = world * 6

        # The package's own report (used by the book) agrees with this file's oracle.
        torch.manual_seed(5)
        layer = MoELayer(8, 16, 2 * world, 2, dispatch="dense", losses={})
        out["report"] = equivalence_report(layer, torch.randn(world * 4, 8), [4] * world)

        # Auxiliary-loss-free bias: ranks see different tokens, but each update sums the load over
        # the group, so the replicated biases stay identical. "local" replays the old per-rank
        # rule (each rank from its own counts) to show that the case would catch a drift.
        torch.manual_seed(21)
        layer = MoELayer(8, 16, 2 * world, 1, router=TopKRouter(8, 2 * world, 1, bias_update_rate=0.05),
                         dispatch="dense", losses={})
        ep = ExpertParallelMoELayer.from_moe_layer(layer)
        local_bias = torch.zeros(2 * world)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(5):
            xr = torch.randn(5 + 3 * rank, 8, generator=g) + 0.5 * rank
            ep(xr).sum().backward()
            local = ep.router.expert_load.clone()
            local_bias += 0.05 * torch.sign(local.mean() - local)
            ep.router.update_expert_bias()
        gathered = [torch.empty_like(ep.router.expert_bias) for _ in range(world)]
        dist.all_gather(gathered, ep.router.expert_bias)
        gathered_local = [torch.empty_like(local_bias) for _ in range(world)]
        dist.all_gather(gathered_local, local_bias)
        out["bias"] = {"spread": max(float((b - gathered[0]).abs().max()) for b in gathered),
                       "local_spread": max(float((b - gathered_local[0]).abs().max()) for b in gathered_local),
                       "moved": float(ep.router.expert_bias.abs().max()),
                       "dtype": str(ep.router.expert_bias.dtype)}

        # A rank with no tokens: zero-row output, finite zero losses that still carry a graph.
        torch.manual_seed(12)
        layer = MoELayer(8, 16, 2 * world, 2, dispatch="dense", losses={"switch": 0.01, "z": 0.001})
        ep = ExpertParallelMoELayer.from_moe_layer(layer)
        xr = torch.randn(0 if rank == 0 else 4, 8, requires_grad=True)
        yr = ep(xr)
        aux = ep.aux_loss
        out["empty"] = {"shape": list(yr.shape), "aux": float(aux.detach()), "graph": aux.requires_grad,
                        "losses": {k: float(v.detach()) for k, v in ep.aux_losses.items()}}
        (yr.sum() + aux).backward()  # every rank runs backward, the empty one too

        # Bad input: E not divisible by W, a noisy router.
        errors = []
        for bad in (dict(num_experts=2 * world + 1), dict(num_experts=2 * world, noisy=True)):
            try:
                ExpertParallelMoELayer.from_moe_layer(MoELayer(8, 16, k=1, **bad))
            except ValueError as exc:
                errors.append(str(exc))
        out["errors"] = errors
        out["pid"] = os.getpid()
        return out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request):
    t0 = time.perf_counter()
    results = run_ranks(_worker, request.param, args=(list(SCENARIOS),), timeout_s=LAUNCH_TIMEOUT_S)
    return request.param, results, time.perf_counter() - t0


@pytest.mark.parametrize("name", list(SCENARIOS) + ["skewed", "mean_loss"])
def test_outputs_and_gradients_match_single_process(ranks, name):
    world, results, _ = ranks
    for rank, res in enumerate(results):
        diffs = res[name]
        for key in ("output", "input_grad", "expert_grad", "router_grad"):
            assert diffs[key] < TOL, f"{world} ranks, rank {rank}, {name}: max |{key} difference| = {diffs[key]:.2e}"


def test_ranks_that_send_or_receive_nothing(ranks):
    world, results, _ = ranks
    skew = [r["skewed"]["splits"] for r in results]
    # Everything goes to the last rank: all others send it their tokens and receive none.
    for rank, s in enumerate(skew):
        assert s["send"][:-1] == [0] * (world - 1), s
        assert sum(s["recv"]) == (0 if rank < world - 1 else sum(3 + r for r in range(world))), s
    if world == 4:  # rank 1 holds no tokens at all in "top2_uneven"
        assert results[1]["top2_uneven"]["splits"]["send"] == [0] * 4
    few = [r["few_tokens"]["splits"]["recv_counts"] for r in results]
    assert any(0 in row for per_rank in few for row in per_rank)  # some rank sends some expert nothing


def test_capacity_drops_like_single_process(ranks):
    _, results, _ = ranks
    assert sum(r["capacity"]["dropped_pairs"] for r in results) > 0  # the case really drops tokens


def test_aux_losses_are_local(ranks):
    _, results, _ = ranks
    assert all(r["aux_diff"] < 1e-6 for r in results)


def test_measured_bytes_match_formula(ranks):
    world, results, _ = ranks
    comm = results[0]["comm"]
    assert all(r["comm"] == comm for r in results)  # all_reduce gave every rank the same totals
    local_fraction = comm["local_pairs"] / comm["routed_pairs"]
    predicted = all_to_all_bytes(results[0]["tokens_total"], 8, 2, world, torch.float32, num_experts=2 * world,
                                 local_fraction=local_fraction)
    assert comm["routed_pairs"] == results[0]["tokens_total"] * 2
    assert comm["payload_bytes"] == predicted["payload_bytes"]
    assert comm["remote_bytes"] == pytest.approx(predicted["remote_bytes"])
    assert comm["counts_bytes"] == predicted["counts_bytes"]
    assert len(set(comm["payload"].values())) == 1  # the four passes carry the same rows


def test_tap_measures_the_tensors_the_collectives_carry(ranks):
    world, results, _ = ranks
    comm = results[0]["comm"]
    taps = [r["tap"] for r in results]
    assert all(r["tap_restored"] for r in results)
    # one count exchange and four payload all-to-alls (two forward, two backward) per rank
    assert all(t["calls"] == 5 for t in taps)
    sent = sum(t["sent_bytes"] for t in taps)
    assert sent == comm["payload_bytes"] + comm["counts_bytes"]
    sent_remote = sum(t["sent_remote_bytes"] for t in taps)
    assert sent_remote == sum(t["received_remote_bytes"] for t in taps)
    # the counts (E int64 per rank) go to the other ranks for (W-1)/W of them
    assert sent_remote == comm["remote_bytes"] + comm["counts_bytes"] * (world - 1) // world
    assert all(t["seconds"] > 0 for t in taps)


def test_equivalence_report_agrees(ranks):
    _, results, _ = ranks
    report = results[0]["report"]
    assert set(report["absolute"]) == {"output", "input_grad", "expert_grad", "router_grad"}
    assert max(report["absolute"].values()) < TOL
    assert max(report["relative"].values()) < TOL


def test_bad_world_size_and_noisy_router_are_rejected(ranks):
    world, results, _ = ranks
    for res in results:
        assert len(res["errors"]) == 2
        assert f"num_experts={2 * world + 1} is not divisible by world_size={world}" in res["errors"][0]
        assert "noisy" in res["errors"][1]


def test_launch_is_fast_and_leaves_no_process(ranks):
    world, results, seconds = ranks
    assert seconds < LAUNCH_TIMEOUT_S
    assert not multiprocessing.active_children()
    for res in results:
        assert not os.path.exists(f"/proc/{res['pid']}"), f"rank process {res['pid']} still exists"


def _functional_worker():
    return _worker(["top2_uneven"], collective="functional")


def test_bias_stays_identical_across_ranks(ranks):
    world, results, _ = ranks
    for res in results:
        assert res["bias"]["spread"] == 0.0
        assert res["bias"]["moved"] > 0 and res["bias"]["dtype"] == "torch.float32"
    assert results[0]["bias"]["local_spread"] > 0  # per-rank updates would have drifted apart


def test_a_rank_with_no_tokens_gets_finite_zero_losses(ranks):
    _, results, _ = ranks
    empty = results[0]["empty"]
    assert empty["shape"] == [0, 8]
    assert empty["aux"] == 0.0 and empty["graph"]
    assert set(empty["losses"]) == {"switch", "z"} and all(v == 0.0 for v in empty["losses"].values())
    assert all(r["empty"]["aux"] > 0 for r in results[1:])


def _all_to_all_gradcheck():
    init_distributed("gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
    try:
        from tutorial_moe.parallel import AllToAll

        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        return bool(torch.autograd.gradcheck(lambda x: AllToAll.apply(x, [5], [5], None), (x,)))
    finally:
        dist.destroy_process_group()


def test_gradcheck_all_to_all_on_one_rank():
    """float64 gradcheck of the custom all-to-all node (one rank: each rank's Jacobian would
    otherwise include what the other ranks do with its rows)."""
    assert run_ranks(_all_to_all_gradcheck, 1, timeout_s=LAUNCH_TIMEOUT_S) == [True]


def test_functional_collective_gives_the_same_result():
    """torch's all_to_all_single_autograd (first call imports torch._dynamo: slow) agrees too."""
    results = run_ranks(_functional_worker, 2, timeout_s=LAUNCH_TIMEOUT_S)
    for res in results:
        assert max(v for k, v in res["top2_uneven"].items() if k in ("output", "input_grad", "expert_grad",
                                                                    "router_grad")) < TOL


def _stuck_worker(pid_file):
    rank, _, _ = init_distributed("gloo", timeout_s=2.0)
    try:
        if rank == 1:
            with open(pid_file, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)  # never joins the collective below
        torch.manual_seed(0)
        layer = MoELayer(8, 16, 4, 1, losses={})
        ExpertParallelMoELayer.from_moe_layer(layer)(torch.randn(3, 8))
    finally:
        dist.destroy_process_group()


def test_a_missing_rank_fails_fast_and_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed"):
        run_ranks(_stuck_worker, 2, args=(str(pid_file),), timeout_s=LAUNCH_TIMEOUT_S)
    assert time.perf_counter() - t0 < 30  # the 2 s collective timeout fired, not the 60 s launch limit
    assert not os.path.exists(f"/proc/{pid_file.read_text()}")
    assert not multiprocessing.active_children()


def _sleeper():
    time.sleep(60)


def test_launch_timeout_kills_all_ranks():
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="gave no result within 1 s"):
        run_ranks(_sleeper, 2, timeout_s=1.0)
    assert time.perf_counter() - t0 < 15
    assert not multiprocessing.active_children()


def _raiser():
    raise ValueError("boom")


def test_launch_reports_a_rank_error():
    with pytest.raises(RuntimeError, match="ValueError: boom"):
        run_ranks(_raiser, 2, timeout_s=LAUNCH_TIMEOUT_S)


# ----------------------------------------------------------------------------- without processes

def test_expert_shard_blocks_and_errors():
    assert [list(expert_shard(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(expert_shard(3, 1, 0)) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by world_size=4"):
        expert_shard(6, 4, 0)
    with pytest.raises(ValueError, match="rank=4 is out of range"):
        expert_shard(8, 4, 4)
    with pytest.raises(TypeError, match="world_size must be an int"):
        expert_shard(8, 2.0, 0)


def test_all_to_all_bytes_formula():
    b = all_to_all_bytes(1000, 64, 2, 4, torch.float32, num_experts=8)
    assert b["payload_bytes"] == 4 * 1000 * 2 * 64 * 4
    assert b["remote_bytes"] == pytest.approx(b["payload_bytes"] * 3 / 4)
    assert b["per_rank_remote_bytes"] == pytest.approx(b["remote_bytes"] / 4)
    assert b["counts_bytes"] == 4 * 8 * 8
    assert all_to_all_bytes(1000, 64, 2, 4, torch.bfloat16)["payload_bytes"] == b["payload_bytes"] // 2
    assert all_to_all_bytes(1000, 64, 2, 4, backward=False)["payload_bytes"] == b["payload_bytes"] // 2
    assert all_to_all_bytes(1000, 64, 2, 1)["remote_bytes"] == 0  # one rank: nothing leaves the process
    assert all_to_all_bytes(10, 8, 1, 2, local_fraction=1.0)["remote_bytes"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=-1), "tokens=-1"), (dict(d_model=0), "d_model=0"), (dict(k=0), "k=0"),
    (dict(world_size=0), "world_size=0"), (dict(dtype="float32"), "dtype must be a torch.dtype"),
    (dict(local_fraction=1.5), "local_fraction=1.5"),
])
def test_all_to_all_bytes_bad_input(kwargs, match):
    args = dict(tokens=10, d_model=8, k=1, world_size=2) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        all_to_all_bytes(**args)


def test_comm_counter_counts_remote_rows():
    c = CommCounter()
    c.add("dispatch_forward", [3, 5, 0], rank=1, row_bytes=10)
    assert c.payload["dispatch_forward"] == 80 and c.remote["dispatch_forward"] == 30


def test_layer_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ExpertParallelMoELayer(8, 16, 4, 1)


def test_init_distributed_needs_the_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="RANK"):
        init_distributed()


def test_backend_matches_the_hardware():
    assert default_backend() == ("nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo")


def test_run_ranks_bad_input():
    with pytest.raises(TypeError, match="fn must be callable"):
        run_ranks("not a function", 2)
    with pytest.raises(ValueError, match="nprocs=0"):
        run_ranks(_raiser, 0)


def test_routed_counts_and_drawing():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tutorial_moe.parallel import draw_all_to_all, routed_counts
    from tutorial_moe.routing import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2)
    x = torch.randn(10, 8)
    counts = routed_counts(router, x, [6, 4])
    assert counts.shape == (2, 4) and counts.sum(1).tolist() == [12, 8]
    assert torch.equal(counts[1], router(x[6:]).mask.sum(0))
    ax = draw_all_to_all(counts)
    assert len(ax.patches) >= 2 * 2 + 4 + int((counts > 0).sum())  # rank boxes, expert boxes, arrows
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="sum to 9"):
        routed_counts(router, x, [6, 3])
    with pytest.raises(ValueError, match="not divisible"):
        draw_all_to_all(torch.ones(3, 4))


def test_overlap_model_matches_the_pipeline_formula():
    assert overlap_model(3.0, 2.0) == 5.0
    assert overlap_model(3.0, 2.0, chunks=2) == pytest.approx(3.0 + 2.0 / 2)
    assert overlap_model(1.0, 4.0, chunks=4) == pytest.approx(4.0 + 0.25)
    # more chunks never hurt and approach the longer of the two
    times = [overlap_model(2.0, 3.0, c) for c in (1, 2, 8, 1000)]
    assert times == sorted(times, reverse=True) and times[-1] == pytest.approx(3.0, abs=1e-2)


@pytest.mark.parametrize("kwargs", [dict(compute_s=-1.0, comm_s=1.0), dict(compute_s=1.0, comm_s="x"),
                                    dict(compute_s=1.0, comm_s=1.0, chunks=0)])
def test_overlap_model_refuses_bad_input(kwargs):
    with pytest.raises((ValueError, TypeError), match="overlap_model"):
        overlap_model(**kwargs)
