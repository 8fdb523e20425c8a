"""Token models: the residual block, Soft MoE grouping, parameter accounting; fit's stop_on option."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tutorial_moe import HashRouter, MLPExpert, MoELayer, SoftMoELayer, TopKRouter
from tutorial_moe.blocks import ResidualBlock, TokenGroups, TokenRegressor, active_parameters, dense_hidden_matching
from tutorial_moe.moe import moe_modules, total_aux_loss
from tutorial_moe.train import collect_routing, fit


def test_residual_block_is_x_plus_ffn_of_layernorm():
    ffn = MLPExpert(6, 10, 6)
    block = ResidualBlock(6, ffn)
    x = torch.randn(9, 6)
    torch.testing.assert_close(block(x), x + ffn(nn.functional.layer_norm(x, (6,))))


def test_dropped_tokens_pass_through_the_residual_block_unchanged():
    layer = MoELayer(8, 16, 4, 1, capacity_factor=0.25)  # capacity ceil(0.25 * 32 / 4) = 2 per expert
    block = ResidualBlock(8, layer)
    x = torch.randn(32, 8)
    out = block(x)
    dropped = layer.last_routing.dropped
    assert dropped.sum() >= 32 - 4 * 2
    torch.testing.assert_close(out[dropped], x[dropped])
    assert not torch.allclose(out[~dropped], x[~dropped])


def test_ids_reach_a_router_that_needs_them():
    model = TokenRegressor(5, 8, 2, MoELayer(8, 8, 4, 1, router=HashRouter(4), losses={}))
    x, ids = torch.randn(10, 5), torch.arange(10)
    out = model(x, ids)
    assert out.shape == (10, 2)
    assert torch.equal(model.ffn.last_routing.indices.squeeze(1), HashRouter(4).expert_of(ids))


def test_token_groups_equal_running_each_group_alone_and_merge_routing():
    soft = SoftMoELayer(6, 8, 3, slots_per_expert=2)
    wrapped = TokenGroups(soft, 4)
    x = torch.randn(10, 6)  # two full groups and a remainder of 2
    out = wrapped(x)
    expected = torch.cat([soft(x[0:4]), soft(x[4:8]), soft(x[8:10])])
    wrapped(x)  # restore the merged routing after the manual calls
    torch.testing.assert_close(out, expected)
    assert soft.last_routing.mask.shape == (10, 3)
    model = TokenRegressor(4, 6, 2, wrapped)
    assert moe_modules(model) == [soft]  # found once: its aux loss is not counted twice
    assert wrapped.expert_evaluations_per_token() == pytest.approx(3 * 2 / 4)


def test_token_groups_train_with_fit_and_collect_routing():
    model = TokenRegressor(4, 6, 2, TokenGroups(SoftMoELayer(6, 8, 3), 4))
    x, y = torch.randn(24, 4), torch.randn(24, 2)
    hist = fit(model, (x, y), epochs=1, batch_size=12, loss_fn=F.mse_loss, show_progress=False)
    assert len(hist.steps) == 2
    assert collect_routing(model, x).mask.shape == (24, 3)
    assert float(total_aux_loss(model)) == 0.0


def test_token_regressor_rejects_wrong_width():
    model = TokenRegressor(4, 6, 2, MLPExpert(6, 8, 6))
    with pytest.raises(ValueError, match=r"x must have shape \(T, 4\)"):
        model(torch.randn(3, 5))
    with pytest.raises(TypeError, match="ffn must be an nn.Module"):
        ResidualBlock(6, "mlp")


def test_active_parameters_counts_k_experts_of_the_bank():
    model = TokenRegressor(4, 6, 2, MoELayer(6, 10, 5, 2))
    total = sum(p.numel() for p in model.parameters())
    bank = sum(p.numel() for p in model.ffn.experts.parameters())
    assert active_parameters(model, 5) == total
    assert active_parameters(model, 2) == total - bank + 2 * bank // 5
    dense = TokenRegressor(4, 6, 2, MLPExpert(6, 10, 6))
    assert active_parameters(dense, 3) == sum(p.numel() for p in dense.parameters())  # no bank: k is irrelevant
    with pytest.raises(ValueError, match="experts_per_token"):
        active_parameters(model, -1)


@pytest.mark.parametrize("target", [500, 1234, 3172, 9000])
def test_dense_hidden_matching_is_the_smallest_width_reaching_the_target(target):
    d_in, d, d_out = 16, 32, 4
    h = dense_hidden_matching(target, d_in, d, d_out)
    count = lambda w: sum(p.numel() for p in TokenRegressor(d_in, d, d_out, MLPExpert(d, w, d)).parameters())  # noqa: E731
    assert count(h) >= target
    assert h == 1 or count(h - 1) < target


def test_fit_early_stopping_on_test_loss_for_regression():
    torch.manual_seed(0)
    x = torch.randn(64, 3); y = x @ torch.randn(3, 2)
    model = TokenRegressor(3, 8, 2, MoELayer(8, 8, 2, 1, router=TopKRouter(8, 2, 1, normalize=False)))
    hist = fit(model, (x, y), (x, y), epochs=30, lr=0.05, batch_size=64, loss_fn=F.mse_loss, early_stopping=2,
               stop_on="test_loss", show_progress=False)
    losses = [e["test_loss"] for e in hist.epochs]
    assert hist.best_epoch == min(range(len(losses)), key=losses.__getitem__)
    # The restored weights are the best epoch's: evaluating again gives its loss.
    with torch.no_grad():
        assert float(F.mse_loss(model(x), y)) == pytest.approx(losses[hist.best_epoch], rel=1e-4)
    with pytest.raises(ValueError, match="stop_on"):
        fit(model, (x, y), (x, y), stop_on="r2", show_progress=False)
