"""What to watch while an MoE trains (seed 002's monitoring list), as plain tensor functions.

``mask`` (T, E) bool, ``probs``/``gates`` (T, E) rows summing to 1, ``labels``/``groups`` (T,) ints.
"""
from __future__ import annotations

import torch

from ._validate import check_labels, check_prob_matrix
from .losses import entropy

__all__ = [
    "utilization",
    "routing_entropy",
    "activation_rates",
    "specialization",
    "load_imbalance",
    "dropped_fraction",
    "collapse_report",
    "routing_changes",
]


def _check_mask(mask, where):
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"{where}: mask must be a (tokens, experts) tensor, got {getattr(mask, 'shape', type(mask))}")
    return mask.bool()


def utilization(mask: torch.Tensor) -> torch.Tensor:
    """(E,) share of all assignments that went to each expert (sums to 1; zeros if nothing routed)."""
    m = _check_mask(mask, "utilization").float()
    return m.sum(0) / m.sum().clamp_min(1)


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the router distribution, in nats (0 = decisive, ln E = undecided)."""
    check_prob_matrix("probs", probs, where="routing_entropy")
    return entropy(probs.float()).mean()


def activation_rates(gates: torch.Tensor, groups, num_groups: int | None = None) -> torch.Tensor:
    """(G, E) mean gate value of each expert within each group (seed 004's activation-rate table).

    A group with no samples gets a row of NaN, so an empty cell is never mistaken for 0.
    """
    check_prob_matrix("gates", gates, where="activation_rates")
    groups = check_labels(groups, gates.shape[0], where="activation_rates", name="groups").to(gates.device)
    G = int(groups.max().item()) + 1 if num_groups is None else num_groups
    if groups.numel() and groups.max().item() >= G:
        raise ValueError(f"activation_rates: groups has value {groups.max().item()} but num_groups={G}")
    sums = torch.zeros(G, gates.shape[1], dtype=torch.float64, device=gates.device).index_add_(0, groups, gates.double())
    counts = torch.bincount(groups, minlength=G).double().unsqueeze(1)
    return (sums / counts).float()  # 0/0 -> NaN for empty groups


def specialization(mask: torch.Tensor, labels) -> float:
    """Normalised mutual information between expert and label over routed pairs, in [0, 1].

    Each (token, expert) assignment counts once with its token's label. 1 means the expert tells
    you the label exactly (and vice versa); 0 means routing ignores the label. Normalised by the
    mean of the two entropies (scikit-learn's default "arithmetic" NMI).
    """
    m = _check_mask(mask, "specialization").double()
    labels = check_labels(labels, m.shape[0], where="specialization").to(m.device)
    L = int(labels.max().item()) + 1 if labels.numel() else 1
    onehot = torch.nn.functional.one_hot(labels, L).double()  # (T, L)
    joint = m.t() @ onehot  # (E, L) counts
    n = joint.sum()
    if n == 0:
        return 0.0
    p = joint / n
    pe, pl = p.sum(1), p.sum(0)
    h_e, h_l = entropy(pe), entropy(pl)
    mi = (torch.xlogy(p, p).sum() - torch.xlogy(pe, pe).sum() - torch.xlogy(pl, pl).sum())
    denom = (h_e + h_l) / 2
    if denom <= 1e-12:
        return 0.0
    return float((mi / denom).clamp(0, 1))


def load_imbalance(mask: torch.Tensor) -> float:
    """max load / mean load over experts: 1.0 is perfect balance, E is total collapse."""
    load = _check_mask(mask, "load_imbalance").float().sum(0)
    mean = load.mean()
    return float(load.max() / mean) if mean > 0 else float("nan")


def dropped_fraction(dropped: torch.Tensor) -> float:
    """Share of tokens that lost every expert to capacity."""
    if not isinstance(dropped, torch.Tensor) or dropped.dim() != 1:
        raise ValueError(f"dropped_fraction: dropped must be a (tokens,) tensor, got {getattr(dropped, 'shape', type(dropped))}")
    return float(dropped.float().mean()) if dropped.numel() else 0.0


def collapse_report(mask: torch.Tensor, dead_share: float = 0.1, dominant_share: float = 0.5) -> dict:
    """Dead and dominant experts from one batch (or an epoch's) of routing.

    An expert is *dead* if it gets less than ``dead_share / E`` of the assignments (10 % of its
    fair share by default) and *dominant* if it gets more than ``dominant_share`` of them (when
    E > 1). ``collapsed`` is True when any expert is dominant or at least half the experts are dead.
    """
    u = utilization(mask)
    E = u.numel()
    dead = [int(i) for i in (u < dead_share / E).nonzero().flatten()]
    dominant = [int(i) for i in (u > dominant_share).nonzero().flatten()] if E > 1 else []
    return {
        "utilization": [round(float(v), 4) for v in u],
        "dead": dead,
        "dominant": dominant,
        "load_imbalance": load_imbalance(mask),
        "collapsed": bool(dominant) or len(dead) >= max(1, E // 2),
    }


def routing_changes(previous_mask: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of tokens whose set of experts changed between two routings of the same tokens
    (routing instability, seed 002's debugging list)."""
    a, b = _check_mask(previous_mask, "routing_changes"), _check_mask(mask, "routing_changes")
    if a.shape != b.shape:
        raise ValueError(f"routing_changes: masks differ in shape {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a != b).any(-1).float().mean()) if a.shape[0] else 0.0
