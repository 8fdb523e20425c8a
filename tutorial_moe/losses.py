"""Auxiliary losses for routers. Each takes tensors from a :class:`~tutorial_moe.routing.Routing`.

Shapes: ``probs``, ``weights``, ``logits``, ``gates`` are (T, E); ``mask`` is (T, E) bool.
``gates`` means any (T, E) tensor whose rows sum to 1 (seed 004 uses the soft gate itself).

=====================  ===================================================  ==============================
loss                   formula                                              source
=====================  ===================================================  ==============================
switch_balance_loss    E * sum_i f_i P_i                                    Switch, arXiv 2101.03961
z_loss                 mean_t (logsumexp_e logits[t, e])^2                  ST-MoE, arXiv 2202.08906
importance_loss        cv^2(sum_t weights[t, :])                            Shazeer et al., arXiv 1701.06538
load_loss              cv^2(smooth load)                                    Shazeer et al., arXiv 1701.06538
batch_entropy_loss     -H(mean_t gates[t])            (minimise -> balance)  seed 004
sample_entropy_loss    mean_t H(gates[t])             (minimise -> sharpen)  seed 004
batch_variance_loss    Var_e(mean_t gates[t, e])      (minimise -> balance)  seed 004 (variance version)
sample_variance_loss   -mean_t Var_e(gates[t, e])     (minimise -> sharpen)  seed 004 (variance version)
diversity_loss         mean pairwise cosine similarity of expert outputs   seed 002
=====================  ===================================================  ==============================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_prob_matrix

__all__ = [
    "switch_balance_loss",
    "z_loss",
    "importance_loss",
    "load_loss",
    "cv_squared",
    "entropy",
    "batch_entropy_loss",
    "sample_entropy_loss",
    "batch_variance_loss",
    "sample_variance_loss",
    "diversity_loss",
    "threshold_loss",
    "LOSSES",
    "compute_aux_losses",
]


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation x.var(unbiased=False) / x.mean()^2 (0 for a constant vector)."""
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H(p) = -sum p ln p along ``dim``, with 0 ln 0 = 0 (and a finite gradient there)."""
    # torch.xlogy has the right value at 0 but a NaN gradient (0/0); a saturated softmax gives
    # exact zeros, so route those entries through a constant instead (their gradient is 0).
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))
    return -torch.where(positive, p * safe.log(), torch.zeros_like(p)).sum(dim)


def switch_balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i with f_i = share of assignments on expert i, P_i = mean router prob of i.

    1.0 at perfect balance (f_i = P_i = 1/E) and E when everything collapses onto one expert.
    Only P carries gradient (f comes from a hard top-k), which pushes probability off busy experts.
    """
    check_prob_matrix("probs", probs, where="switch_balance_loss")
    if mask.shape != probs.shape:
        raise ValueError(f"switch_balance_loss: mask shape {tuple(mask.shape)} != probs shape {tuple(probs.shape)}")
    E = probs.shape[1]
    m = mask.to(probs.dtype)
    f = m.sum(0) / m.sum().clamp_min(1)
    P = probs.mean(0)
    return E * (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2: keeps router logits small, hence numerically stable."""
    check_prob_matrix("logits", logits, where="z_loss")
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def importance_loss(weights: torch.Tensor) -> torch.Tensor:
    """cv^2 of each expert's total combine weight (importance) over the batch."""
    check_prob_matrix("weights", weights, where="importance_loss")
    return cv_squared(weights.sum(0))


def load_loss(load: torch.Tensor) -> torch.Tensor:
    """cv^2 of Shazeer's smooth load estimate (``routing.aux["load"]`` of a noisy TopKRouter)."""
    if load.dim() != 1:
        raise ValueError(f"load_loss: load must have shape (E,), got {tuple(load.shape)}")
    return cv_squared(load)


def batch_entropy_loss(gates: torch.Tensor) -> torch.Tensor:
    """-H(mean gate): minimising it spreads the batch over all experts (min -ln E at uniform use)."""
    check_prob_matrix("gates", gates, where="batch_entropy_loss")
    return -entropy(gates.mean(0))


def sample_entropy_loss(gates: torch.Tensor) -> torch.Tensor:
    """mean_t H(gates[t]): minimising it makes each sample pick one expert decisively (0 at one-hot)."""
    check_prob_matrix("gates", gates, where="sample_entropy_loss")
    return entropy(gates).mean()


def batch_variance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Var_e of the mean gate (population variance over experts).

    Sign convention: *minimised*. It is 0 when the batch uses every expert equally and grows as
    the mean gate concentrates, so minimising it balances - the variance analogue of maximising
    the batch entropy. (Seed 004 wrote "variance instead of entropy"; we keep each term's
    direction the same as in the entropy version, which is what makes it a balancing loss.)
    """
    check_prob_matrix("gates", gates, where="batch_variance_loss")
    return gates.mean(0).var(unbiased=False)


def sample_variance_loss(gates: torch.Tensor) -> torch.Tensor:
    """-mean_t Var_e(gates[t]).

    Sign convention: *minimised*. A one-hot gate row has the largest variance over experts and
    a uniform row has 0, so the minus sign makes minimising it sharpen each sample's choice -
    the variance analogue of minimising the sample entropy.
    """
    check_prob_matrix("gates", gates, where="sample_variance_loss")
    return -gates.var(dim=-1, unbiased=False).mean()


def diversity_loss(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity between experts' outputs on the same tokens.

    ``expert_outputs`` is (E, T, D). Minimising it pushes experts to compute different functions
    (seed 002's "expert diversity loss"); it is 0 for orthogonal outputs and 1 for identical ones.
    Cost: every expert must see the same tokens, so it is computed on the dense path.
    """
    if expert_outputs.dim() != 3:
        raise ValueError(f"diversity_loss: expert_outputs must be (E, T, D), got shape {tuple(expert_outputs.shape)}")
    E = expert_outputs.shape[0]
    if E < 2:
        return expert_outputs.sum() * 0
    z = F.normalize(expert_outputs.flatten(2).float(), dim=-1)  # (E, T, D)
    sim = torch.einsum("itd,jtd->ijt", z, z).mean(-1)  # (E, E)
    off = sim.sum() - sim.diagonal().sum()
    return off / (E * (E - 1))


def threshold_loss(active: torch.Tensor) -> torch.Tensor:
    """The expected number of experts per token from a ThresholdRouter (``routing.aux["active"]``)."""
    return active


#: name -> function of (routing, expert_outputs) used by layers configured with ``losses={name: weight}``.
LOSSES = {
    "switch": lambda r, y: switch_balance_loss(r.probs, r.mask),
    "z": lambda r, y: z_loss(r.logits),
    "importance": lambda r, y: importance_loss(r.weights),
    "load": lambda r, y: load_loss(r.aux["load"]) if "load" in r.aux else cv_squared(r.mask.sum(0)) * 0,
    "batch_entropy": lambda r, y: batch_entropy_loss(r.probs),
    "sample_entropy": lambda r, y: sample_entropy_loss(r.probs),
    "batch_variance": lambda r, y: batch_variance_loss(r.probs),
    "sample_variance": lambda r, y: sample_variance_loss(r.probs),
    # Seed 004 read literally ("variance instead of entropy", signs kept): maximise the batch
    # variance and minimise the sample variance - the opposite direction of the two above, so it
    # rewards a batch that uses one expert (chapter 07 tests whether this explains the seed's collapse).
    "neg_batch_variance": lambda r, y: -batch_variance_loss(r.probs),
    "neg_sample_variance": lambda r, y: -sample_variance_loss(r.probs),
    "diversity": lambda r, y: diversity_loss(y),
    "threshold": lambda r, y: threshold_loss(r.aux["active"]) if "active" in r.aux else r.probs.sum() * 0,
}


def check_loss_weights(losses, where: str) -> dict[str, float]:
    """Validate a ``{name: weight}`` mapping of auxiliary losses."""
    if losses is None:
        return {}
    if not isinstance(losses, dict):
        raise TypeError(f"{where}: losses must be a dict {{name: weight}}, got {type(losses).__name__}")
    out = {}
    for name, w in losses.items():
        if name not in LOSSES:
            raise ValueError(f"{where}: losses has unknown name {name!r}; choose from {sorted(LOSSES)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0) or w == float("inf"):
            raise ValueError(f"{where}: losses[{name!r}]={w!r} must be a finite number >= 0")
        out[name] = float(w)
    return out


def compute_aux_losses(routing, weights: dict[str, float], expert_outputs=None) -> dict[str, torch.Tensor]:
    """``{name: weight * loss}`` for every configured loss with weight > 0."""
    out = {}
    for name, w in weights.items():
        if w == 0:
            continue
        if name == "diversity" and expert_outputs is None:
            continue
        out[name] = w * LOSSES[name](routing, expert_outputs)
    return out
