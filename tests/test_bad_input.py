"""Bad input gets a clear error: ValueError/TypeError whose message names the argument and the value.

Each case is (callable, expected exception, strings the message must contain). The strings are
the argument's name and its offending value as the message should show them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tutorial_moe import (
    ExpertBank,
    ExpertChoiceRouter,
    HashRouter,
    HierarchicalRouter,
    MLPExpert,
    MoE,
    MoELayer,
    OracleRouter,
    SoftmaxRouter,
    SoftMoELayer,
    ThresholdRouter,
    TopKRouter,
    seed_everything,
)
from tutorial_moe.dispatch import dispatch
from tutorial_moe.losses import switch_balance_loss, z_loss
from tutorial_moe.metrics import activation_rates, specialization
from tutorial_moe.runtime import device
from tutorial_moe.schedules import k_per_epoch, temperature_annealing
from tutorial_moe.train import fit

D, E = 8, 4
X = torch.randn(5, D)
Y = torch.randint(0, 3, (5,))


def _set_k(value):
    TopKRouter(D, E, 2).k = value


def _fit(**kw):
    model = nn.Sequential(MoELayer(D, D, E, 2), nn.Linear(D, 3))
    data = kw.pop("data", (X, Y))
    return fit(model, data, show_progress=False, **kw)


def _nan_tokens():
    x = X.clone()
    x[1, 2] = float("nan")
    return x


def _grouped_misaligned():
    layer = MoELayer(6, 7, E, 2, dispatch="sorted")
    x = torch.randn(3, 6)
    return dispatch("grouped", layer.experts, x, layer.router(x))


class _WrongGate(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 3)


CASES = {
    # --- routers: k, capacity, temperature, sizes
    "topk_k_zero": (lambda: TopKRouter(D, E, 0), ValueError, ["k=0", "1 <= k <= 4"]),
    "topk_k_above_E": (lambda: TopKRouter(D, E, 5), ValueError, ["k=5", "k <= 4"]),
    "topk_k_float": (lambda: TopKRouter(D, E, 1.5), TypeError, ["k", "1.5"]),
    "topk_k_set_later": (lambda: _set_k(0), ValueError, ["k=0"]),
    "capacity_factor_zero": (lambda: TopKRouter(D, E, 1, capacity_factor=0), ValueError, ["capacity_factor=0", "> 0"]),
    "capacity_factor_negative": (lambda: TopKRouter(D, E, 1, capacity_factor=-1.5), ValueError,
                                 ["capacity_factor=-1.5"]),
    "capacity_factor_nan": (lambda: TopKRouter(D, E, 1, capacity_factor=float("nan")), ValueError,
                            ["capacity_factor=nan"]),
    "capacity_factor_string": (lambda: TopKRouter(D, E, 1, capacity_factor="1.0"), TypeError,
                               ["capacity_factor", "'1.0'"]),
    "temperature_zero": (lambda: TopKRouter(D, E, 1, temperature=0), ValueError, ["temperature=0"]),
    "temperature_negative": (lambda: SoftmaxRouter(D, E, temperature=-1), ValueError, ["temperature=-1"]),
    "num_experts_float": (lambda: SoftmaxRouter(D, 2.5), TypeError, ["num_experts", "2.5"]),
    "num_experts_zero": (lambda: SoftmaxRouter(D, 0), ValueError, ["num_experts=0"]),
    "noisy_not_bool": (lambda: TopKRouter(D, E, 1, noisy="yes"), TypeError, ["noisy", "'yes'"]),
    "expert_choice_no_capacity": (lambda: ExpertChoiceRouter(D, E, None), ValueError, ["capacity_factor=None"]),
    "expert_choice_capacity_zero": (lambda: ExpertChoiceRouter(D, E, 0.0), ValueError, ["capacity_factor=0"]),
    "threshold_init_above_one": (lambda: ThresholdRouter(D, E, init_threshold=1.5), ValueError,
                                 ["init_threshold=1.5"]),
    "hierarchical_k_above_group": (lambda: HierarchicalRouter(D, 2, 2, k=3), ValueError, ["k=3"]),
    "hierarchical_group_k_zero": (lambda: HierarchicalRouter(D, 2, 2, group_k=0), ValueError, ["group_k=0"]),
    "router_without_d_model_or_gate": (lambda: TopKRouter(None, E, 1), ValueError, ["d_model=None"]),
    "gate_wrong_width": (lambda: TopKRouter(None, E, 1, gate=_WrongGate())(X), ValueError, ["(5, 3)", "(5, 4)"]),
    # --- router inputs
    "router_input_rank_3": (lambda: TopKRouter(D, E, 1)(torch.zeros(2, 3, D)), ValueError, ["x", "(2, 3, 8)"]),
    "router_input_width": (lambda: TopKRouter(D, E, 1)(torch.zeros(5, 7)), ValueError, ["width 7", "d_model=8"]),
    "router_input_nan": (lambda: TopKRouter(D, E, 1)(_nan_tokens()), ValueError, ["x", "NaN"]),
    "router_input_int": (lambda: TopKRouter(D, E, 1)(torch.zeros(5, D, dtype=torch.long)), TypeError,
                         ["x", "torch.int64"]),
    "router_input_list": (lambda: TopKRouter(D, E, 1)([[0.0] * D]), TypeError, ["x", "list"]),
    "hash_ids_wrong_length": (lambda: HashRouter(E)(X, torch.arange(3)), ValueError, ["ids", "(3,)", "(5,)"]),
    "hash_ids_missing": (lambda: HashRouter(E)(X), ValueError, ["ids", "None"]),
    "hash_ids_float": (lambda: HashRouter(E)(X, torch.zeros(5)), TypeError, ["ids", "torch.float32"]),
    "hash_seed_negative": (lambda: HashRouter(E, seed=-1), ValueError, ["seed=-1"]),
    "oracle_negative_label": (lambda: OracleRouter(E)(X, torch.tensor([0, 1, -1, 2, 3])), ValueError, ["ids", "-1"]),
    "oracle_label_beyond_table": (lambda: OracleRouter(E)(X, torch.tensor([0, 1, 7, 2, 3])), ValueError, ["7"]),
    "oracle_assignment_out_of_range": (lambda: OracleRouter(E, assignment=[0, 5]), ValueError,
                                       ["assignment=[0, 5]", "0..3"]),
    # --- layers
    "layer_k_zero": (lambda: MoELayer(D, D, E, 0), ValueError, ["k=0"]),
    "layer_k_above_E": (lambda: MoELayer(D, D, E, 9), ValueError, ["k=9"]),
    "layer_num_experts_string": (lambda: MoELayer(D, D, "4", 1), TypeError, ["num_experts", "'4'"]),
    "layer_unknown_dispatch": (lambda: MoELayer(D, D, E, 1, dispatch="fast"), ValueError, ["dispatch='fast'", "sorted"]),
    "layer_unknown_expert": (lambda: MoELayer(D, D, E, 1, expert="conv"), ValueError, ["expert='conv'", "swiglu"]),
    "layer_unknown_loss": (lambda: MoELayer(D, D, E, 1, losses={"balance": 0.1}), ValueError, ["losses", "'balance'"]),
    "layer_negative_loss_weight": (lambda: MoELayer(D, D, E, 1, losses={"switch": -1}), ValueError,
                                   ["losses['switch']=-1"]),
    "layer_losses_not_dict": (lambda: MoELayer(D, D, E, 1, losses=[("switch", 0.1)]), TypeError, ["losses", "list"]),
    "layer_capacity_with_custom_router": (lambda: MoELayer(D, D, E, 1, router=TopKRouter(D, E, 1),
                                                           capacity_factor=1.0), ValueError, ["capacity_factor=1.0"]),
    "layer_router_size_mismatch": (lambda: MoELayer(D, D, E, 1, router=TopKRouter(D, 3, 1)), ValueError,
                                   ["router.num_experts=3", "num_experts=4"]),
    "layer_input_width": (lambda: MoELayer(D, D, E, 1)(torch.zeros(2, 3, 7)), ValueError, ["x", "(2, 3, 7)"]),
    "layer_input_not_tensor": (lambda: MoELayer(D, D, E, 1)("tokens"), TypeError, ["x", "str"]),
    "layer_input_nan": (lambda: MoELayer(D, D, E, 1)(_nan_tokens()), ValueError, ["x", "NaN"]),
    "grouped_misaligned_widths": (_grouped_misaligned, ValueError, ["grouped", "d_model=6", "d_hidden=7"]),
    "soft_moe_slots_zero": (lambda: SoftMoELayer(D, D, E, slots_per_expert=0), ValueError, ["slots_per_expert=0"]),
    "soft_moe_input_width": (lambda: SoftMoELayer(D, D, E)(torch.zeros(3, 5)), ValueError, ["x", "(3, 5)"]),
    "moe_router_mismatch": (lambda: MoE([MLPExpert(D, 4, 3)] * 2, SoftmaxRouter(D, 3)), ValueError,
                            ["router.num_experts=3", "2 experts"]),
    "moe_unknown_combine": (lambda: MoE([MLPExpert(D, 4, 3)], SoftmaxRouter(D, 1), combine="mean"), ValueError,
                            ["combine='mean'", "probs"]),
    "moe_unknown_dispatch": (lambda: MoE([MLPExpert(D, 4, 3)], SoftmaxRouter(D, 1), dispatch="grouped"), ValueError,
                             ["dispatch='grouped'"]),
    "moe_experts_not_modules": (lambda: MoE([lambda x: x], SoftmaxRouter(D, 1)), TypeError, ["experts"]),
    "bank_unknown_kind": (lambda: ExpertBank(E, D, D, kind="conv"), ValueError, ["expert='conv'"]),
    "mlp_unknown_activation": (lambda: MLPExpert(D, D, activation="swish"), ValueError, ["activation='swish'"]),
    "mlp_input_width": (lambda: MLPExpert(D, 4)(torch.zeros(2, 5)), ValueError, ["width 5", "d_in=8"]),
    # --- losses and metrics
    "switch_loss_mask_shape": (lambda: switch_balance_loss(torch.rand(5, E), torch.ones(5, 3, dtype=torch.bool)),
                               ValueError, ["mask", "(5, 3)", "(5, 4)"]),
    "z_loss_rank_1": (lambda: z_loss(torch.zeros(4)), ValueError, ["logits", "(4,)"]),
    "activation_rates_labels_length": (lambda: activation_rates(torch.rand(5, E), torch.zeros(4, dtype=torch.long)),
                                       ValueError, ["groups", "(4,)", "(5,)"]),
    "specialization_labels_length": (lambda: specialization(torch.ones(5, E, dtype=torch.bool), [0, 1]),
                                     ValueError, ["labels", "(2,)", "(5,)"]),
    # --- schedules, runtime, training
    "k_per_epoch_empty": (lambda: k_per_epoch([]), ValueError, ["ks", "[]"]),
    "k_per_epoch_zero_entry": (lambda: k_per_epoch([3, 0]), ValueError, ["ks[1]=0"]),
    "annealing_start_zero": (lambda: temperature_annealing(0, 1.0, 10), ValueError, ["start=0"]),
    "annealing_unknown_kind": (lambda: temperature_annealing(2.0, 1.0, 10, kind="cosine"), ValueError,
                               ["kind='cosine'"]),
    "seed_negative": (lambda: seed_everything(-3), ValueError, ["seed=-3"]),
    "seed_float": (lambda: seed_everything(1.5), TypeError, ["seed", "1.5"]),
    "device_unknown": (lambda: device("tpu"), ValueError, ["prefer='tpu'"]),
    "fit_epochs_zero": (lambda: _fit(epochs=0), ValueError, ["epochs=0"]),
    "fit_batch_size_float": (lambda: _fit(batch_size=2.0), TypeError, ["batch_size", "2.0"]),
    "fit_lr_negative": (lambda: _fit(lr=-1e-3), ValueError, ["lr=-0.001"]),
    "fit_labels_wrong_length": (lambda: _fit(data=(X, Y[:4])), ValueError, ["train[1]", "4 rows", "5"]),
    "fit_train_not_tuple": (lambda: _fit(data=X), TypeError, ["train", "Tensor"]),
    "fit_early_stopping_without_test": (lambda: _fit(early_stopping=2), ValueError, ["early_stopping=2", "test=None"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_rejected_with_a_clear_message(name):
    make, exc, needles = CASES[name]
    with pytest.raises(exc) as info:
        make()
    assert type(info.value) in (ValueError, TypeError)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{name}: {needle!r} missing from message {msg!r}"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_finite_check_does_not_flag_a_sum_that_overflows():
    """check_finite first sums (one pass); a sum that overflows from finite values must not raise."""
    from tutorial_moe._validate import check_finite

    big = torch.full((4, 3), 3e38)
    check_finite(big, where="t")
    for bad in (float("inf"), float("-inf"), float("nan")):
        x = big.clone()
        x[2, 1] = bad
        with pytest.raises(ValueError, match="1 non-finite"):
            check_finite(x, where="t")
    check_finite(torch.arange(6).reshape(2, 3), where="t")  # integers are always finite


@pytest.mark.parametrize("router", ["topk", "oracle"])
def test_whole_network_moe_rejects_non_finite_input(router):
    from tutorial_moe import MLPExpert, MoE, OracleRouter

    r = TopKRouter(D, 2, 1) if router == "topk" else OracleRouter(2, assignment=[0, 1])
    moe = MoE([MLPExpert(D, 4, 3) for _ in range(2)], r)
    with pytest.raises(ValueError, match="NaN"):
        moe(_nan_tokens(), torch.zeros(len(_nan_tokens()), dtype=torch.long))
