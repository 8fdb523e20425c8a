"""tutorial_moe.experiments.mixing: the competitive / cooperative toy of chapter 01."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_moe import MoE
from tutorial_moe.experiments.mixing import (
    mixing_summary,
    mixture_of_linear_experts,
    quadrant_task,
    run_mixing,
    train_mixture,
)


def test_quadrant_task_labels_follow_one_line_per_quadrant():
    x, y, q = quadrant_task(400, seed=3)
    assert x.shape == (400, 2) and y.shape == q.shape == (400,)
    assert x.abs().max() <= 1
    assert torch.equal(q, (x[:, 0] < 0).long() + 2 * (x[:, 1] < 0).long())
    # Hand check of quadrant 0 (angle pi/4, centre (0.5, 0.5)): label = x + y > 1.
    first = q == 0
    assert torch.equal(y[first], (x[first].sum(1) > 1).long())
    # Both labels occur in every quadrant: each quadrant's line splits it.
    for quadrant in range(4):
        assert set(y[q == quadrant].tolist()) == {0, 1}
    x2, y2, _ = quadrant_task(400, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_no_single_line_solves_the_task_but_the_quadrant_rules_do():
    x, y, q = quadrant_task(2000, seed=0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    linear_acc = (model(x).argmax(1) == y).float().mean().item()
    assert linear_acc < 0.85  # a line cannot follow four different boundaries


def test_same_seed_gives_the_same_initial_weights_for_both_rules():
    a = mixture_of_linear_experts("probs", 3, seed=5)
    b = mixture_of_linear_experts("logits", 3, seed=5)
    c = mixture_of_linear_experts("probs", 3, seed=6)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.combine == "probs" and b.combine == "logits" and a.num_experts == 3


def test_competitive_loss_is_the_mixture_nll_and_cooperative_the_blend_cross_entropy():
    x, y, _ = quadrant_task(50, seed=1)
    comp, coop = (mixture_of_linear_experts(c, 3, seed=2) for c in ("probs", "logits"))
    gates = comp.router(x).weights  # same weights in both models
    z = comp.expert_outputs(x)  # (E, N, 2)
    p_y = z.softmax(-1).gather(2, y.expand(3, -1).unsqueeze(-1)).squeeze(-1).t()  # (N, E)
    torch.testing.assert_close(F.cross_entropy(comp(x), y), -(gates * p_y).sum(1).log().mean())
    blend = (gates.t().unsqueeze(-1) * z).sum(0)
    torch.testing.assert_close(F.cross_entropy(coop(x), y), F.cross_entropy(blend, y))


def test_training_lowers_the_loss_and_summary_is_in_range():
    x, y, _ = quadrant_task(300, seed=0)
    model = mixture_of_linear_experts("probs", 4, seed=0)
    losses = train_mixture(model, x, y, steps=60, lr=0.05)
    assert len(losses) == 60 and losses[-1] < 0.8 * losses[0]
    s = mixing_summary(model, x, y)
    assert set(s) == {"mixture_accuracy", "top_expert_accuracy", "gated_expert_accuracy", "experts_per_input"}
    for key in ("mixture_accuracy", "top_expert_accuracy", "gated_expert_accuracy"):
        assert 0.0 <= s[key] <= 1.0
    assert 1.0 - 1e-6 <= s["experts_per_input"] <= 4.0 + 1e-6


def test_summary_oracle_on_a_hand_built_mixture():
    # Two experts that always answer class 0 and class 1; a gate that is one-hot on expert 0
    # for x > 0 and uniform otherwise.
    class Const(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return F.one_hot(torch.full((len(x),), self.c), 2).float() * 10

    class Gate(torch.nn.Module):
        def forward(self, x):
            return torch.where(x[:, :1] > 0, torch.tensor([[50.0, 0.0]]), torch.zeros(1, 2))

    from tutorial_moe import SoftmaxRouter

    model = MoE([Const(0), Const(1)], SoftmaxRouter(None, 2, gate=Gate()), combine="probs")
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    y = torch.tensor([0, 1])
    s = mixing_summary(model, x, y)
    assert s["top_expert_accuracy"] == pytest.approx(0.5)  # row 2's tie goes to expert 0: wrong
    assert s["gated_expert_accuracy"] == pytest.approx((1.0 + 0.5) / 2, abs=1e-6)
    assert s["experts_per_input"] == pytest.approx((1.0 + 2.0) / 2, abs=1e-6)


def test_run_mixing_pairs_both_rules_on_every_seed():
    runs = run_mixing([0, 1], n_train=100, n_test=100, steps=5)
    assert [(r.seed, r.combine) for r in runs] == [(0, "probs"), (0, "logits"), (1, "probs"), (1, "logits")]
    assert all(len(r.losses) == 5 and math.isfinite(r.losses[-1]) for r in runs)


@pytest.mark.parametrize("call,error,words", [
    (lambda: quadrant_task(0), ValueError, "n=0"),
    (lambda: quadrant_task(10, seed=-1), ValueError, "seed=-1"),
    (lambda: mixture_of_linear_experts("mean"), ValueError, "combine='mean'"),
    (lambda: mixture_of_linear_experts("probs", num_experts=0), ValueError, "num_experts=0"),
    (lambda: train_mixture(torch.nn.Linear(2, 2), torch.zeros(3, 2), torch.zeros(3).long()), TypeError, "MoE"),
    (lambda: train_mixture(mixture_of_linear_experts("probs"), torch.zeros(3, 2), torch.zeros(2).long()),
     ValueError, "3 rows"),
    (lambda: train_mixture(mixture_of_linear_experts("probs"), torch.zeros(3, 2), torch.zeros(3).long(), lr=0),
     ValueError, "lr=0"),
    (lambda: mixing_summary(torch.nn.Linear(2, 2), torch.zeros(3, 2), torch.zeros(3).long()), TypeError, "MoE"),
    (lambda: run_mixing([]), ValueError, "seeds"),
    (lambda: run_mixing([0, -1]), ValueError, "seeds"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
