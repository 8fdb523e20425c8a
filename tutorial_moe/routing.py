"""Routers: who processes which token, and with what weight.

Every router is an ``nn.Module`` whose ``forward(x, ids=None)`` returns a :class:`Routing`.
Tensor dimension names used throughout the package:

* ``T`` tokens (or samples, when whole images are routed), ``E`` experts, ``k`` experts per token,
* ``C`` capacity: the most tokens one expert may take in a forward pass.

References: noisy top-k (Shazeer et al., arXiv 1701.06538), Switch (arXiv 2101.03961),
expert choice (arXiv 2202.09368), hash layers (arXiv 2106.04426), auxiliary-loss-free
balancing (arXiv 2408.15664), learned per-expert thresholds in the spirit of DynMoE (arXiv 2405.14297).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import (
    check_capacity_factor,
    check_choice,
    check_finite,
    check_int,
    check_labels,
    check_positive_float,
    check_tokens,
)

__all__ = [
    "top_indices",
    "Routing",
    "Router",
    "SoftmaxRouter",
    "TopKRouter",
    "ExpertChoiceRouter",
    "ThresholdRouter",
    "HierarchicalRouter",
    "HashRouter",
    "OracleRouter",
    "capacity",
    "apply_capacity",
    "layer_router",
]


@dataclass
class Routing:
    """The routing decision for ``T`` tokens over ``E`` experts.

    logits  (T, E) raw router scores (after temperature; noisy ones in training if the router adds noise)
    probs   (T, E) softmax of ``logits`` before any top-k (rows sum to 1)
    weights (T, E) combine weights, 0 wherever the token is not routed
    mask    (T, E) bool, token t is processed by expert e
    dropped (T,)   bool, tokens that lost every expert to capacity
    indices (T, k) optional: each token's chosen experts in priority order (top-k routers only)
    aux     dict   router-specific tensors for losses and logging (e.g. Shazeer's smooth ``load``)
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    dropped: torch.Tensor
    indices: torch.Tensor | None = None
    aux: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[0]

    @property
    def num_experts(self) -> int:
        return self.mask.shape[1]

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token index, expert index) of every routed pair, sorted by expert then token."""
        e_idx, t_idx = self.mask.t().nonzero(as_tuple=True)
        return t_idx, e_idx

    def detach(self) -> "Routing":
        """A copy without autograd history (for logging without keeping the graph alive)."""
        return Routing(
            self.logits.detach(), self.probs.detach(), self.weights.detach(), self.mask, self.dropped,
            None if self.indices is None else self.indices,
            {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in self.aux.items()},
        )


def capacity(capacity_factor: float, num_tokens: int, num_experts: int, k: int = 1) -> int:
    """Tokens one expert may take: ceil(capacity_factor * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def apply_capacity(indices: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """Which of the (T, k) choices fit into experts of capacity ``cap``.

    Priority: every token's first choice is served before any token's second choice; within the
    same rank, earlier tokens come first (the order used by Switch and GShard).
    Returns ``keep`` (T, k) bool.
    """
    T, k = indices.shape
    # (k*T, E) one-hot in priority order; the running count is each assignment's queue position.
    onehot = F.one_hot(indices.t().reshape(-1), num_experts)
    position = onehot.cumsum(0) * onehot
    keep = (position.sum(-1) <= cap)
    return keep.reshape(k, T).t()


class Router(nn.Module):
    """Shared machinery: the gate network, temperature and input checks.

    ``gate`` may be any module mapping the input to (T, E) scores (e.g. seed 004's conv gate
    reading images); by default it is a bias-free ``nn.Linear(d_model, num_experts)``, which keeps
    the gate much smaller than the experts (seed 002's advice).
    """

    def __init__(self, d_model: int | None, num_experts: int, temperature: float = 1.0, gate: nn.Module | None = None):
        super().__init__()
        where = type(self).__name__
        self.num_experts = check_int("num_experts", num_experts, low=1, where=where)
        if gate is None:
            if d_model is None:
                raise ValueError(f"{where}: d_model=None needs a gate module; pass d_model (int >= 1) or gate=")
            self.d_model = check_int("d_model", d_model, low=1, where=where)
            self.gate = nn.Linear(self.d_model, self.num_experts, bias=False)
            nn.init.normal_(self.gate.weight, std=0.02)
        else:
            if not isinstance(gate, nn.Module):
                raise TypeError(f"{where}: gate must be an nn.Module, got {type(gate).__name__}")
            self.d_model = None if d_model is None else check_int("d_model", d_model, low=1, where=where)
            self.gate = gate
        self.temperature = temperature

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        self._temperature = check_positive_float("temperature", value, where=type(self).__name__)

    def _check_input(self, x):
        where = type(self).__name__
        if isinstance(self.gate, nn.Linear):
            return check_tokens(x, self.d_model, where=where)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"{where}: x must have a leading batch dimension, got shape {tuple(x.shape)}")
        check_finite(x, where=where)
        return x

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) gate scores divided by the temperature."""
        x = self._check_input(x)
        logits = self.gate(x)
        if logits.dim() != 2 or logits.shape != (x.shape[0], self.num_experts):
            raise ValueError(
                f"{type(self).__name__}: gate returned shape {tuple(logits.shape)}; expected ({x.shape[0]}, {self.num_experts})"
            )
        # Skipping the division at temperature 1 saves a pass over (T, E) forward and backward.
        return logits if self.temperature == 1.0 else logits / self.temperature

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, temperature={self.temperature}"


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k) column indices of each row's k largest scores, best first.

    For k <= 2 this is one or two ``argmax`` passes, ~2.5x faster than ``topk`` on CPU (where
    routing is a visible share of a small MoE layer); ties go to the lower index, as argmax
    documents. Larger k uses ``topk``.
    """
    if k == 1:
        return scores.argmax(-1, keepdim=True)
    if k == 2 and scores.shape[-1] >= 2:
        first = scores.argmax(-1, keepdim=True)
        second = scores.scatter(-1, first, float("-inf")).argmax(-1, keepdim=True)
        # A row that is -inf everywhere else would hand back `first` again; take any other column.
        second = torch.where(second == first, (first + 1) % scores.shape[-1], second)
        return torch.cat([first, second], -1)
    return scores.topk(k, dim=-1).indices


def _no_drops(T: int, device) -> torch.Tensor:
    return torch.zeros(T, dtype=torch.bool, device=device)


class SoftmaxRouter(Router):
    """Dense (soft) gate: every expert processes every token, weighted by softmax(scores / temperature).

    This is the gate of seed 003's Keras example and of seeds 000/004 during "all experts" training.
    """

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        logits = self.scores(x)
        probs = logits.softmax(-1)
        mask = torch.ones_like(probs, dtype=torch.bool)
        return Routing(logits, probs, probs, mask, _no_drops(len(probs), probs.device))


class TopKRouter(Router):
    """Top-k gating; Switch routing is ``k=1`` with a capacity factor.

    * ``noisy``: Shazeer et al.'s noisy top-k (arXiv 1701.06538). In training mode the scores get
      Gaussian noise with a learned, input-dependent std ``softplus(x W_noise)``; the smooth
      ``load`` (expected tokens per expert) is left in ``routing.aux["load"]`` for ``load_loss``.
    * ``normalize``: the k selected weights are rescaled to sum to 1 (softmax over the chosen
      experts); otherwise they are the raw softmax probabilities (as in Switch).
    * ``capacity_factor``: each expert takes at most ceil(cf * T * k / E) tokens; overflow is
      dropped in priority order (all first choices before any second choice). Dropped assignments
      get weight 0 (the surviving weights are not renormalised, as in GShard/Switch).
    * ``bias_update_rate`` u > 0: auxiliary-loss-free balancing (arXiv 2408.15664). A per-expert
      bias ``b`` is added to the scores for *selection only*; after each training forward,
      ``b += u * sign(mean_load - load)`` outside autograd.
    * ``k`` and ``temperature`` may be changed between forwards (schedules do this).
    """

    def __init__(
        self,
        d_model: int | None,
        num_experts: int,
        k: int,
        noisy: bool = False,
        temperature: float = 1.0,
        capacity_factor: float | None = None,
        normalize: bool = True,
        bias_update_rate: float = 0.0,
        gate: nn.Module | None = None,
    ):
        super().__init__(d_model, num_experts, temperature, gate)
        where = type(self).__name__
        self.k = k
        if not isinstance(noisy, bool):
            raise TypeError(f"{where}: noisy must be a bool, got {type(noisy).__name__} {noisy!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"{where}: normalize must be a bool, got {type(normalize).__name__} {normalize!r}")
        self.noisy = noisy
        self.normalize = normalize
        self.capacity_factor = check_capacity_factor(capacity_factor, where=where)
        self.bias_update_rate = check_positive_float("bias_update_rate", bias_update_rate, where=where, allow_zero=True)
        if noisy:
            if self.d_model is None:
                raise ValueError(f"{where}: noisy=True needs d_model (the noise network reads x); got d_model=None")
            self.noise = nn.Linear(self.d_model, num_experts, bias=False)
            nn.init.zeros_(self.noise.weight)  # start at std softplus(0) ~ 0.69, as a learnable scale
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value):
        self._k = check_int("k", value, low=1, high=self.num_experts, where=type(self).__name__)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, noisy={self.noisy}, temperature={self.temperature}, "
            f"capacity_factor={self.capacity_factor}, normalize={self.normalize}, bias_update_rate={self.bias_update_rate}"
        )

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        clean = self.scores(x)
        T, E, k = clean.shape[0], self.num_experts, self.k
        logits = clean
        noise_std = None
        if self.noisy and self.training:
            # A custom gate may read images (N, C, H, W); the noise network reads them flattened.
            noise_std = F.softplus(self.noise(x.flatten(1) if x.dim() > 2 else x)) / self.temperature
            logits = clean + torch.randn_like(clean) * noise_std
        probs = logits.softmax(-1)

        select = logits.detach()
        if self.bias_update_rate > 0:
            select = select + self.expert_bias
        indices = top_indices(select, k)  # (T, k), best first
        chosen = probs.gather(1, indices)
        if self.normalize:
            chosen = chosen / chosen.sum(-1, keepdim=True)

        if self.capacity_factor is not None:
            keep = apply_capacity(indices, E, capacity(self.capacity_factor, T, E, k))
            chosen = chosen * keep
        else:
            keep = torch.ones_like(indices, dtype=torch.bool)
        weights = torch.zeros_like(probs).scatter(1, indices, chosen)
        mask = torch.zeros(T, E, dtype=torch.bool, device=probs.device).scatter(1, indices, keep)
        dropped = ~keep.any(-1)

        aux = {}
        if noise_std is not None:
            aux["load"] = _smooth_load(clean, logits, noise_std, k)
        if self.bias_update_rate > 0 and self.training:
            with torch.no_grad():
                load = mask.sum(0).to(self.expert_bias.dtype)
                self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        return Routing(logits, probs, weights, mask, dropped, indices, aux)


def _smooth_load(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al.'s differentiable estimate of tokens per expert (their Eq. 8-10).

    P(t, e) = Phi((clean[t,e] - threshold[t,e]) / std[t,e]): the chance that expert e stays in the
    top-k of token t under a new draw of its noise, the other experts' noisy scores held fixed.
    """
    E = noisy.shape[1]
    if k >= E:
        return torch.ones_like(clean).sum(0)
    top = noisy.topk(k + 1, dim=-1).values  # (T, k+1)
    in_topk = noisy >= top[:, k - 1 : k]
    threshold = torch.where(in_topk, top[:, k : k + 1], top[:, k - 1 : k])
    normal = torch.distributions.Normal(0.0, 1.0)
    prob = normal.cdf((clean - threshold) / noise_std.clamp_min(1e-9))
    return prob.sum(0)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al., arXiv 2202.09368): each expert takes its top-C tokens.

    C = ceil(capacity_factor * T / E) (at most T). Loads are perfectly balanced by construction;
    a token may be taken by 0..E experts, and ``dropped`` marks those taken by none. Weights are
    the softmax probabilities of the chosen (token, expert) pairs. Note that choosing tokens looks
    at the whole batch, which leaks information across positions in autoregressive decoding.
    """

    def __init__(self, d_model: int | None, num_experts: int, capacity_factor: float, temperature: float = 1.0, gate=None):
        super().__init__(d_model, num_experts, temperature, gate)
        if capacity_factor is None:
            raise ValueError("ExpertChoiceRouter: capacity_factor=None is not allowed; it must be a finite number > 0")
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor, where="ExpertChoiceRouter")

    def expert_capacity(self, num_tokens: int) -> int:
        return min(num_tokens, capacity(self.capacity_factor, num_tokens, self.num_experts, 1))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        logits = self.scores(x)
        probs = logits.softmax(-1)
        T, E = probs.shape
        C = self.expert_capacity(T)
        token_idx = probs.detach().t().topk(C, dim=-1).indices  # (E, C)
        mask = torch.zeros(E, T, dtype=torch.bool, device=probs.device).scatter(1, token_idx, True).t()
        weights = probs * mask
        return Routing(logits, probs, weights, mask, ~mask.any(-1))


class ThresholdRouter(Router):
    """Learned per-expert thresholds: a token uses every expert whose score clears that expert's bar.

    score[t,e] = sigmoid(logit[t,e]); bar[e] = sigmoid(theta[e]), theta learned. The hard mask
    (score > bar) decides compute; the weight of a routed pair is probs[t,e] * sigmoid((score - bar)
    / sharpness), so theta gets gradients. A token that clears no bar falls back to its best expert.
    ``routing.aux["active"]`` is the smooth expected number of experts per token, to penalise
    compute (the ``"threshold"`` auxiliary loss). In the spirit of DynMoE (arXiv 2405.14297).
    """

    def __init__(self, d_model: int | None, num_experts: int, init_threshold: float = 0.5, sharpness: float = 0.05,
                 temperature: float = 1.0, gate=None):
        super().__init__(d_model, num_experts, temperature, gate)
        t = check_positive_float("init_threshold", init_threshold, where="ThresholdRouter")
        if not 0 < t < 1:
            raise ValueError(f"ThresholdRouter: init_threshold={t} must lie strictly between 0 and 1")
        self.sharpness = check_positive_float("sharpness", sharpness, where="ThresholdRouter")
        self.theta = nn.Parameter(torch.full((num_experts,), math.log(t / (1 - t))))

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        logits = self.scores(x)
        probs = logits.softmax(-1)
        score = torch.sigmoid(logits)
        bar = torch.sigmoid(self.theta)
        soft = torch.sigmoid((score - bar) / self.sharpness)
        mask = score.detach() > bar.detach()
        best = probs.detach().argmax(-1, keepdim=True)
        mask = mask.scatter(1, best, True)
        weights = probs * soft * mask
        return Routing(logits, probs, weights, mask, _no_drops(len(probs), probs.device), aux={"active": soft.sum(-1).mean()})


class HierarchicalRouter(Router):
    """Two-level routing: pick ``group_k`` of G groups, then ``k`` experts inside each chosen group.

    probs[t, (g, j)] = p(g | t) * p(j | t, g), so rows still sum to 1 and E = G * experts_per_group.
    Weights are those products for the chosen pairs, renormalised to sum to 1 when ``normalize``.
    """

    def __init__(self, d_model: int, num_groups: int, experts_per_group: int, k: int = 1, group_k: int = 1,
                 temperature: float = 1.0, normalize: bool = True):
        where = "HierarchicalRouter"
        check_int("num_groups", num_groups, low=1, where=where)
        check_int("experts_per_group", experts_per_group, low=1, where=where)
        super().__init__(d_model, num_groups * experts_per_group, temperature, None)
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.k = check_int("k", k, low=1, high=experts_per_group, where=where)
        self.group_k = check_int("group_k", group_k, low=1, high=num_groups, where=where)
        self.normalize = normalize
        self.group_gate = nn.Linear(d_model, num_groups, bias=False)
        nn.init.normal_(self.group_gate.weight, std=0.02)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        expert_scores = self.scores(x)  # (T, E) checks x
        T, G, J = x.shape[0], self.num_groups, self.experts_per_group
        p_group = (self.group_gate(x) / self.temperature).softmax(-1)  # (T, G)
        p_within = expert_scores.view(T, G, J).softmax(-1)  # (T, G, J)
        probs = (p_group.unsqueeze(-1) * p_within).reshape(T, G * J)
        logits = probs.clamp_min(1e-30).log()
        groups = p_group.detach().topk(self.group_k, dim=-1).indices  # (T, group_k)
        inner = p_within.detach().gather(1, groups.unsqueeze(-1).expand(-1, -1, J)).topk(self.k, dim=-1).indices
        indices = (groups.unsqueeze(-1) * J + inner).reshape(T, -1)  # (T, group_k * k)
        chosen = probs.gather(1, indices)
        if self.normalize:
            chosen = chosen / chosen.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(1, indices, chosen)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, indices, True)
        return Routing(logits, probs, weights, mask, _no_drops(T, probs.device), indices)


class _FixedRouter(nn.Module):
    """Routes by a fixed function of an integer id per token (no learned scores).

    Having no scores, ``logits`` are zeros and ``probs`` is the one-hot assignment itself.
    """

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1, where=type(self).__name__)

    def expert_of(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        where = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"{where}: x must be a tensor with a leading token dimension")
        ids = check_labels(ids, x.shape[0], where=where, name="ids").to(x.device)
        expert = self.expert_of(ids)
        T, E = x.shape[0], self.num_experts
        dtype = x.dtype if x.is_floating_point() else torch.float32
        onehot = F.one_hot(expert, E).to(dtype)
        logits = torch.zeros(T, E, dtype=dtype, device=x.device)
        return Routing(logits, onehot, onehot, onehot.bool(), _no_drops(T, x.device), expert.unsqueeze(1))


class OracleRouter(_FixedRouter):
    """A fixed assignment from a label, for baselines ("is it MNIST", "one expert per digit").

    ``assignment[label]`` is the expert of that label; by default label ``i`` goes to expert ``i``.
    """

    def __init__(self, num_experts: int, assignment=None):
        super().__init__(num_experts)
        if assignment is None:
            table = torch.arange(num_experts)
        else:
            table = torch.as_tensor(list(assignment), dtype=torch.long)
            if table.dim() != 1 or len(table) == 0:
                raise ValueError(f"OracleRouter: assignment must be a non-empty list of expert ids, got {assignment!r}")
            if table.min() < 0 or table.max() >= num_experts:
                raise ValueError(
                    f"OracleRouter: assignment={assignment!r} names experts outside 0..{num_experts - 1}"
                )
        self.register_buffer("table", table, persistent=False)

    def expert_of(self, ids):
        if ids.numel() and ids.max().item() >= len(self.table):
            raise ValueError(
                f"OracleRouter: ids contains label {ids.max().item()}, but assignment covers labels 0..{len(self.table) - 1}"
            )
        return self.table.to(ids.device)[ids]


class HashRouter(_FixedRouter):
    """Hash layers (Roller et al., arXiv 2106.04426): expert = a fixed random hash of the token id.

    Balanced in expectation over a vocabulary, needs no training, and cannot collapse; it also
    cannot learn which expert suits which token.
    """

    def __init__(self, num_experts: int, seed: int = 0):
        super().__init__(num_experts)
        self.seed = check_int("seed", seed, low=0, where="HashRouter")

    def expert_of(self, ids):
        # Multiplicative (Knuth) hash of the id mixed with the seed: fixed, cheap, well spread.
        h = (ids * 2654435761 + self.seed * 40503 + 12345) % (2**32)
        h = (h ^ (h >> 16)) % (2**32)
        return h % self.num_experts


def layer_router(where: str, d_model: int, num_experts: int, k: int, router: nn.Module | None = None,
                 capacity_factor: float | None = None, noisy: bool = False, temperature: float = 1.0) -> nn.Module:
    """The router of an MoE layer: the one given (checked), or the default ``TopKRouter``.

    The default keeps the raw probability as the weight when k = 1 (Switch): renormalising a single
    weight makes it exactly 1, and the router would get no gradient from the task loss.
    """
    if router is None:
        return TopKRouter(d_model, num_experts, k, noisy=noisy, temperature=temperature,
                          capacity_factor=capacity_factor, normalize=k > 1)
    if not isinstance(router, nn.Module):
        raise TypeError(f"{where}: router must be an nn.Module returning Routing, got {type(router).__name__}")
    if getattr(router, "num_experts", num_experts) != num_experts:
        raise ValueError(f"{where}: router.num_experts={router.num_experts} != num_experts={num_experts}")
    if capacity_factor is not None:
        raise ValueError(f"{where}: capacity_factor={capacity_factor} with a custom router; set capacity on the router")
    return router
