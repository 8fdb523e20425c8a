"""Peer oracle: torchtitan's MoE module, loaded with our weights, computes what MoELayer computes.

torchtitan is an independent implementation (its router, its token dispatcher with argsort and
scatter-add, its grouped matmuls), so agreement in outputs and in every gradient is evidence
that both are right; ``make test`` installs it (scripts/setup.sh), so these run in CI.
"""
import os
import sys

import pytest
import torch

from tutorial_moe import MoELayer, TopKRouter
from tutorial_moe import peers

# Skipped only where torchtitan is absent outside CI; in CI (where make test installs it) a
# missing torchtitan makes these fail with the ImportError that names the extra.
needs_torchtitan = pytest.mark.skipif(
    not peers.torchtitan_available() and not os.environ.get("CI"),
    reason=f"torchtitan=={peers.TORCHTITAN_VERSION} is not installed: `pip install -e '.[peer]'` or `make test` "
    "installs it",
)

QUANTITIES = ("output", "input_grad", "router_grad", "w_gate_grad", "w_up_grad", "w_down_grad")


def _layer(d, h, E, k, dtype=torch.float32, dispatch="auto"):
    return MoELayer(d, h, E, k, expert="swiglu", dispatch=dispatch, losses={}).to(dtype)


@needs_torchtitan
@pytest.mark.parametrize("d, h, E, k, T", [
    (16, 32, 4, 2, 24),
    (16, 32, 4, 1, 20),  # k = 1: both keep the raw softmax probability (no renormalisation)
    (32, 64, 8, 2, 200),
    (24, 40, 6, 3, 50),
    (10, 6, 5, 4, 33),  # rows not 16-byte aligned: the grouped matmul falls back to per-expert products
])
def test_float32_outputs_and_gradients_agree(d, h, E, k, T):
    layer = _layer(d, h, E, k)
    report = peers.torchtitan_equivalence(layer, torch.randn(T, d))
    assert set(report["absolute"]) == set(QUANTITIES)
    worst = {q: report["relative"][q] for q in QUANTITIES if report["relative"][q] > 1e-5}
    assert not worst, f"ours vs torchtitan, relative max |diff| above 1e-5: {worst}"


@needs_torchtitan
def test_float64_agrees_to_float32_rounding():
    # torchtitan's combine multiplies expert outputs by their weights in float32 by design, so a
    # float64 run agrees to float32 precision, not float64 precision.
    layer = _layer(16, 32, 4, 2, dtype=torch.float64)
    report = peers.torchtitan_equivalence(layer, torch.randn(40, 16, dtype=torch.float64))
    assert report["dtype"] == "float64"
    assert max(report["relative"].values()) < 1e-6, report["relative"]


@needs_torchtitan
@pytest.mark.parametrize("dispatch", ["dense", "loop", "sorted", "grouped"])
def test_every_dispatch_mode_agrees_with_the_peer(dispatch):
    layer = _layer(16, 32, 4, 2, dispatch=dispatch)
    report = peers.torchtitan_equivalence(layer, torch.randn(2, 12, 16), seed=3)
    assert max(report["relative"].values()) < 1e-5, report["relative"]


@needs_torchtitan
def test_stock_bfloat16_experts_agree_to_bfloat16_rounding():
    layer = _layer(32, 64, 8, 2)
    peer = peers.torchtitan_peer(layer, precision="bfloat16")
    tt = peers.import_torchtitan()
    assert type(peer.routed_experts.inner_experts) is tt.moe.GroupedExperts  # exactly as shipped
    report = peers.torchtitan_equivalence(layer, torch.randn(128, 32), precision="bfloat16")
    # bfloat16 keeps 8 significant bits (relative step 2**-8 ~ 0.004); a few roundings compound.
    assert max(report["relative"].values()) < 5e-2, report["relative"]


@needs_torchtitan
def test_a_mismatched_setting_is_detected():
    # The oracle has teeth: torchtitan's own default (no renormalisation) against our k=2 layer.
    layer = _layer(16, 32, 4, 2)
    cfg = peers.torchtitan_config(16, 32, 4, 2, route_norm=False)
    peer = cfg.build()
    peers.load_into_torchtitan(peer, layer)
    x = torch.randn(1, 30, 16)
    with torch.no_grad():
        diff = (peers._run_peer(peer, x) - layer(x)).abs().max().item()
    assert diff > 1e-3


@needs_torchtitan
def test_the_documented_default_differences_are_torchtitans():
    d = peers.torchtitan_defaults()
    assert d["score_func"] == "sigmoid" and d["route_norm"] is False and d["top_k"] == 1
    assert d["load_balance_coeff"] == pytest.approx(1e-3) and d["shared_experts"] is None
    peer = peers.torchtitan_peer(_layer(16, 32, 4, 2))
    assert peer.router.score_func == "softmax" and peer.router.route_norm is True
    assert peer.expert_bias_E is None and peer.shared_experts is None


@needs_torchtitan
def test_weights_land_in_torchtitans_layout():
    layer = _layer(8, 16, 4, 2)
    peer = peers.torchtitan_peer(layer)
    inner = peer.routed_experts.inner_experts
    assert torch.equal(inner.w1_EFD[2], layer.experts.w_gate[2].t())
    assert torch.equal(inner.w3_EFD[1], layer.experts.w_up[1].t())
    assert torch.equal(inner.w2_EDF[3], layer.experts.w_down[3].t())
    assert torch.equal(peer.router.gate.weight, layer.router.gate.weight)


@needs_torchtitan
def test_expert_parallel_on_two_gloo_ranks_matches_one_process():
    report = peers.torchtitan_expert_parallel(world_size=2, tokens_per_rank=32, d_model=16, d_hidden=32,
                                              num_experts=4, k=2, timeout_s=60)
    assert report["backend"] == "gloo" and report["dispatcher"] == "AllToAllTokenDispatcher"
    assert max(report["absolute"].values()) < 1e-5, report["absolute"]
    # Each rank hands the all-to-all one row per (token, chosen expert) pair.
    assert [sum(row) for row in report["rows_sent"]] == [32 * 2, 32 * 2]


@needs_torchtitan
@pytest.mark.parametrize("kwargs, match", [
    (dict(expert="mlp"), "expert='swiglu'"),
    (dict(noisy=True), "noisy"),
    (dict(temperature=2.0), "temperature"),
    (dict(capacity_factor=1.0), "capacity_factor"),
])
def test_settings_torchtitan_cannot_express_are_refused(kwargs, match):
    layer = MoELayer(8, 16, 4, 2, **{"expert": "swiglu", **kwargs})
    with pytest.raises(ValueError, match=match):
        peers.torchtitan_peer(layer)


@needs_torchtitan
def test_bad_arguments_are_refused():
    layer = _layer(8, 16, 4, 2)
    with pytest.raises(TypeError, match="MoELayer"):
        peers.torchtitan_peer(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="precision"):
        peers.torchtitan_peer(layer, precision="fp8")
    with pytest.raises(ValueError, match="x must be"):
        peers.torchtitan_equivalence(layer, torch.randn(4, 5))
    with pytest.raises(ValueError, match="expert_bias|bias_update_rate"):
        biased = MoELayer(8, 16, 4, 2, expert="swiglu", router=TopKRouter(8, 4, 2, bias_update_rate=0.1))
        peers.torchtitan_peer(biased)
    with pytest.raises(ValueError, match="multiple of world_size"):
        peers.torchtitan_expert_parallel(world_size=3, num_experts=4)
    with pytest.raises(ValueError, match="contiguous range"):
        peers.load_into_torchtitan(peers.torchtitan_peer(layer), layer, experts=range(2, 6))


def test_missing_torchtitan_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchtitan", None)
    with pytest.raises(ImportError, match=r"\[peer\]"):
        peers.import_torchtitan()


def test_the_script_says_how_to_install_when_torchtitan_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(peers, "torchtitan_available", lambda: False)
    assert peers.main([]) == 3
    assert "[peer]" in capsys.readouterr().err


@needs_torchtitan
def test_the_report_the_chapter_shows():
    report = peers.torchtitan_report(tokens=40, d_model=16, d_hidden=32, num_experts=4, expert_parallel=False)
    assert report["torchtitan"] == peers.TORCHTITAN_VERSION and report["expert_parallel"] is None
    assert list(report["equivalence"]) == ["float32", "float64", "float32, stock bfloat16 experts"]
    assert report["equivalence"]["float64"]["dtype"] == "float64"
    assert report["equivalence"]["float32, stock bfloat16 experts"]["precision"] == "bfloat16"


@needs_torchtitan
def test_the_gpu_command_uses_flags_torchtitan_has():
    import dataclasses
    import re

    from torchtitan.config import configs

    sections = {"parallelism": configs.ParallelismConfig, "training": configs.TrainingConfig}
    flags = re.findall(r"--(\w+)\.(\w+)", peers.TORCHTITAN_GPU_COMMAND)
    assert ("parallelism", "expert_parallel_degree") in flags
    for section, name in flags:
        assert name in {f.name for f in dataclasses.fields(sections[section])}, (section, name)


@needs_torchtitan
def test_raw_probability_weights_match_torchtitans_default_route_norm():
    layer = MoELayer(16, 32, 4, 2, expert="swiglu", losses={}, router=TopKRouter(16, 4, 2, normalize=False))
    assert peers.torchtitan_peer(layer).router.route_norm is False
    report = peers.torchtitan_equivalence(layer, torch.randn(30, 16))
    assert max(report["relative"].values()) < 1e-5, report["relative"]
