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
cross_sample_variance  mean_e Var_t(gates[t, e])      (maximise -> route     seed 004 (variance across
                                                      samples apart)         samples, second reading)
diversity_loss         mean pairwise cosine similarity of expert outputs   seed 002
=====================  ===================================================  ==============================

Every balance signal reads the router's choices *before* capacity (``routing.chosen_mask`` and
``routing.gates``): once every expert is full the kept load is uniform and would say nothing.
Means over tokens are sums divided by max(T, 1), so an empty batch gives 0 (with a graph), not NaN.
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
    "cross_sample_variance",
    "diversity_loss",
    "threshold_loss",
    "LOSSES",
    "compute_aux_losses",
    "check_loss_weights",
    "check_losses_for_router",
]


def _token_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the first (token) dimension; 0 for no tokens (``x.mean(0)`` would be NaN)."""
    return x.sum(0) / max(x.shape[0], 1)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation x.var(unbiased=False) / x.mean()^2 (0 for a constant vector)."""
    x = x if x.dtype == torch.float64 else x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H(p) = -sum p ln p along ``dim``, with 0 ln 0 = 0 (and a finite gradient there)."""
    # torch.xlogy has the right value at 0 but a NaN gradient (0/0); a saturated softmax gives
    # exact zeros, so route those entries through a constant instead (their gradient is 0).
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))
    return -torch.where(positive, p * safe.log(), torch.zeros_like(p)).sum(dim)


def switch_balance_loss(probs: torch.Tensor, mask: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """E * sum_i f_i * P_i with f_i = share of assignments on expert i, P_i = mean router prob of i.

    ``mask`` is what the router *chose* (before capacity drops anything): Switch, GShard and
    DeepSeek count the load that way, so a full expert still looks busy. f_i is the count on
    expert i divided by T * k (``k`` given) or by the number of assignments in ``mask``.
    1.0 at perfect balance (f_i = P_i = 1/E) and E when everything collapses onto one expert.
    Only P carries gradient (f comes from a hard top-k), which pushes probability off busy experts.

    Deviation: with k > 1 every one of a token's k choices counts in f, as DeepSeekMoE does
    (arXiv 2401.06066); GShard (arXiv 2006.16668) counts only each token's first choice.
    """
    check_prob_matrix("probs", probs, where="switch_balance_loss")
    if mask.shape != probs.shape:
        raise ValueError(f"switch_balance_loss: mask shape {tuple(mask.shape)} != probs shape {tuple(probs.shape)}")
    E = probs.shape[1]
    m = mask.to(probs.dtype)
    total = m.sum() if k is None else m.new_tensor(float(probs.shape[0] * k))
    f = m.sum(0) / total.clamp_min(1)
    P = _token_mean(probs)
    return E * (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2: keeps router logits small, hence numerically stable.

    ``logits`` must be pre-softmax scores; for log-probabilities logsumexp is 0 and so is the loss."""
    check_prob_matrix("logits", logits, where="z_loss")
    return _token_mean(torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits, dim=-1).pow(2))


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
    return -entropy(_token_mean(gates))


def sample_entropy_loss(gates: torch.Tensor) -> torch.Tensor:
    """mean_t H(gates[t]): minimising it makes each sample pick one expert decisively (0 at one-hot)."""
    check_prob_matrix("gates", gates, where="sample_entropy_loss")
    return _token_mean(entropy(gates))


def batch_variance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Var_e of the mean gate (population variance over experts).

    Sign convention: *minimised*. It is 0 when the batch uses every expert equally and grows as
    the mean gate concentrates, so minimising it balances - the variance analogue of maximising
    the batch entropy. (Seed 004 wrote "variance instead of entropy"; we keep each term's
    direction the same as in the entropy version, which is what makes it a balancing loss.)
    """
    check_prob_matrix("gates", gates, where="batch_variance_loss")
    return _token_mean(gates).var(unbiased=False)


def sample_variance_loss(gates: torch.Tensor) -> torch.Tensor:
    """-mean_t Var_e(gates[t]).

    Sign convention: *minimised*. A one-hot gate row has the largest variance over experts and
    a uniform row has 0, so the minus sign makes minimising it sharpen each sample's choice -
    the variance analogue of minimising the sample entropy.
    """
    check_prob_matrix("gates", gates, where="sample_variance_loss")
    # No rows: var() would warn about zero degrees of freedom; an empty (0,) sum keeps the graph.
    per_token = gates.var(dim=-1, unbiased=False) if gates.shape[0] else gates.sum(-1)
    return -_token_mean(per_token)


def cross_sample_variance(gates: torch.Tensor) -> torch.Tensor:
    """mean_e Var_t(gates[t, e]): how differently the batch's samples are routed.

    The second reading of seed 004's "batch variance": the variance *across the samples* of
    the batch, per expert, rather than over the experts of the batch's mean gate. It is 0 when
    every sample gets the same gate (whether balanced or collapsed) and, for two experts, at
    most 1/4, reached when half the batch goes wholly to each expert: a balanced separation.
    Returned as a statistic; the seed's sign (maximised, like the batch entropy) is the loss
    ``"neg_cross_sample_variance"``.
    """
    check_prob_matrix("gates", gates, where="cross_sample_variance")
    if gates.shape[0] == 0:
        return gates.sum() * 0  # no samples: 0 with a graph, as the other losses
    return gates.var(dim=0, unbiased=False).mean()


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


def _z_of(routing) -> torch.Tensor:
    if not routing.has_logits:
        raise ValueError("z loss: this routing's logits are not pre-softmax scores (log-probabilities or "
                         "constants), so logsumexp is 0 and the loss would be a silent 0; drop 'z' from losses")
    return z_loss(routing.logits)


#: name -> function of (routing, expert_outputs) used by layers configured with ``losses={name: weight}``.
LOSSES = {
    "switch": lambda r, y: switch_balance_loss(r.probs, r.chosen_mask, r.experts_per_token),
    "z": lambda r, y: _z_of(r),
    "importance": lambda r, y: importance_loss(r.gates),
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
    # The other reading of the seed's batch variance (across the batch's samples), sign kept.
    "neg_cross_sample_variance": lambda r, y: -cross_sample_variance(r.probs),
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


def check_losses_for_router(losses: dict[str, float], router, where: str, *, has_logits: bool | None = None,
                            routes_all: bool | None = None) -> None:
    """Refuse loss settings that cannot work with ``router`` (ValueError naming ``losses``).

    * ``z`` needs real pre-softmax logits (not a hierarchical router's log-probabilities, Soft
      MoE's shares or a fixed router's zeros): otherwise it is a silent 0;
    * ``switch`` on a router that sends every token to every expert, or that gives every expert
      the same load by construction (expert choice), is the constant 1;
    * ``load`` needs a noisy ``TopKRouter`` (its smooth load estimate); otherwise it is 0.

    ``router`` may be None (Soft MoE): then ``has_logits`` and ``routes_all`` say what it is.
    """
    active = {name for name, w in losses.items() if w > 0}
    if has_logits is None:
        has_logits = getattr(router, "has_logits", True)
    if routes_all is None:
        routes_all = getattr(router, "routes_all", False)
    what = type(router).__name__ if router is not None else where
    if "z" in active and not has_logits:
        raise ValueError(f"{where}: losses has 'z', but {what}'s logits are not pre-softmax scores, so the z-loss "
                         f"would always be 0; drop 'z' from losses")
    if "switch" in active and routes_all:
        raise ValueError(f"{where}: losses has 'switch', but {what} sends every token to every expert, so the "
                         f"Switch loss is the constant 1; use 'importance' or 'batch_entropy' instead")
    if "switch" in active and getattr(router, "equal_load", False):
        raise ValueError(f"{where}: losses has 'switch', but {what} gives every expert the same number of tokens "
                         f"by construction, so the Switch loss is the constant 1; drop it")
    if "load" in active and not getattr(router, "noisy", False):
        raise ValueError(f"{where}: losses has 'load', which needs a noisy TopKRouter (its smooth load estimate); "
                         f"{what} is not noisy, so the loss would be 0: use noisy=True or another loss")


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
