"""Two ways to mix experts (chapter 01): competitive and cooperative, on a 2-D toy task.

* competitive (Jacobs, Jordan, Nowlan and Hinton, 1991; seed 000's "sum the weighted
  probabilities"): the model's distribution is the gate-weighted mixture of the experts'
  distributions, ``MoE(combine="probs")``; its negative log-likelihood is
  ``-log sum_i g_i(x) p_i(y | x)``.
* cooperative (seed 004's ``softmax(sum_i g_i NN_i)``, and every transformer MoE): the experts'
  logits are summed with the gate's weights first, ``MoE(combine="logits")``.

:func:`quadrant_task` makes the data: points in the square [-1, 1]^2 whose label follows a
different straight boundary in each quadrant, so one linear expert per quadrant can solve it and
no single linear model can. :func:`mixture_of_linear_experts` builds the model (E linear experts,
a small tanh gate), :func:`train_mixture` trains it full-batch, :func:`mixing_summary` measures
how the trained mixture uses its experts, and :func:`run_mixing` does all of it for paired seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_choice, check_int, check_positive_float
from ..moe import MoE
from ..routing import SoftmaxRouter
from ..runtime import progress

__all__ = [
    "COMBINES",
    "quadrant_task",
    "mixture_of_linear_experts",
    "train_mixture",
    "mixing_summary",
    "MixingRun",
    "run_mixing",
]

#: The two combine rules of :class:`tutorial_moe.MoE`, competitive first.
COMBINES = ("probs", "logits")

# The boundary's direction in each quadrant (0: x>0,y>0; 1: x<0,y>0; 2: x>0,y<0; 3: x<0,y<0).
# Four different directions, so no two quadrants share a rule.
_ANGLES = (0.25, 0.75, 1.25, 1.75)


def quadrant_task(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, quadrant)``: n points uniform in [-1, 1]^2, binary labels, quadrant ids 0..3.

    In each quadrant the label says on which side of a line through the quadrant's centre the
    point lies; the line's direction differs from quadrant to quadrant (``_ANGLES``, in units of pi).
    """
    check_int("n", n, low=1, where="quadrant_task")
    check_int("seed", seed, low=0, where="quadrant_task")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    left, below = x[:, 0] < 0, x[:, 1] < 0
    quadrant = left.long() + 2 * below.long()
    centre = torch.stack([torch.where(left, -0.5, 0.5), torch.where(below, -0.5, 0.5)], 1)
    angle = torch.tensor(_ANGLES)[quadrant] * math.pi
    normal = torch.stack([angle.cos(), angle.sin()], 1)
    y = (((x - centre) * normal).sum(1) > 0).long()
    return x, y, quadrant


def mixture_of_linear_experts(combine: str, num_experts: int = 4, seed: int = 0, gate_hidden: int = 16) -> MoE:
    """E linear experts (2 -> 2 logits) and a gate (2 -> ``gate_hidden`` tanh -> E) in an ``MoE``.

    The same ``seed`` gives the same initial weights for either ``combine``, so the two rules
    can be compared on paired runs.
    """
    where = "mixture_of_linear_experts"
    check_choice("combine", combine, COMBINES, where=where)
    check_int("num_experts", num_experts, low=1, where=where)
    check_int("seed", seed, low=0, where=where)
    check_int("gate_hidden", gate_hidden, low=1, where=where)
    g = torch.Generator().manual_seed(seed)
    experts = [nn.Linear(2, 2) for _ in range(num_experts)]
    gate = nn.Sequential(nn.Linear(2, gate_hidden), nn.Tanh(), nn.Linear(gate_hidden, num_experts))
    with torch.no_grad():  # re-draw every weight from the seed's own generator (nn.Linear's ranges)
        for layer in [*experts, gate[0], gate[2]]:
            bound = 1 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
    return MoE(experts, SoftmaxRouter(None, num_experts, gate=gate), dispatch="dense", combine=combine)


def train_mixture(model: MoE, x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 0.03) -> list[float]:
    """Full-batch Adam on ``F.cross_entropy(model(x), y)``; returns the loss of every step.

    For ``combine="probs"`` the model returns log-probabilities of the mixture, so this loss is
    the mixture's negative log-likelihood (the competitive loss); for ``"logits"`` it is the
    cross-entropy of the softmax of the blended logits (the cooperative loss).
    """
    where = "train_mixture"
    if not isinstance(model, MoE):
        raise TypeError(f"{where}: model must be a tutorial_moe.MoE, got {type(model).__name__}")
    check_int("steps", steps, low=1, where=where)
    check_positive_float("lr", lr, where=where)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{where}: x has {x.shape[0]} rows but y has {y.shape[0]}; they must match")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def mixing_summary(model: MoE, x: torch.Tensor, y: torch.Tensor) -> dict:
    """How a trained mixture uses its experts on ``(x, y)``.

    * ``mixture_accuracy``: the model's own prediction;
    * ``top_expert_accuracy``: only each input's highest-weighted expert, alone;
    * ``gated_expert_accuracy``: sum_i g_i(x) [expert i alone is right], averaged over inputs:
      the accuracy of one expert drawn at random with the gate's probabilities;
    * ``experts_per_input``: exp(entropy of the gate), averaged over inputs: 1 when each input
      uses one expert, E when the gate is uniform.
    """
    if not isinstance(model, MoE):
        raise TypeError(f"mixing_summary: model must be a tutorial_moe.MoE, got {type(model).__name__}")
    model.eval()
    out = model(x)
    gates = model.last_routing.weights  # (N, E)
    alone_right = (model.expert_outputs(x).argmax(-1) == y).float().t()  # (N, E)
    top = gates.argmax(1, keepdim=True)
    safe = gates.clamp_min(1e-30)
    entropy = -(gates * safe.log()).sum(1)
    return {
        "mixture_accuracy": (out.argmax(1) == y).float().mean().item(),
        "top_expert_accuracy": alone_right.gather(1, top).mean().item(),
        "gated_expert_accuracy": (gates * alone_right).sum(1).mean().item(),
        "experts_per_input": entropy.exp().mean().item(),
    }


@dataclass
class MixingRun:
    """One trained mixture: its settings, summary on the test points, final model and loss curve."""

    combine: str
    seed: int
    summary: dict
    model: MoE = field(repr=False)
    losses: list = field(repr=False, default_factory=list)


def run_mixing(seeds, num_experts: int = 4, n_train: int = 1000, n_test: int = 2000, steps: int = 300,
               lr: float = 0.03) -> list[MixingRun]:
    """Both combine rules on every seed (paired: same data and initial weights per seed).

    Seed s trains on ``quadrant_task(n_train, s)`` and is measured on ``quadrant_task(n_test,
    10_000 + s)``, fresh points from the same task.
    """
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"run_mixing: seeds must be a non-empty list of ints >= 0, got {seeds!r}")
    check_int("n_train", n_train, low=1, where="run_mixing")
    check_int("n_test", n_test, low=1, where="run_mixing")
    runs = []
    for seed, combine in progress([(s, c) for s in seeds for c in COMBINES], desc="mixtures"):
        x, y, _ = quadrant_task(n_train, seed)
        x_test, y_test, _ = quadrant_task(n_test, 10_000 + seed)
        model = mixture_of_linear_experts(combine, num_experts, seed)
        losses = train_mixture(model, x, y, steps=steps, lr=lr)
        runs.append(MixingRun(combine, seed, mixing_summary(model, x_test, y_test), model, losses))
    return runs
