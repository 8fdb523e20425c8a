"""Chapter 10's guide experiments: their helpers on small shapes."""
import pytest
import torch

from tutorial_moe import ExpertChoiceRouter, MoELayer
from tutorial_moe.experiments.guide import (
    DynamicCapacity,
    batch_dependence,
    easy_first,
    inverse_sine,
    saved_bytes_per_token,
    train_mdn,
)
from tutorial_moe.experiments.tasks import MixtureOfRegimes


def test_easy_first_keeps_the_clearest_tokens():
    task = MixtureOfRegimes(4, 6, 2, seed=0)
    split = task.sample(200)
    easy = easy_first(split, task.centres, share=0.25)
    assert len(easy) == 50
    d = torch.cdist(split.x, task.centres)
    own = d.gather(1, split.regime[:, None]).squeeze(1)
    margin = d.scatter(1, split.regime[:, None], float("inf")).min(1).values - own
    threshold = margin.sort(descending=True).values[49]
    d2 = torch.cdist(easy.x, task.centres)
    own2 = d2.gather(1, easy.regime[:, None]).squeeze(1)
    margin2 = d2.scatter(1, easy.regime[:, None], float("inf")).min(1).values - own2
    assert (margin2 >= threshold - 1e-6).all()
    with pytest.raises(ValueError, match="share"):
        easy_first(split, task.centres, share=0)


def test_token_ids_read_the_input_signs():
    split = MixtureOfRegimes(4, 6, 2).sample(30)
    ids = split.token_ids(bits=3)
    expect = (split.x[:, 0] > 0).long() + 2 * (split.x[:, 1] > 0).long() + 4 * (split.x[:, 2] > 0).long()
    assert torch.equal(ids, expect)
    assert torch.equal(split.with_token_ids(3).index, expect)


def test_dynamic_capacity_moves_towards_target():
    torch.manual_seed(0)
    layer = MoELayer(8, 8, 4, 1, capacity_factor=0.5, losses={})
    model = torch.nn.Sequential(layer)
    cb = DynamicCapacity(target=0.0, rate=1.1)
    layer(torch.randn(64, 8))  # c = 0.5 must drop tokens
    cb({"step": 1}, model)
    assert layer.router.capacity_factor == pytest.approx(0.55)
    with pytest.raises(ValueError, match="rate"):
        DynamicCapacity(rate=1.0)


def test_memory_grows_with_k():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    small = saved_bytes_per_token(MoELayer(8, 16, 4, 1, losses={}), x)
    large = saved_bytes_per_token(MoELayer(8, 16, 4, 4, losses={}), x)
    assert large["saved"] > small["saved"] > 0
    assert large["routing"] > 0


def test_expert_choice_depends_on_the_batch_and_top_k_does_not():
    torch.manual_seed(0)
    probe, others = torch.randn(16, 8), [torch.randn(48, 8) for _ in range(4)]
    topk = MoELayer(8, 8, 4, 1, losses={})
    assert batch_dependence(topk, probe, others) == 0.0
    ec = MoELayer(8, 8, 4, 1, router=ExpertChoiceRouter(8, 4, capacity_factor=1.0), losses={})
    assert batch_dependence(ec, probe, others) > 0.0


def test_mdn_training_lowers_the_nll():
    train, test = inverse_sine(128, seed=0), inverse_sine(128, seed=1)
    out = train_mdn(2, train, test, steps=60, seed=0)
    assert out["last_train_nll"] < out["first_train_nll"]
