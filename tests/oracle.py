"""A slow, obvious Mixture of Experts: Python loops over tokens, experts and slots.

Nothing here is vectorised or clever, so each line can be checked by eye against the formulas
in the package docstrings (fastmoe's ``tests/test_numerical.py`` pattern: a brute-force
reference with the same parameters, compared in outputs and in gradients).

Every function reads the *parameters* of a package module (its ``ExpertBank`` weights, its
router's gate weights) but none of its forward code, so a bug in vectorised routing, capacity
or dispatch shows up as a difference. Routing decisions are recomputed token by token.
All functions return a list of per-token pairs ``[(expert, weight_tensor), ...]`` (routing) or a
(T, d) tensor built with ``torch.stack`` (outputs), so autograd sees the obvious graph.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from tutorial_moe.experts import ACTIVATIONS


# ---------------------------------------------------------------- experts, one token at a time
def expert_on_token(bank, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of an ExpertBank on one token ``v`` (d,), straight from the formula."""
    if bank.kind == "mlp":
        h = ACTIVATIONS[bank.activation](v @ bank.w1[e] + bank.b1[e])
        return h @ bank.w2[e] + bank.b2[e]
    g = v @ bank.w_gate[e]
    u = v @ bank.w_up[e]
    return (F.silu(g) * u) @ bank.w_down[e]


def combine(bank, x: torch.Tensor, routes) -> torch.Tensor:
    """out[t] = sum over (e, w) in routes[t] of w * expert_e(x[t]); zero for a token with no route."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for e, w in routes[t]:
            acc = acc + w * expert_on_token(bank, e, x[t])
        rows.append(acc)
    return torch.stack(rows)


def routes_from_routing(routing):
    """Per-token routes read from a package Routing (for routers whose decision we test elsewhere)."""
    T, E = routing.mask.shape
    return [[(e, routing.weights[t, e]) for e in range(E) if bool(routing.mask[t, e])] for t in range(T)]


# ---------------------------------------------------------------- routers, one token at a time
def _f(v) -> float:
    """A plain float for comparisons (decisions are not differentiated)."""
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _softmax_row(row):
    m = max(_f(v) for v in row)
    ex = [torch.exp(v - m) for v in row]
    total = sum(ex)
    return [v / total for v in ex]


def gate_scores(router, x):
    """(T, E) list of lists: x[t] . gate.weight[e] / temperature (a bias-free linear gate)."""
    W = router.gate.weight
    return [[(x[t] * W[e]).sum() / router.temperature for e in range(W.shape[0])] for t in range(x.shape[0])]


def softmax_routes(router, x):
    return [[(e, p) for e, p in enumerate(_softmax_row(row))] for row in gate_scores(router, x)]


def topk_routes(router, x, bias=None):
    """Top-k by (score + bias); weights = chosen probs (renormalised if ``router.normalize``);
    capacity ceil(cf*T*k/E) filled rank by rank, token by token (every first choice before any second)."""
    scores = gate_scores(router, x)
    T, E, k = len(scores), router.num_experts, router.k
    chosen = []
    for row in scores:
        probs = _softmax_row(row)
        key = [_f(s) + (0.0 if bias is None else _f(bias[e])) for e, s in enumerate(row)]
        order = sorted(range(E), key=lambda e: -key[e])[:k]
        ws = [probs[e] for e in order]
        if (k > 1) if router.normalize is None else router.normalize:  # None: decided by the current k
            total = sum(ws)
            ws = [w / total for w in ws]
        chosen.append(list(zip(order, ws)))
    if router.capacity_factor is None:
        return chosen
    # Exact rational arithmetic with the factor read as the decimal it prints as (1.1 = 11/10).
    cap = max(1, math.ceil(Fraction(str(router.capacity_factor)) * T * k / E))
    used = [0] * E
    kept = [[] for _ in range(T)]
    for rank in range(k):
        for t in range(T):
            e, w = chosen[t][rank]
            if used[e] < cap:
                used[e] += 1
                kept[t].append((e, w))
    return kept


def expert_choice_routes(router, x):
    """Each expert takes the C tokens with the highest probability for it."""
    probs = [_softmax_row(row) for row in gate_scores(router, x)]
    T, E = len(probs), router.num_experts
    C = min(T, max(1, math.ceil(router.capacity_factor * T / E)))
    routes = [[] for _ in range(T)]
    for e in range(E):
        best = sorted(range(T), key=lambda t: -_f(probs[t][e]))[:C]
        for t in sorted(best):
            routes[t].append((e, probs[t][e]))
    for r in routes:
        r.sort(key=lambda pair: pair[0])
    return routes


def threshold_routes(router, x):
    """Experts whose sigmoid score clears sigmoid(theta[e]) (or else the best one), weight
    prob * sigmoid((score - bar) / sharpness)."""
    routes = []
    for row in gate_scores(router, x):
        probs = _softmax_row(row)
        best = max(range(len(row)), key=lambda e: _f(probs[e]))
        r = []
        for e, s in enumerate(row):
            score, bar = torch.sigmoid(s), torch.sigmoid(router.theta[e])
            if _f(score) > _f(bar) or e == best:
                r.append((e, probs[e] * torch.sigmoid((score - bar) / router.sharpness)))
        routes.append(r)
    return routes


def hierarchical_routes(router, x):
    """Pick group_k groups by p(group), then k experts by p(expert | group) in each; weight
    p(group) * p(expert | group), renormalised over the chosen pairs."""
    G, J = router.num_groups, router.experts_per_group
    Wg = router.group_gate.weight
    expert_scores = gate_scores(router, x)
    routes = []
    for t in range(x.shape[0]):
        p_group = _softmax_row([(x[t] * Wg[g]).sum() / router.temperature for g in range(G)])
        groups = sorted(range(G), key=lambda g: -_f(p_group[g]))[: router.group_k]
        pairs = []
        for g in groups:
            p_in = _softmax_row(expert_scores[t][g * J : (g + 1) * J])
            for j in sorted(range(J), key=lambda j: -_f(p_in[j]))[: router.k]:
                pairs.append((g * J + j, p_group[g] * p_in[j]))
        if (len(pairs) > 1) if router.normalize is None else router.normalize:
            total = sum(w for _, w in pairs)
            pairs = [(e, w / total) for e, w in pairs]
        routes.append(pairs)
    return routes


def hash_routes(router, ids):
    """The documented hash, in Python integers: (id*2654435761 + seed*40503 + 12345) mod 2^32,
    xor-shift by 16, mod E."""
    out = []
    for i in ids.tolist():
        h = (i * 2654435761 + router.seed * 40503 + 12345) % 2**32
        h = (h ^ (h >> 16)) % 2**32
        out.append([(h % router.num_experts, torch.tensor(1.0))])
    return out


def oracle_routes(router, ids):
    return [[(int(router.table[i]), torch.tensor(1.0))] for i in ids.tolist()]


# ---------------------------------------------------------------- Soft MoE, one slot at a time
def soft_moe(layer, x: torch.Tensor) -> torch.Tensor:
    """Soft MoE on one group x (n, d): slot s = sum_n D[n, s] x[n] with D softmax over tokens;
    expert s // S processes slot s; out[n] = sum_s C[n, s] y[s] with C softmax over slots."""
    n = x.shape[0]
    E, S = layer.num_experts, layer.slots
    scores = [[(x[i] * layer.phi[:, s]).sum() for s in range(E * S)] for i in range(n)]
    columns = [_softmax_row([scores[i][s] for i in range(n)]) for s in range(E * S)]  # over tokens
    y_slots = []
    for s in range(E * S):
        slot = sum(columns[s][i] * x[i] for i in range(n))
        y_slots.append(expert_on_token(layer.experts, s // S, slot))
    rows = []
    for i in range(n):
        c = _softmax_row(scores[i])  # over slots
        rows.append(sum(c[s] * y_slots[s] for s in range(E * S)))
    return torch.stack(rows)


# ---------------------------------------------------------------- whole-network experts (MoE)
def whole_network_moe(experts, routes, x, combine_mode="logits"):
    """out[n] = sum_e w * expert_e(x[n:n+1]) (or log of the mixture of softmaxes, renormalised
    over the sample's kept experts: sum_e w softmax(y_e) / sum_e w)."""
    rows = []
    for n in range(x.shape[0]):
        acc = 0
        total = 0
        for e, w in routes[n]:
            y = experts[e](x[n : n + 1])[0]
            acc = acc + w * (y.softmax(-1) if combine_mode == "probs" else y)
            total = total + w
        if combine_mode == "probs":
            acc = (acc / total).clamp_min(1e-12).log()
        rows.append(acc)
    return torch.stack(rows)
