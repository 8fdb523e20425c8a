"""fit_seeds against its oracle: S sequential ``fit`` runs with the same seeds.

Every test builds each seed's model as a chapter would (``torch.manual_seed(seed); make()``),
trains it with ``fit``, then trains all seeds at once with ``fit_seeds`` and compares the
histories row by row and the final weights. The stacked path uses batched matrix products,
grouped convolutions and a fused Adam, so equality is within float rounding, not bitwise.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tutorial_moe import MoE, MoELayer, TopKRouter
from tutorial_moe.experiments import two_domains as td
from tutorial_moe.experiments.brainy import FlattenGate, brainy_moe, conv_brainy, dense_brainy, seed003_soft_moe
from tutorial_moe.experts import MLPExpert
from tutorial_moe.multiseed import StackedModel, fit_seeds, register_stacking, stack_models
from tutorial_moe.schedules import k_per_epoch, temperature_annealing
from tutorial_moe.train import fit

SIZE, N, N_TEST = 8, 160, 64
SEEDS = [0, 1, 2]


def _data(with_ids=False):
    g = torch.Generator().manual_seed(123)
    x = torch.rand(N + N_TEST, 1, SIZE, SIZE, generator=g)
    # A learnable rule (so losses move): the class is the brightest of 5 pixel bands.
    y = x.flatten(1)[:, : 5 * (SIZE * SIZE // 5)].view(N + N_TEST, 5, -1).mean(-1).argmax(-1)
    ids = (x.flatten(1).mean(1) > 0.5).long()
    parts = (x, y, ids) if with_ids else (x, y)
    return tuple(t[:N] for t in parts), tuple(t[N:] for t in parts)


def _sequential(make, train, test, seeds, schedules=None, **kw):
    out = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        model = make()
        extra = {} if schedules is None else {"k_schedule": schedules[i]}
        hist = fit(model, train, test, seed=seed, show_progress=False, **kw, **extra)
        out.append((model, hist))
    return out


def _assert_same(sequential, runs, atol=2e-5, weight_atol=1e-4):
    assert len(runs.histories) == len(sequential)
    for (model, hist), model2, hist2 in zip(sequential, runs.models, runs.histories):
        assert len(hist.steps) == len(hist2.steps) and len(hist.epochs) == len(hist2.epochs)
        assert (hist.best_epoch, hist.stopped_early) == (hist2.best_epoch, hist2.stopped_early)
        for rows, rows2 in ((hist.steps, hist2.steps), (hist.epochs, hist2.epochs)):
            for r, r2 in zip(rows, rows2):
                assert r.keys() == r2.keys()
                for key in r:
                    if key == "seconds":
                        continue
                    torch.testing.assert_close(torch.tensor(r2[key], dtype=torch.float64),
                                               torch.tensor(r[key], dtype=torch.float64),
                                               atol=atol, rtol=1e-4, msg=f"{key} at {r}")
        for (name, p), (name2, p2) in zip(model.named_parameters(), model2.named_parameters()):
            assert name == name2
            torch.testing.assert_close(p2, p, atol=weight_atol, rtol=1e-4, msg=name)


def _check(make, with_ids=False, schedules=None, **kw):
    train, test = _data(with_ids)
    seq = _sequential(make, train, test, SEEDS, schedules, **kw)
    if schedules is not None:
        kw["k_schedule"] = schedules
    runs = fit_seeds(make, train, test, seeds=SEEDS, show_progress=False, **kw)
    _assert_same(seq, runs)
    return seq, runs


# ------------------------------------------------------------------ oracles


def test_dense_mlp_matches_sequential_fit():
    seq, runs = _check(lambda: dense_brainy(16, depth=2, image_size=SIZE), epochs=2, batch_size=32, lr=5e-3)
    # the runs really differ between seeds (else equality would prove little)
    assert runs.histories[0].steps[-1]["loss"] != runs.histories[1].steps[-1]["loss"]
    assert seq[0][1].epochs[-1]["test_acc"] == pytest.approx(runs.final("test_acc")[0], abs=1e-9)


def test_topk_moe_with_k_schedule_matches_sequential_fit():
    _, runs = _check(lambda: brainy_moe(4, 8, k=4, image_size=SIZE), epochs=3, batch_size=32, lr=5e-3,
                     k_schedule=k_per_epoch([4, 3, 2]))
    assert [e["k"] for e in runs.histories[0].epochs] == [4, 3, 2]
    assert len(runs.histories[0].steps[0]["utilization"][0]) == 4


def test_per_seed_k_schedules_match_sequential_fit():
    # Raw probabilities as weights (normalize=False): renormalised top-k weights give the
    # logits of unchosen experts a gradient that is zero up to rounding, and when an expert
    # gets no sample in a batch Adam turns that residue into full steps, so two correct runs
    # part ways. Raw weights give every gate column a real gradient.
    def make():
        d = SIZE * SIZE
        router = TopKRouter(None, 4, 4, normalize=False, gate=FlattenGate(d, 4))
        return MoE([MLPExpert(d, 8, 10) for _ in range(4)], router, combine="logits")

    schedules = [k_per_epoch([4, 2]), k_per_epoch([1]), k_per_epoch([3, 4])]
    _, runs = _check(make, schedules=schedules, epochs=2, batch_size=32, lr=5e-3)
    assert [[e["k"] for e in h.epochs] for h in runs.histories] == [[4, 2], [1, 1], [3, 4]]
    # the trained routers are left at each seed's last k, as fit leaves them
    assert [m.router.k for m in runs.models] == [2, 1, 4]


def test_soft_gate_with_balancing_losses_and_gate_lr_matches_sequential_fit():
    losses = {"importance": 0.1, "batch_entropy": 0.1, "sample_entropy": 0.01}
    _, runs = _check(lambda: brainy_moe(3, 8, k=None, image_size=SIZE, losses=losses), epochs=2, batch_size=32,
                     lr=5e-3, gate_lr=2e-2)
    assert set(losses) <= set(runs.histories[0].steps[0])


def test_topk_with_switch_and_z_losses_clipping_and_temperature_matches_sequential_fit():
    _check(lambda: brainy_moe(4, 8, k=2, image_size=SIZE, combine="logits", losses={"switch": 0.05, "z": 1e-3}),
           epochs=2, batch_size=32, lr=5e-3, clip_grad=0.5, temperature_schedule=temperature_annealing(2.0, 0.5, 8))


def test_aux_loss_free_bias_balancing_matches_sequential_fit():
    """Per-seed bias rows, counted and stepped after each optimiser step as fit does; the
    trained biases are written back to each seed's router."""
    make = lambda: MoE([MLPExpert(SIZE * SIZE, 8, 10) for _ in range(3)],  # noqa: E731
                       TopKRouter(None, 3, 1, bias_update_rate=0.05, gate=FlattenGate(SIZE * SIZE, 3)))
    seq, runs = _check(make, epochs=2, batch_size=32, lr=5e-3)
    for (model, _), model2 in zip(seq, runs.models):
        assert model.router.expert_bias.abs().sum() > 0  # the bias moved
        torch.testing.assert_close(model2.router.expert_bias, model.router.expert_bias, atol=1e-6, rtol=0)
        assert float(model2.router.expert_load.sum()) == 0


def test_conv_experts_match_sequential_fit():
    _check(lambda: brainy_moe(3, 8, k=2, image_size=SIZE, expert="conv", conv_width=4), epochs=2, batch_size=32,
           lr=5e-3)


def test_conv_brainy_and_a_pooled_sequential_match_sequential_fit():
    _check(lambda: conv_brainy(3, 8, kernel=3, image_size=SIZE), epochs=2, batch_size=32, lr=5e-3)
    _check(lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
                                 nn.Flatten(), nn.Linear(3 * 4 * 4, 10)),
           epochs=1, batch_size=32, lr=5e-3)


def test_conv_gate_with_ids_data_matches_sequential_fit():
    cfg = td.ExperimentConfig(image_size=SIZE, width=4, fc=8, gate_width=4, gate_fc=8, dense_hidden=8)
    _check(lambda: td.build_model("conv", cfg, num_classes=10, losses={"batch_variance": 0.1}), with_ids=True,
           epochs=2, batch_size=32, lr=5e-3)


def test_noisy_top1_with_load_loss_matches_sequential_fit():
    cfg = td.ExperimentConfig(image_size=SIZE, width=4, fc=8, gate_width=4, gate_fc=8, dense_hidden=8)
    _check(lambda: td.build_model("dense", cfg, router="noisy_top1", num_classes=10,
                                  losses={"importance": 0.1, "load": 0.1}),
           with_ids=True, epochs=2, batch_size=32, lr=5e-3)


def test_oracle_router_and_early_stopping_match_sequential_fit():
    cfg = td.ExperimentConfig(image_size=SIZE, width=4, fc=8, gate_width=4, gate_fc=8, dense_hidden=8)
    _, runs = _check(lambda: td.build_model("oracle", cfg, num_classes=10), with_ids=True, epochs=6,
                     batch_size=32, lr=3e-2, early_stopping=1)
    assert any(h.stopped_early for h in runs.histories)


def test_sequential_soft_moe_and_frozen_gate_match_sequential_fit():
    def make():
        model = seed003_soft_moe(3, 8, image_size=SIZE)
        for p in model[1].router.parameters():
            p.requires_grad_(False)
        return model

    seq, runs = _check(make, epochs=2, batch_size=32, lr=5e-3)
    for (model, _), model2 in zip(seq, runs.models):
        torch.testing.assert_close(model2[1].router.gate.weight, model[1].router.gate.weight, atol=0, rtol=0)


def test_stacked_forward_equals_each_model():
    torch.manual_seed(0)
    models = [brainy_moe(3, 8, k=2, image_size=SIZE) for _ in range(4)]
    stacked = stack_models(models).eval()
    x = torch.rand(4, 10, 1, SIZE, SIZE)
    with torch.no_grad():
        out = stacked(x)
        for s, m in enumerate(models):
            torch.testing.assert_close(out[s], m.eval()(x[s]), atol=1e-6, rtol=1e-5)


def test_list_of_models_is_trained_in_place():
    train, test = _data()
    models = []
    for s in SEEDS:
        torch.manual_seed(s)
        models.append(dense_brainy(8, image_size=SIZE))
    before = models[1].fc_in.weight.detach().clone()
    runs = fit_seeds(models, train, test, seeds=SEEDS, epochs=1, batch_size=32, show_progress=False)
    assert runs.models[1] is models[1]
    assert not torch.equal(before, models[1].fc_in.weight)


def test_non_finite_loss_names_the_step_the_seed_and_the_parts():
    train, _ = _data()
    models = [dense_brainy(8, image_size=SIZE) for _ in SEEDS]
    with torch.no_grad():
        models[2].fc_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 0 .*seed 2 .*task=nan"):
        fit_seeds(models, train, seeds=SEEDS, show_progress=False)


# ------------------------------------------------------------------ bad input


def test_empty_seed_list_is_rejected():
    train, _ = _data()
    with pytest.raises(ValueError, match="seeds is empty"):
        fit_seeds(lambda: dense_brainy(8, image_size=SIZE), train, seeds=[], show_progress=False)


def test_mismatched_model_and_seed_lists_are_rejected():
    train, _ = _data()
    with pytest.raises(ValueError, match="2 modules but seeds has 3"):
        fit_seeds([dense_brainy(8, image_size=SIZE) for _ in range(2)], train, seeds=[0, 1, 2], show_progress=False)


def test_mismatched_schedule_list_is_rejected():
    train, _ = _data()
    with pytest.raises(ValueError, match="k_schedule has 2 schedules but there are 3 seeds"):
        fit_seeds(lambda: brainy_moe(3, 8, k=2, image_size=SIZE), train, seeds=[0, 1, 2], show_progress=False,
                  k_schedule=[k_per_epoch([2]), k_per_epoch([1])])


@pytest.mark.parametrize("seeds, error, text", [
    ([0, 0], ValueError, "repeats a seed"),
    ([0, -1], ValueError, r"seeds\[1\]=-1"),
    ([0, 1.5], TypeError, r"seeds\[1\] must be an int"),
    (3, TypeError, "seeds must be a list"),
])
def test_bad_seeds_are_rejected(seeds, error, text):
    train, _ = _data()
    with pytest.raises(error, match=text):
        fit_seeds(lambda: dense_brainy(8, image_size=SIZE), train, seeds=seeds, show_progress=False)


def test_a_single_module_is_rejected():
    train, _ = _data()
    with pytest.raises(TypeError, match="got a single MLPExpert"):
        fit_seeds(dense_brainy(8, image_size=SIZE), train, seeds=[0, 1], show_progress=False)


@pytest.mark.parametrize("make, text", [
    (lambda: nn.Sequential(nn.Flatten(), MoELayer(SIZE * SIZE, 8, 4, 2)), "cannot stack a MoELayer"),
    (lambda: MLPExpert(SIZE * SIZE, 8, 10, dropout=0.1), "dropout=0.1"),
    (lambda: MoE([MLPExpert(SIZE * SIZE, 8, 10) for _ in range(3)],
                 TopKRouter(None, 3, 1, capacity_factor=1.0, gate=FlattenGate(SIZE * SIZE, 3))), "capacity_factor=1.0"),
    (lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(SIZE * SIZE)), "cannot stack a BatchNorm1d"),
    (lambda: MoE([MLPExpert(SIZE * SIZE, 8, 10) for _ in range(3)],
                 TopKRouter(None, 3, 2, scoring="sigmoid", gate=FlattenGate(SIZE * SIZE, 3))), "scoring='sigmoid'"),
])
def test_models_the_stacking_cannot_handle_raise_type_error(make, text):
    train, _ = _data()
    with pytest.raises(TypeError, match=text):
        fit_seeds(make, train, seeds=[0, 1], show_progress=False)


def test_models_of_different_architectures_are_rejected():
    with pytest.raises(ValueError, match="models\\[1\\] has other parameters"):
        StackedModel([dense_brainy(8, image_size=SIZE), dense_brainy(9, image_size=SIZE)])


def test_register_stacking_checks_its_arguments():
    with pytest.raises(TypeError, match="cls must be an nn.Module subclass"):
        register_stacking(int, lambda m: m)
    with pytest.raises(TypeError, match="equivalent must be callable"):
        register_stacking(nn.Linear, None)
