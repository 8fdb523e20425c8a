"""Seed 004's two-domain experiment on tiny configurations (8x8 images, two-channel experts)."""
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tutorial_moe.data import DataSplit
from tutorial_moe.losses import switch_balance_loss
from tutorial_moe.routing import Routing, TopKRouter
from tutorial_moe.experts import ConvGate
from tutorial_moe.experiments.two_domains import (
    LOSS_SETTINGS, OUTCOMES, ExperimentConfig, RunResult, activation_table_rows, build_model, class_rate_rows,
    classify_outcome, domain_gap, format_activation_table, gate_values, mean_std, measure_routing, outcome_counts,
    run, seed_gate_losses, summary_rows,
)

TINY = ExperimentConfig(image_size=8, width=2, fc=4, gate_width=2, gate_fc=4, dense_hidden=4, epochs=2,
                        batch_size=16, lr=1e-2, train_limit=None, test_limit=None)


def fake_split(n=40, size=8, seed=0):
    """Two separable fake domains: domain 1 images are bright, domain 0 dark; 20 balanced classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 20
    domain = (y >= 10).long()
    x = torch.rand(n, 1, size, size, generator=g) * 0.3 + 0.6 * domain.view(-1, 1, 1, 1)
    return DataSplit(x, y, domain, "fake two-domain data")


SEED_DENSE = [[0.5692206, 0.43077937], [0.0038144253, 0.9961853]]  # seed 004's dense gate, train


# ---------------------------------------------------------------- outcomes


def test_classify_outcome_on_known_tables():
    assert classify_outcome([[1.0, 0.0], [0.0, 1.0]]) == "split"
    assert classify_outcome([[1.0, 1e-29], [1.0, 1e-31]]) == "collapsed"  # seed 004's conv gate
    assert classify_outcome(SEED_DENSE) == "partial"
    assert classify_outcome([[0.5, 0.5], [0.45, 0.55]]) == "shared"
    assert classify_outcome([[0.95, 0.05], [0.05, 0.95]]) == "split"
    # the same expert above 0.99 on one domain only is not a collapse
    assert classify_outcome([[0.995, 0.005], [0.6, 0.4]]) == "partial"
    assert set(OUTCOMES) == {"collapsed", "split", "partial", "shared"}


@given(st.floats(0, 1), st.floats(0, 1))
def test_outcome_and_gap_ignore_expert_and_domain_order(a, b):
    rates = [[a, 1 - a], [b, 1 - b]]
    swapped_experts = [[1 - a, a], [1 - b, b]]
    swapped_domains = [[b, 1 - b], [a, 1 - a]]
    out = classify_outcome(rates)
    assert classify_outcome(swapped_experts) == out == classify_outcome(swapped_domains)
    assert domain_gap(rates) == pytest.approx(abs(a - b))
    assert 0 <= domain_gap(rates) <= 1


def test_domain_gap_is_total_variation_for_more_experts():
    assert domain_gap([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]) == pytest.approx(1.0)
    assert domain_gap([[0.25] * 4, [0.25] * 4]) == 0


@pytest.mark.parametrize("bad", [[0.5, 0.5], [[0.5, 0.5]] * 3])
def test_outcome_rejects_wrong_shapes(bad):
    with pytest.raises(ValueError, match="shape"):
        classify_outcome(bad)
    with pytest.raises(ValueError, match="shape"):
        domain_gap(bad)


def test_outcome_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="partial"):
        classify_outcome(SEED_DENSE, split=0.2, partial=0.5)
    with pytest.raises(ValueError, match="collapse"):
        classify_outcome(SEED_DENSE, collapse=1.5)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("gate", ["oracle", "conv", "dense"])
def test_models_map_images_to_20_logits(gate):
    data = fake_split(8)
    model = build_model(gate, TINY)
    out = model(data.x, data.domain)
    assert out.shape == (8, 20)
    r = model.last_routing
    assert torch.allclose(r.probs.sum(-1), torch.ones(8))
    if gate == "oracle":
        assert torch.equal(r.weights, torch.nn.functional.one_hot(data.domain, 2).float())


def test_logit_combine_is_gate_weighted_sum_of_experts():
    """Y' = softmax(sum_i g_i NN_i(X)): the model's output is exactly that sum of logits."""
    data = fake_split(6)
    model = build_model("dense", TINY)
    out = model(data.x)
    g = model.last_routing.weights
    ys = model.expert_outputs(data.x)
    assert torch.allclose(out, g[:, :1] * ys[0] + g[:, 1:] * ys[1], atol=1e-6)


def test_top1_routers_choose_one_expert_and_keep_gate_gradient():
    data = fake_split(8)
    model = build_model("conv", TINY, router="top1", losses={"switch": 0.01})
    out = model(data.x)
    assert model.last_routing.mask.sum(-1).eq(1).all()
    out.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router.gate.parameters())


def test_noisy_top1_reads_images_and_provides_load():
    router = TopKRouter(64, 2, 1, noisy=True, normalize=False, gate=ConvGate(2, 1, 2, 4, 8))
    r = router(torch.rand(5, 1, 8, 8))
    assert r.aux["load"].shape == (2,)
    assert r.mask.sum() == 5


def test_switch_loss_is_constant_on_a_soft_gate():
    """Why chapter 07 gives the Switch loss a top-1 router: with every expert selected it is 1."""
    probs = torch.softmax(torch.randn(32, 2, requires_grad=True), -1)
    loss = switch_balance_loss(probs, torch.ones(32, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"gate": "lstm"}, "gate"),
    ({"gate": "dense", "router": "top3"}, "router"),
    ({"gate": "dense", "bias_update_rate": 0.1}, "bias_update_rate"),
    ({"gate": "oracle", "losses": {"switch": 0.1}}, "oracle"),
    ({"gate": "dense", "losses": {"entropy": 0.1}}, "entropy"),
])
def test_build_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(cfg=TINY, **kwargs)


def test_config_validates_and_seed_sizes_match_the_seed():
    s = ExperimentConfig.seed_sizes()
    assert (s.image_size, s.width, s.fc, s.gate_width, s.gate_fc, s.dense_hidden, s.batch_size) == (32, 128, 128, 64, 64, 64, 128)
    assert s.train_limit is None
    with pytest.raises(ValueError, match="num_experts"):
        ExperimentConfig(num_experts=1)
    with pytest.raises(TypeError, match="width"):
        ExperimentConfig(width=2.5)
    assert "16x16" in ExperimentConfig().describe()


def test_seed_gate_losses():
    assert seed_gate_losses("entropy", 0.1, 0.01) == {"batch_entropy": 0.1, "sample_entropy": 0.01}
    assert seed_gate_losses("variance", 1, 0) == {"batch_variance": 1.0, "sample_variance": 0.0}
    with pytest.raises(ValueError, match="kind"):
        seed_gate_losses("kl", 0.1, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        seed_gate_losses("entropy", -1, 0.1)
    assert LOSS_SETTINGS["entropy"]["losses"] == seed_gate_losses("entropy", 0.1, 0.01)


# ---------------------------------------------------------------- measuring


def test_gate_values_soft_and_hard():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    soft = Routing(probs.log(), probs, probs, torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    assert torch.equal(gate_values(soft), probs)
    mask = torch.tensor([[False, True], [False, True]])  # e.g. a bias moved both to expert 1
    hard = Routing(probs.log(), probs, probs * mask, mask, torch.zeros(2, dtype=torch.bool))
    assert torch.equal(gate_values(hard), mask.float())


def test_measure_routing_class_rates_average_to_domain_rates():
    data = fake_split(40)
    model = build_model("dense", TINY)
    m = measure_routing(model, data)
    assert m["rates"].shape == (2, 2) and m["class_rates"].shape == (20, 2)
    # balanced classes: a domain's rate is the mean of its ten classes' rates
    assert torch.allclose(m["class_rates"][:10].mean(0), m["rates"][0], atol=1e-6)
    assert torch.allclose(m["class_rates"][10:].mean(0), m["rates"][1], atol=1e-6)
    assert 0 <= m["entropy"] <= math.log(2) + 1e-6
    assert 0 <= m["specialization"] <= 1


def test_run_oracle_records_curves_and_identity_table():
    train, test = fake_split(48), fake_split(20, seed=1)
    r = run("oracle", train, test, TINY, seed=0)
    steps = TINY.epochs * math.ceil(48 / TINY.batch_size)
    assert len(r.train_acc_steps) == len(r.step_epochs) == steps
    assert r.step_epochs[-1] == pytest.approx(TINY.epochs)
    assert len(r.test_acc_epochs) == TINY.epochs
    assert r.rates["test"] == [[1.0, 0.0], [0.0, 1.0]]
    assert r.outcome == "split" and r.specialization == pytest.approx(1.0) and r.entropy == 0
    json.dumps(r.summary())  # JSON-able for save_results


def test_run_is_reproducible_and_settings_apply():
    train, test = fake_split(32), fake_split(20, seed=1)
    a = run("dense", train, test, TINY, seed=3, setting="entropy")
    b = run("dense", train, test, TINY, seed=3, setting="entropy")
    assert a.train_acc_steps == b.train_acc_steps and a.rates == b.rates
    assert a.extra["losses"] == LOSS_SETTINGS["entropy"]["losses"]
    c = run("conv", train, test, TINY, seed=0, setting="bias")
    assert c.extra["router"] == "top1"
    assert all(sum(row) == pytest.approx(1) for row in c.rates["test"])
    four = run("dense", train, test, TINY.replace(num_experts=4), seed=0)
    assert len(four.rates["test"][0]) == 4 and len(four.class_rates["test"]) == 20


def test_run_rejects_single_domain_data():
    data = fake_split(20)
    with pytest.raises(ValueError, match="two-domain"):
        run("dense", data._replace(domain=None), data, TINY)
    with pytest.raises(ValueError, match="setting"):
        run("dense", data, data, TINY, setting="magic")


def _result(outcome, gate="dense", rates=((0.6, 0.4), (0.1, 0.9))):
    rates = [list(r) for r in rates]
    return RunResult(gate, "none", 0, [1.0], [0.5], [0.4], {"train": rates, "test": rates},
                     {"train": [[0.5, 0.5]] * 20, "test": [[0.5, 0.5]] * 20}, 0.4, 0.3, 0.2, domain_gap(rates),
                     outcome, 1.0)


def test_tables_and_counts():
    results = {"conv gate": _result("collapsed", "conv"), "dense gate": _result("partial")}
    rows = activation_table_rows(results)
    assert [r["model, domain"] for r in rows] == ["conv gate, digits", "conv gate, other", "dense gate, digits",
                                                  "dense gate, other"]
    assert rows[1]["test NN1"] == pytest.approx(0.9)
    text = format_activation_table(rows)
    assert "train NN0" in text and "test NN1" in text and len(text.splitlines()) == 5
    assert len(class_rate_rows(results, [str(i) for i in range(20)])) == 20
    counts = outcome_counts([_result("collapsed", "conv"), _result("partial"), _result("partial")])
    assert counts == {"conv": {"collapsed": 1, "split": 0, "partial": 0, "shared": 0},
                      "dense": {"collapsed": 0, "split": 0, "partial": 2, "shared": 0}}
    assert summary_rows([_result("partial")])[0]["digits: gate"] == "0.60 / 0.40"
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    with pytest.raises(ValueError, match="key"):
        outcome_counts([], key="seed")


def test_usage_imbalance():
    from tutorial_moe.experiments.two_domains import usage_imbalance

    assert usage_imbalance([0.5, 0.5]) == 0 and usage_imbalance([1.0, 0.0]) == pytest.approx(0.5)
    assert usage_imbalance([0.25] * 4) == 0 and usage_imbalance([1, 0, 0, 0]) == pytest.approx(0.75)


def test_seed_loss_trainer_labels_and_applies_the_loss():
    from tutorial_moe.experiments.two_domains import seed_loss_trainer

    train, test = fake_split(32), fake_split(20, seed=1)
    fn = seed_loss_trainer("dense", train, test, TINY.replace(epochs=1), seed=0)
    r = fn("variance_literal", 1.0, 0.0)
    assert r.setting == "variance_literal (alpha=1, beta=0)"
    assert r.extra["losses"] == {"neg_batch_variance": 1.0, "neg_sample_variance": 0.0}
    # trained as a stacked model of one seed: the same model run() trains
    single = run("dense", train, test, TINY.replace(epochs=1), seed=0, losses=r.extra["losses"])
    assert r.test_acc == pytest.approx(single.test_acc, abs=1e-6)
    assert torch.allclose(torch.tensor(r.rates["test"]), torch.tensor(single.rates["test"]), atol=1e-4)
    with pytest.raises(ValueError, match="gate"):
        seed_loss_trainer("oracle", train, test, TINY)


# ---------------------------------------------------------------- stacked seeds, matched sizes


def test_run_seeds_equals_one_run_per_seed():
    """The stacked runs give what ``run`` gives seed by seed (fit_seeds' contract), for every gate."""
    from tutorial_moe.experiments.two_domains import run_seeds

    train, test = fake_split(64), fake_split(20, seed=1)  # 4 steps per epoch
    for gate in ("oracle", "conv", "dense"):
        stacked = run_seeds(gate, train, test, TINY, [0, 2], rate_images=64, test_points=2)
        for r, seed in zip(stacked, (0, 2)):
            single = run(gate, train, test, TINY, seed=seed)
            assert r.seed == seed
            assert r.test_acc == pytest.approx(single.test_acc, abs=1e-6)
            assert torch.allclose(torch.tensor(r.train_acc_steps), torch.tensor(single.train_acc_steps), atol=1e-5)
            assert torch.allclose(torch.tensor(r.rates["test"]), torch.tensor(single.rates["test"]), atol=1e-4)
            # the test curve: one mid-epoch point per epoch, then each epoch's end
            assert [round(p[0], 6) for p in r.extra["test_curve"]] == [0.5, 1.0, 1.5, 2.0]
            assert r.extra["test_curve"][-1][1] == pytest.approx(r.test_acc)
            json.dumps(r.summary())


def test_run_seeds_hard_routers_equal_one_run_per_seed():
    """Switch (top-1), noisy top-1 with importance + load, the across-samples variance loss and
    bias balancing stack too: each seed equals its own ``run``."""
    from tutorial_moe.experiments.two_domains import run_seeds

    train, test = fake_split(64), fake_split(20, seed=1)
    for setting in ("switch", "importance_load", "variance_samples", "bias"):
        stacked = run_seeds("dense", train, test, TINY, [0, 2], rate_images=64, test_points=1, setting=setting)
        for r, seed in zip(stacked, (0, 2)):
            single = run("dense", train, test, TINY, seed=seed, setting=setting)
            assert r.extra["router"] == single.extra["router"]
            assert r.test_acc == pytest.approx(single.test_acc, abs=1e-6)
            assert torch.allclose(torch.tensor(r.train_acc_steps), torch.tensor(single.train_acc_steps), atol=1e-5)
            assert torch.allclose(torch.tensor(r.rates["test"]), torch.tensor(single.rates["test"]), atol=1e-4)


def test_run_seeds_refuses_bad_arguments():
    from tutorial_moe.experiments.two_domains import run_seeds

    train, test = fake_split(32), fake_split(20, seed=1)
    with pytest.raises(ValueError, match="seeds is empty"):
        run_seeds("dense", train, test, TINY, [])
    with pytest.raises(ValueError, match="test_points"):
        run_seeds("dense", train, test, TINY, [0], test_points=0)


def test_matched_config_balances_parameter_counts():
    from tutorial_moe.experiments.two_domains import param_count

    cfg = ExperimentConfig.book_sizes()
    assert (cfg.image_size, cfg.train_limit, cfg.batch_size) == (32, 43000, 128)
    # at least 20,000 images per domain and 1,000 optimiser steps (the book's floor for routing claims)
    assert cfg.train_limit // 2 >= 20000 and cfg.epochs * -(-cfg.train_limit // cfg.batch_size) >= 1000
    counts = {g: param_count(g, cfg) for g in ("oracle", "conv", "dense")}
    # the oracle has no gate, so without matching it is smaller by a whole gate
    unmatched = param_count("oracle", cfg.replace(oracle_fc=None))
    assert counts["conv"] - unmatched > 0.04 * counts["conv"]
    # matched: within one hidden unit's worth of parameters of the gated models' mean
    mean_gated = (counts["conv"] + counts["dense"]) / 2
    per_unit = 2 * (cfg.width * (cfg.image_size // 4) ** 2 + 1 + 20)
    assert abs(counts["oracle"] - mean_gated) <= per_unit / 2
    assert cfg.oracle_fc > cfg.fc
    assert "oracle's experts fc" in cfg.describe()
    with pytest.raises(ValueError, match="oracle_fc"):
        ExperimentConfig(oracle_fc=0)


def test_aligned_rates_puts_the_digits_expert_first():
    from tutorial_moe.experiments.two_domains import aligned_rates

    assert aligned_rates([[0.1, 0.9], [0.8, 0.2]]) == [[0.9, 0.1], [0.2, 0.8]]
    assert aligned_rates([[0.9, 0.1], [0.2, 0.8]]) == [[0.9, 0.1], [0.2, 0.8]]
    # a collapsed gate stays collapsed; only the column order changes
    assert aligned_rates([[0.0, 1.0], [0.0, 1.0]]) == [[0.0, 1.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="shape"):
        aligned_rates([[1.0, 0.0]])
    from tutorial_moe.experiments.two_domains import aligned_order

    assert aligned_order([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]]) == [2, 1, 0]
