"""The token-experiment helper: config, splits, training and scoring."""
from __future__ import annotations

import pytest
import torch

from tutorial_moe import HashRouter, MLPExpert, MoELayer, SoftMoELayer
from tutorial_moe.blocks import TokenGroups
from tutorial_moe.experiments.debugging import GradientMonitor
from tutorial_moe.experiments.token_runs import TokenConfig, TokenRun, score_token_model, train_token_model

TINY = TokenConfig(num_regimes=3, d_in=4, d_out=2, n_train=96, n_test=48, n_val=24, n_probe=16, d_model=8,
                   d_hidden=8, num_experts=3, batch_size=32, epochs=2)


def test_config_splits_are_disjoint_and_sized():
    train, val, test = TINY.data()
    assert (len(train), len(val), len(test)) == (96, 24, 48)
    ids = [set(s.index.tolist()) for s in (train, val, test)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert "3 regimes" in TINY.describe()
    assert TokenConfig.full().n_train > TokenConfig().n_train
    assert TINY.replace(epochs=5).epochs == 5


def test_train_moe_with_monitor_validation_and_extra_callback():
    train, val, test = TINY.data()
    gm = GradientMonitor(every=1)
    run = train_token_model(lambda: MoELayer(8, 8, 3, 1), TINY, train, test, val=val, name="moe", monitor_every=2,
                            callbacks=[gm], early_stopping=1)
    assert isinstance(run, TokenRun) and run.name == "moe"
    assert len(run.history.steps) <= 6 and all("test_loss" in e for e in run.history.epochs)
    assert run.monitor is not None and run.monitor.records[0]["step"] == 0
    assert len(gm.records) == len(run.history.steps)
    assert set(run.summary) >= {"specialization", "load_imbalance", "dropped", "entropy"}
    assert run.compute["expert_evals"] == pytest.approx(1.0)
    row = run.row()
    assert row["model"] == "moe" and "FLOPs/token" in row and row["test R2"] == run.r2


def test_same_seed_same_result_and_dense_model_has_no_routing():
    train, _, test = TINY.data()
    a = train_token_model(lambda: MLPExpert(8, 8, 8), TINY, train, test, seed=3)
    b = train_token_model(lambda: MLPExpert(8, 8, 8), TINY, train, test, seed=3)
    assert a.r2 == b.r2 and a.summary == {} and a.compute == {}
    assert "imbalance" not in a.row()


def test_hash_routing_by_ids_and_soft_moe_groups():
    train, _, test = TINY.data()
    hashed = train_token_model(lambda: MoELayer(8, 8, 3, 1, router=HashRouter(3), losses={}), TINY, train, test, ids=True)
    assert hashed.summary["entropy"] == pytest.approx(0.0, abs=1e-6)
    soft = train_token_model(lambda: TokenGroups(SoftMoELayer(8, 8, 3, slots_per_expert=2), 8), TINY, train, test)
    assert soft.compute["expert_evals"] == pytest.approx(3 * 2 / 8)
    assert soft.summary["dropped"] == 0.0


def test_prepare_runs_before_training_and_bad_ffn_is_rejected():
    train, _, test = TINY.data()
    seen = []
    train_token_model(lambda: MLPExpert(8, 8, 8), TINY, train, test, prepare=lambda m: seen.append(m.training))
    assert seen == [True]
    with pytest.raises(TypeError, match="ffn must be an nn.Module"):
        train_token_model(lambda: "mlp", TINY, train, test)


def test_score_token_model_routes_the_whole_split_at_once():
    train, _, test = TINY.data()
    run = train_token_model(lambda: MoELayer(8, 8, 3, 1, capacity_factor=1.0), TINY, train, test)
    scored = score_token_model(run.model, test)
    assert scored["r2"] == pytest.approx(run.r2)
    assert run.model.training  # scoring restores the mode
    with torch.no_grad():
        assert scored["summary"]["dropped"] == run.summary["dropped"]
