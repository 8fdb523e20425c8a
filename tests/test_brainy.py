"""Tests for tutorial_moe.experiments.brainy (Part I experiments): exact oracles on small shapes, properties, bad input."""
import itertools
import statistics

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tutorial_moe.experiments import brainy
from tutorial_moe.experiments.brainy import (
    REGIMES,
    FlattenGate,
    RoutingTrace,
    accuracy_at_every_k,
    auroc,
    brainy_moe,
    count_parameters,
    dense_brainy,
    dense_width_for,
    gate_drift,
    gate_gradient_norms,
    gate_snapshot,
    macs_per_sample,
    regime_schedule,
    routing_summary,
    seed003_soft_moe,
    summarize,
    time_top_k,
    train_digit_specialists,
    train_regime,
)
from tutorial_moe.experts import ConvExpert
from tutorial_moe.moe import MoE
from tutorial_moe.routing import SoftmaxRouter, TopKRouter
from tutorial_moe.train import fit, router_parameters

S = 6  # tiny images: 6 x 6 = 36 pixels


def images(n, size=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------- size and cost


def test_count_parameters_oracle():
    assert count_parameters(nn.Linear(3, 4)) == 3 * 4 + 4
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[0].requires_grad_(False)
    assert count_parameters(m) == 16 + 10
    assert count_parameters(m, trainable_only=True) == 10


def test_count_parameters_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        count_parameters([1, 2])


@given(hidden=st.integers(1, 40), depth=st.integers(1, 3), n=st.integers(1, 5))
@settings(max_examples=25, deadline=None)
def test_macs_dense_mlp_equals_weight_count(hidden, depth, n):
    model = dense_brainy(hidden, depth=depth, image_size=S)
    x, _ = images(n)
    expected = S * S * hidden + (depth - 1) * hidden * hidden + hidden * 10
    assert macs_per_sample(model, x) == expected
    # every weight once per image: MACs = parameters - biases
    assert count_parameters(model) - expected == depth * hidden + 10


def test_macs_conv_oracle():
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
    x = torch.rand(4, 2, 5, 5)
    assert macs_per_sample(conv, x) == 3 * 5 * 5 * 2 * 3 * 3


@given(E=st.integers(2, 6), data=st.data())
@settings(max_examples=20, deadline=None)
def test_macs_count_only_routed_rows(E, data):
    k = data.draw(st.integers(1, E))
    hidden = 5
    x, _ = images(16)
    expert_macs = S * S * hidden + hidden * 10
    gate_macs = S * S * E
    sparse = brainy_moe(E, hidden, k=k, image_size=S, dispatch="loop")
    dense = brainy_moe(E, hidden, k=k, image_size=S, dispatch="dense")
    assert macs_per_sample(sparse, x) == pytest.approx(gate_macs + k * expert_macs)
    assert macs_per_sample(dense, x) == pytest.approx(gate_macs + E * expert_macs)


def test_macs_restores_training_mode_and_rejects_empty():
    model = dense_brainy(4, image_size=S).train()
    macs_per_sample(model, images(2)[0])
    assert model.training
    with pytest.raises(ValueError, match="x must be"):
        macs_per_sample(model, torch.rand(0, 1, S, S))


@given(target=st.integers(200, 20000), depth=st.integers(1, 2))
@settings(max_examples=30, deadline=None)
def test_dense_width_for_is_closest(target, depth):
    h = dense_width_for(target, image_size=S, depth=depth)
    count = lambda w: count_parameters(dense_brainy(w, depth=depth, image_size=S))  # noqa: E731
    gap = abs(count(h) - target)
    assert gap <= abs(count(h + 1) - target)
    if h > 1:
        assert gap <= abs(count(h - 1) - target)


def test_dense_width_for_rejects_bad_target():
    with pytest.raises(ValueError, match="num_params"):
        dense_width_for(0)


# ----------------------------------------------------------------------------- models


def test_brainy_moe_routers_and_mixture():
    x, _ = images(8)
    soft = brainy_moe(3, 4, image_size=S)
    assert isinstance(soft.router, SoftmaxRouter)
    out = soft(x)
    assert out.shape == (8, 10)
    # combine="probs" returns log-probabilities of a mixture: they exponentiate to a distribution
    assert torch.allclose(out.exp().sum(-1), torch.ones(8), atol=1e-5)
    sparse = brainy_moe(3, 4, k=2, image_size=S)
    assert isinstance(sparse.router, TopKRouter) and sparse.router.k == 2
    sparse(x)
    assert sparse.last_routing.mask.sum(-1).eq(2).all()


def test_brainy_moe_conv_experts():
    model = brainy_moe(2, 8, k=1, image_size=8, expert="conv", conv_width=2)
    assert all(isinstance(e, ConvExpert) for e in model.experts)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_brainy_moe_bad_expert_kind():
    with pytest.raises(ValueError, match="expert"):
        brainy_moe(2, 4, expert="transformer")


def test_flatten_gate_checks_width():
    gate = FlattenGate(S * S, 3)
    assert gate(torch.rand(2, 1, S, S)).shape == (2, 3)
    with pytest.raises(ValueError, match="expected 36"):
        gate(torch.rand(2, 1, 5, 5))


def test_seed003_soft_moe_matches_hand_computation():
    torch.manual_seed(0)
    model = seed003_soft_moe(num_experts=3, units=5, image_size=S)
    x, _ = images(7)
    flat = x.flatten(1)
    layer = model[1]
    gate = (flat @ layer.router.gate.weight.t()).softmax(-1)  # (N, E)
    feats = torch.stack([torch.relu(e[0](flat)) for e in layer.experts])  # (E, N, units)
    mixed = torch.einsum("ne,enu->nu", gate, feats)
    expected = model[2](mixed)
    assert torch.allclose(model(x), expected, atol=1e-6)


# ----------------------------------------------------------------------------- does the gate learn?


def test_gate_gradient_norms_positive_and_leave_model_alone():
    torch.manual_seed(0)
    model = seed003_soft_moe(3, 4, image_size=S)
    x, y = images(32)
    norms = gate_gradient_norms(model, x, y)
    assert norms["gate"] > 0 and norms["experts"] > 0
    assert all(p.grad is None for p in model.parameters())


def test_gate_gradient_norms_zero_for_a_gate_the_loss_ignores():
    # With identical experts the mixture cannot depend on the gate: its gradient is exactly zero.
    torch.manual_seed(0)
    model = brainy_moe(3, 4, image_size=S, combine="logits")
    with torch.no_grad():
        for e in model.experts[1:]:
            e.load_state_dict(model.experts[0].state_dict())
    x, y = images(16)
    assert gate_gradient_norms(model, x, y)["gate"] < 1e-7


def test_gate_gradient_norms_needs_a_router():
    with pytest.raises(ValueError, match="router"):
        gate_gradient_norms(dense_brainy(4, image_size=S), *images(4))


def test_gate_drift():
    model = brainy_moe(3, 4, image_size=S)
    snap = gate_snapshot(model)
    assert gate_drift(model, snap) == 0
    with torch.no_grad():
        w = router_parameters(model)[0]
        w.mul_(1.5)
    assert gate_drift(model, snap) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="snapshot"):
        gate_drift(model, snap + snap)


# ----------------------------------------------------------------------------- one expert per digit


def brute_force_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
@settings(max_examples=60, deadline=None)
def test_auroc_matches_pair_counting(pairs):
    scores = [float(s) for s, _ in pairs]
    positive = [p for _, p in pairs]
    if all(positive) or not any(positive):
        return
    got = auroc(torch.tensor(scores), torch.tensor(positive))
    assert got == pytest.approx(brute_force_auroc(scores, positive))


def test_auroc_extremes_and_errors():
    y = torch.tensor([False, False, True, True])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert auroc(torch.ones(4), y) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.ones(3), torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="bool"):
        auroc(torch.ones(3), torch.tensor([1, 0, 1]))


def test_digit_specialists_learn_to_say_their_digit():
    torch.manual_seed(0)
    x, _ = images(60)
    y = torch.arange(60) % 3
    experts = [dense_brainy(8, image_size=S) for _ in range(3)]
    log = train_digit_specialists(experts, x, y, epochs=15, batch_size=20, lr=1e-2)
    assert [r["images"] for r in log] == [20, 20, 20]
    for digit, e in enumerate(experts):
        with torch.no_grad():
            assert (e(x).argmax(-1) == digit).all()  # a world of only `digit`s


def test_digit_specialists_need_every_digit():
    x, _ = images(10)
    with pytest.raises(ValueError, match="digit 1"):
        train_digit_specialists([dense_brainy(2, image_size=S)] * 2, x, torch.zeros(10, dtype=torch.long))


# ----------------------------------------------------------------------------- regimes


def test_regime_schedules():
    assert [regime_schedule("helicopter")(e) for e in range(6)] == [6] * 6
    assert [regime_schedule("tough_love")(e) for e in range(6)] == [3] * 6
    assert [regime_schedule("gradual")(e) for e in range(8)] == [6, 5, 4, 3, 3, 3, 3, 3]
    assert [regime_schedule("gradual", 4, 2)(e) for e in range(4)] == [4, 3, 2, 2]
    with pytest.raises(ValueError, match="regime"):
        regime_schedule("laissez_faire")
    with pytest.raises(ValueError, match="k"):
        regime_schedule("tough_love", 6, 7)


@pytest.mark.parametrize("regime", REGIMES)
def test_train_regime_small(regime):
    train = images(64, seed=1)
    test = images(32, seed=2)
    run = train_regime(regime, train, test, balance=True, seed=0, epochs=3, num_experts=4, k=2, hidden=4,
                       image_size=S, batch_size=32, probe=test, snapshot_steps=(0, 2, 6))
    assert sorted(run.at_k) == [1, 2, 3, 4]
    assert all(0 <= v["acc"] <= 1 and abs(sum(v["utilization"]) - 1) < 1e-3 for v in run.at_k.values())
    assert [s["step"] for s in run.snapshots] == [0, 2, 6]
    assert run.model.router.k == 2  # left at the inference k
    expected_k = {"helicopter": [4, 4, 4], "tough_love": [2, 2, 2], "gradual": [4, 3, 2]}[regime]
    assert [e["k"] for e in run.history.epochs] == expected_k
    assert "switch" in run.history.steps[0] and "importance" in run.history.steps[0]
    assert run.label.endswith("+ balance")


def test_train_regime_same_seed_same_result():
    train, test = images(48, seed=1), images(16, seed=2)
    kw = dict(balance=False, seed=3, epochs=2, num_experts=3, k=2, hidden=4, image_size=S, batch_size=16)
    a, b = train_regime("gradual", train, test, **kw), train_regime("gradual", train, test, **kw)
    assert a.at_k == b.at_k
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_train_regime_bad_input():
    data = images(8)
    with pytest.raises(TypeError, match="balance"):
        train_regime("gradual", data, data, balance="yes")
    with pytest.raises(ValueError, match="regime"):
        train_regime("nanny", data, data)


def test_accuracy_at_every_k_restores_k_and_checks_model():
    model = brainy_moe(4, 3, k=2, image_size=S)
    test = images(20)
    out = accuracy_at_every_k(model, test)
    assert sorted(out) == [1, 2, 3, 4] and model.router.k == 2
    # at k = E every expert takes every image
    assert out[4]["utilization"] == pytest.approx([0.25] * 4, abs=1e-4)
    with pytest.raises(ValueError, match="top-k router"):
        accuracy_at_every_k(brainy_moe(2, 3, image_size=S), test)


def test_routing_summary_and_trace():
    torch.manual_seed(0)
    model = brainy_moe(3, 4, k=3, image_size=S)
    x, y = images(40)
    s = routing_summary(model, x, y, step=5)
    assert s["step"] == 5 and len(s["utilization"]) == 3
    assert s["top_k_mass"][3] == pytest.approx(1.0, abs=1e-5)
    assert all(s["top_k_mass"][k] <= s["top_k_mass"][k + 1] + 1e-7 for k in (1, 2))
    assert 0 <= s["entropy"] <= torch.log(torch.tensor(3.0)) + 1e-5
    trace = RoutingTrace(x, y, steps=[0, 1, 3]).start(model)
    fit(model, (x, y), epochs=2, batch_size=20, show_progress=False, callback=trace)
    assert [r["step"] for r in trace.rows] == [0, 1, 3]
    with pytest.raises(ValueError, match="step"):
        RoutingTrace(x, y, steps=[-1])


# ----------------------------------------------------------------------------- statistics


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=10))
def test_summarize_matches_statistics(values):
    s = summarize(values)
    assert s["mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
    assert s["min"] == min(values) and s["max"] == max(values) and s["n"] == len(values)
    if len(values) > 1:
        assert s["std"] == pytest.approx(statistics.stdev(values), abs=1e-6)


def test_summarize_empty():
    with pytest.raises(ValueError, match="empty"):
        summarize([])


# ----------------------------------------------------------------------------- inference cost


def test_time_top_k_counts_and_leaves_model_alone():
    torch.manual_seed(0)
    model = brainy_moe(6, 8, k=6, image_size=S)
    x, _ = images(64)
    out = time_top_k(model, x, k=3, repeats=2)
    assert out["top_k_s"] > 0 and out["all_s"] > 0 and len(out["top_k_times"]) == 2
    gate, expert = S * S * 6, S * S * 8 + 8 * 10
    assert out["macs_top_k"] == pytest.approx(gate + 3 * expert)
    assert out["macs_all"] == pytest.approx(gate + 6 * expert)
    assert model.dispatch == "dense" and model.router.k == 6
    with pytest.raises(ValueError, match="top-k router"):
        time_top_k(brainy_moe(2, 3, image_size=S), x, k=1)
    with pytest.raises(ValueError, match="k"):
        time_top_k(model, x, k=7)


def test_module_exports_exist():
    for name in brainy.__all__:
        assert hasattr(brainy, name), name


def test_train_schedule_follows_any_schedule():
    from tutorial_moe.experiments.brainy import train_schedule
    train, test = images(48, seed=1), images(16, seed=2)
    run = train_schedule([4, 2, 1], train, test, num_experts=4, hidden=3, image_size=S, batch_size=16)
    assert [e["k"] for e in run.history.epochs] == [4, 2, 1]
    assert run.model.router.k == 1 and run.regime == "custom" and sorted(run.at_k) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"ks\[1\]"):
        train_schedule([4, 5], train, test, num_experts=4, image_size=S)
    with pytest.raises(ValueError, match="empty"):
        train_schedule([], train, test)
    with pytest.raises(TypeError, match="ks"):
        train_schedule("6,3", train, test)


def test_predict_batches_and_restores_mode():
    from tutorial_moe.experiments.brainy import predict
    torch.manual_seed(0)
    model = dense_brainy(4, image_size=S).train()
    x, _ = images(10)
    out = predict(model, x, batch_size=3)
    assert model.training and out.shape == (10, 10) and out.device.type == "cpu"
    with torch.no_grad():
        assert torch.allclose(out, model.eval()(x), atol=1e-6)
    with pytest.raises(TypeError, match="x"):
        predict(model, [1, 2])


def test_train_regime_with_conv_experts():
    # the FULL-mode path of chapter 05 (convolutional experts), on tiny images
    train, test = images(24, size=8, seed=1), images(8, size=8, seed=2)
    run = train_regime("gradual", train, test, epochs=2, num_experts=3, k=2, hidden=4, image_size=8, expert="conv",
                       batch_size=12)
    assert all(isinstance(e, ConvExpert) for e in run.model.experts) and sorted(run.at_k) == [1, 2, 3]
    assert macs_per_sample(run.model, test[0]) > 0


def test_accuracy_at_every_k_matches_evaluate_and_collect_routing():
    from tutorial_moe.metrics import utilization
    from tutorial_moe.train import collect_routing, evaluate
    torch.manual_seed(1)
    model = brainy_moe(4, 3, k=2, image_size=S)
    test = images(50, seed=3)
    out = accuracy_at_every_k(model, test)
    for k in range(1, 5):
        model.router.k = k
        assert out[k]["acc"] == pytest.approx(evaluate(model, test, batch_size=7)["acc"])
        assert out[k]["utilization"] == pytest.approx(utilization(collect_routing(model, test[0]).mask).tolist(), abs=1e-4)


def test_conv_brainy_shapes_size_and_cost():
    net = brainy.conv_brainy(4, 16)
    x = torch.rand(3, 1, 28, 28)
    assert net(x).shape == (3, 10)
    # conv 4 x (5*5 + 1), hidden (4*12*12) x 16 + 16, out 16 x 10 + 10
    assert brainy.count_parameters(net) == 4 * 26 + 4 * 144 * 16 + 16 + 16 * 10 + 10
    # every conv weight at 144 positions, each linear weight once
    assert brainy.macs_per_sample(net, x) == 144 * 4 * 25 + 4 * 144 * 16 + 16 * 10


def test_conv_brainy_rejects_bad_sizes():
    with pytest.raises(ValueError, match="channels=0"):
        brainy.conv_brainy(0)
    with pytest.raises(ValueError, match="image_size=4"):
        brainy.conv_brainy(image_size=4)
