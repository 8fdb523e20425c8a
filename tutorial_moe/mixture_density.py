"""A mixture-density network whose mixture components are the experts (Bishop, 1994).

For an input x the gate gives mixing weights pi(x) over E experts, and expert e gives a Gaussian
N(mu_e(x), sigma_e(x)^2) over the target. The model's density is the mixture

    p(y | x) = sum_e pi_e(x) N(y; mu_e(x), sigma_e(x)^2),

trained by its negative log-likelihood. It is the competitive mixture of chapter 01 applied to a
continuous target: on a multimodal regression task (several right answers for one x) it can put
one expert on each branch, where a model trained on the squared error predicts their average.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_int

__all__ = ["MixtureDensityNetwork", "mixture_nll"]


def mixture_nll(log_pi: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of targets y (N, d) under the mixture (log_pi (N, E),
    mu and log_sigma (N, E, d), diagonal Gaussians); computed with logsumexp for stability."""
    if log_pi.dim() != 2 or mu.shape != log_sigma.shape or mu.shape[:2] != log_pi.shape:
        raise ValueError(f"mixture_nll: shapes log_pi {tuple(log_pi.shape)}, mu {tuple(mu.shape)}, "
                         f"log_sigma {tuple(log_sigma.shape)} do not match (N, E) and (N, E, d)")
    if y.dim() != 2 or y.shape[0] != mu.shape[0] or y.shape[1] != mu.shape[2]:
        raise ValueError(f"mixture_nll: y must have shape ({mu.shape[0]}, {mu.shape[2]}), got {tuple(y.shape)}")
    z = (y[:, None, :] - mu) / log_sigma.exp()
    log_normal = (-0.5 * z.pow(2) - log_sigma - 0.5 * math.log(2 * math.pi)).sum(-1)  # (N, E)
    return -torch.logsumexp(log_pi + log_normal, dim=1).mean()


class MixtureDensityNetwork(nn.Module):
    """E Gaussian experts and a softmax gate, each a small MLP reading x (N, d_in).

    ``forward`` returns (log_pi (N, E), mu (N, E, d_out), log_sigma (N, E, d_out));
    :meth:`nll` is the training loss, :meth:`mean` the mixture's mean (what an MSE model
    would predict), :meth:`mode` the mean of the most probable component.
    """

    def __init__(self, d_in: int, d_out: int, num_experts: int, d_hidden: int = 32):
        super().__init__()
        where = "MixtureDensityNetwork"
        self.d_in = check_int("d_in", d_in, low=1, where=where)
        self.d_out = check_int("d_out", d_out, low=1, where=where)
        self.num_experts = check_int("num_experts", num_experts, low=1, where=where)
        check_int("d_hidden", d_hidden, low=1, where=where)
        E = num_experts
        self.gate = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, E))
        # One hidden layer per expert, stacked: expert e maps x to (mu_e, log_sigma_e).
        self.w1 = nn.Parameter(torch.randn(E, d_in, d_hidden) / math.sqrt(d_in))
        self.b1 = nn.Parameter(torch.randn(E, d_hidden))
        self.w2 = nn.Parameter(torch.randn(E, d_hidden, 2 * d_out) / math.sqrt(d_hidden))
        self.b2 = nn.Parameter(torch.zeros(E, 2 * d_out))

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"MixtureDensityNetwork: x must have shape (N, {self.d_in}), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        log_pi = F.log_softmax(self.gate(x), dim=-1)
        h = torch.tanh(torch.einsum("nd,edh->neh", x, self.w1) + self.b1)
        out = torch.einsum("neh,eho->neo", h, self.w2) + self.b2
        mu, log_sigma = out.split(self.d_out, dim=-1)
        return log_pi, mu, log_sigma.clamp(-7.0, 5.0)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mixture_nll(*self(x), y)

    @torch.no_grad()
    def mean(self, x: torch.Tensor) -> torch.Tensor:
        log_pi, mu, _ = self(x)
        return (log_pi.exp()[..., None] * mu).sum(1)

    @torch.no_grad()
    def mode(self, x: torch.Tensor) -> torch.Tensor:
        log_pi, mu, _ = self(x)
        return mu[torch.arange(len(x)), log_pi.argmax(1)]
