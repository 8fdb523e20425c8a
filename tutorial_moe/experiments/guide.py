"""Seed 002's techniques that chapter 10 runs as small experiments.

* :func:`continue_training` - train a :class:`TokenRun`'s model further (phases of a curriculum,
  fine-tuning after pruning or growth) and score it again.
* :func:`easy_first` - the tokens whose regime is clearest (a curriculum's first phase).
* :class:`DynamicCapacity` - a ``fit`` callback that moves the capacity factor towards a target
  share of dropped tokens.
* :func:`saved_bytes_per_token` - activation bytes autograd keeps for backward, per token, and the
  routing tensors' bytes per token, measured on a forward pass.
* :func:`inverse_sine` - a multimodal regression task (several right answers for one input) for
  the mixture-density head, and :func:`train_mdn` to fit one.
* :func:`batch_dependence` - how a token's experts change when the other tokens of its batch change.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_int, check_positive_float
from ..mixture_density import MixtureDensityNetwork
from ..moe import moe_modules
from ..runtime import seed_everything
from ..train import fit
from .tasks import RegimeSplit
from .token_runs import TokenConfig, TokenRun, score_token_model

__all__ = ["continue_training", "easy_first", "DynamicCapacity", "saved_bytes_per_token", "inverse_sine",
           "train_mdn", "batch_dependence"]


def continue_training(run: TokenRun, cfg: TokenConfig, train: RegimeSplit, test: RegimeSplit, *, epochs: int,
                      seed: int = 0, name: str | None = None, **fit_kwargs) -> TokenRun:
    """Train ``run.model`` (in place) for ``epochs`` more epochs on ``train`` with a fresh Adam, then
    score on ``test``; the new run's seconds add to the old one's."""
    check_int("epochs", epochs, low=1, where="continue_training")
    kwargs = {"lr": cfg.lr, "batch_size": cfg.batch_size, "loss_fn": F.mse_loss, "show_progress": False,
              "seed": seed}
    kwargs.update(fit_kwargs)
    t0 = time.perf_counter()
    history = fit(run.model, train.tensors(), None, epochs=epochs, **kwargs)
    seconds = run.seconds + time.perf_counter() - t0
    scored = score_token_model(run.model, test)
    return TokenRun(name or run.name, run.model, history, scored["r2"], scored.get("summary", {}),
                    scored.get("compute", {}), seconds)


def easy_first(split: RegimeSplit, centres: torch.Tensor, share: float = 0.5) -> RegimeSplit:
    """The ``share`` of ``split`` whose regime is clearest: the largest margin between the distance
    to the nearest other centre and the distance to the token's own centre."""
    if not 0 < share <= 1:
        raise ValueError(f"easy_first: share={share} must lie in (0, 1]")
    d = torch.cdist(split.x, centres)  # (N, R)
    own = d.gather(1, split.regime[:, None]).squeeze(1)
    other = d.scatter(1, split.regime[:, None], float("inf")).min(1).values
    n = max(1, int(round(share * len(split))))
    keep = torch.argsort(other - own, descending=True)[:n]
    keep = keep[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    return RegimeSplit(split.x[keep], split.y[keep], split.regime[keep], split.index[keep])


class DynamicCapacity:
    """``fit`` callback: after each step, multiply the capacity factor by ``rate`` if the last batch
    dropped more than ``target`` of its tokens, divide by it otherwise (within ``[low, high]``).

    ``history`` records (step, capacity factor, dropped share) per step.
    """

    def __init__(self, target: float = 0.01, rate: float = 1.05, low: float = 0.5, high: float = 4.0):
        if not 0 <= target < 1:
            raise ValueError(f"DynamicCapacity: target={target} must lie in [0, 1)")
        self.target = target
        self.rate = check_positive_float("rate", rate, where="DynamicCapacity")
        if self.rate <= 1:
            raise ValueError(f"DynamicCapacity: rate={rate} must be > 1")
        self.low = check_positive_float("low", low, where="DynamicCapacity")
        self.high = check_positive_float("high", high, where="DynamicCapacity")
        self.history: list[tuple[int, float, float]] = []

    def __call__(self, row: dict, model: nn.Module) -> None:
        for layer in moe_modules(model):
            router, routing = layer.router, layer.last_routing
            if getattr(router, "capacity_factor", None) is None or routing is None:
                continue
            dropped = float(routing.dropped.float().mean())
            cf = router.capacity_factor * (self.rate if dropped > self.target else 1 / self.rate)
            router.capacity_factor = min(self.high, max(self.low, cf))
            self.history.append((row["step"], router.capacity_factor, dropped))


def saved_bytes_per_token(layer: nn.Module, x: torch.Tensor) -> dict:
    """Bytes per token of one training forward of ``layer`` on ``x`` (T, d_model): ``saved`` is what
    autograd keeps for the backward (each storage counted once), ``routing`` the Routing tensors."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"saved_bytes_per_token: x must be (T, d_model), got {tuple(getattr(x, 'shape', ()))}")
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    layer.train()
    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    inputs = x.untyped_storage().nbytes()
    saved = sum(v for k, v in seen.items() if k != x.untyped_storage().data_ptr()) + inputs
    routing = layer.last_routing
    r_bytes = sum(t.numel() * t.element_size() for t in (routing.probs, routing.weights, routing.mask,
                                                          routing.indices, routing.logits) if t is not None)
    T = x.shape[0]
    return {"saved": saved / T, "routing": r_bytes / T}


def inverse_sine(n: int, seed: int = 0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), both (n, 1): y ~ U(0, 1), x = y + 0.3 sin(2 pi y) + noise; the task is to predict
    y from x, which has up to three right answers for x near the middle (Bishop, 1994)."""
    check_int("n", n, low=1, where="inverse_sine")
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, 1, generator=g)
    x = y + 0.3 * torch.sin(2 * math.pi * y) + noise * torch.randn(n, 1, generator=g)
    return x, y


def train_mdn(num_experts: int, train, test, steps: int = 600, lr: float = 1e-2, seed: int = 0,
              d_hidden: int = 24) -> dict:
    """Fit a :class:`MixtureDensityNetwork` with full-batch Adam; test NLL (nats per sample), the
    squared error of its mixture mean, and the model."""
    check_int("steps", steps, low=1, where="train_mdn")
    seed_everything(seed)
    model = MixtureDensityNetwork(train[0].shape[1], train[1].shape[1], num_experts, d_hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = model.nll(*train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    with torch.no_grad():
        nll = float(model.nll(*test))
        mse = float(F.mse_loss(model.mean(test[0]), test[1]))
    return {"nll": nll, "mse_of_mean": mse, "first_train_nll": first, "last_train_nll": loss.item(),
            "model": model}


@torch.no_grad()
def batch_dependence(layer: nn.Module, probe: torch.Tensor, others: list[torch.Tensor]) -> float:
    """Share of ``probe`` tokens whose set of experts differs between batches made of the probe plus
    ``others[0]`` and the probe plus each other ``others[i]`` (0 for a router that reads only the
    token itself)."""
    if len(others) < 2:
        raise ValueError("batch_dependence: others must hold at least two batches of other tokens")
    was = layer.training
    layer.eval()
    masks = []
    for other in others:
        layer(torch.cat([probe, other]))
        masks.append(layer.last_routing.mask[: len(probe)].clone())
    layer.train(was)
    changed = torch.zeros(len(probe), dtype=torch.bool)
    for m in masks[1:]:
        changed |= (m != masks[0]).any(1)
    return float(changed.float().mean())
