"""Routers: who processes which token, and with what weight.

Every router is an ``nn.Module`` whose ``forward(x, ids=None)`` returns a :class:`Routing`.
Tensor dimension names used throughout the package:

* ``T`` tokens (or samples, when whole images are routed), ``E`` experts, ``k`` experts per token,
* ``C`` capacity: the most tokens one expert may take in a forward pass.

References: noisy top-k (Shazeer et al., arXiv 1701.06538), Switch (arXiv 2101.03961),
expert choice (arXiv 2202.09368), hash layers (arXiv 2106.04426), auxiliary-loss-free
balancing (arXiv 2408.15664) with DeepSeek-V3's sigmoid scoring (arXiv 2412.19437), learned per-expert thresholds in the spirit of DynMoE (arXiv 2405.14297).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from fractions import Fraction

import torch
import torch.distributed as dist
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
    "cat_routings",
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
    "update_expert_biases",
    "PRIORITIES",
    "SCORINGS",
]

#: How capacity decides which assignments to drop (see :func:`apply_capacity`).
PRIORITIES = ("position", "score")
#: How :class:`TopKRouter` turns logits into affinities.
SCORINGS = ("softmax", "sigmoid")


@dataclass
class Routing:
    """The routing decision for ``T`` tokens over ``E`` experts.

    logits  (T, E) raw router scores (after temperature; noisy ones in training if the router adds
            noise), promoted to at least float32 whatever the module's dtype (ST-MoE keeps the
            router in float32)
    probs   (T, E) softmax of ``logits`` before any top-k (rows sum to 1); for
            ``TopKRouter(scoring="sigmoid")`` the sigmoid affinities normalised per row instead
    weights (T, E) combine weights, 0 wherever the token is not routed (after capacity)
    mask    (T, E) bool, token t is processed by expert e (after capacity)
    dropped (T,)   bool, tokens that lost every expert to capacity
    indices (T, k) optional: each token's chosen experts in priority order (top-k routers only)
    aux     dict   router-specific tensors for losses and logging (e.g. Shazeer's smooth ``load``)
    chosen  (T, E) optional bool: what the router chose *before* capacity dropped anything; None
            means nothing was dropped (then it equals ``mask``). Balance signals read this one:
            Switch, GShard and DeepSeek count the load from the router's choices, so a full
            expert still looks busy (after dropping, every full expert looks equally loaded).
    chosen_weights (T, E) optional: the combine weights before capacity (None: ``weights``)
    has_logits bool: False when ``logits`` are not pre-softmax scores (log-probabilities of a
            two-level router, Soft MoE's shares, fixed routers' zeros); the z-loss refuses them.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    dropped: torch.Tensor
    indices: torch.Tensor | None = None
    aux: dict = field(default_factory=dict)
    chosen: torch.Tensor | None = None
    chosen_weights: torch.Tensor | None = None
    has_logits: bool = True

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[0]

    @property
    def num_experts(self) -> int:
        return self.mask.shape[1]

    @property
    def chosen_mask(self) -> torch.Tensor:
        """(T, E) bool: the router's choices before capacity (``mask`` when nothing was dropped)."""
        return self.mask if self.chosen is None else self.chosen

    @property
    def gates(self) -> torch.Tensor:
        """(T, E) combine weights before capacity (``weights`` when nothing was dropped)."""
        return self.weights if self.chosen_weights is None else self.chosen_weights

    @property
    def experts_per_token(self) -> int | None:
        """k for top-k routers (the width of ``indices``), else None."""
        return None if self.indices is None else self.indices.shape[1]

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token index, expert index) of every routed pair, sorted by expert then token."""
        e_idx, t_idx = self.mask.t().nonzero(as_tuple=True)
        return t_idx, e_idx

    def detach(self) -> "Routing":
        """A copy without autograd history (for logging without keeping the graph alive)."""
        def d(v):
            return v.detach() if isinstance(v, torch.Tensor) else v
        return Routing(**{f.name: d(getattr(self, f.name)) for f in fields(self) if f.name != "aux"},
                       aux={k: d(v) for k, v in self.aux.items()})


def cat_routings(parts: list[Routing]) -> Routing:
    """The routings of consecutive token batches as one routing of all their tokens.

    Per-token tensors are concatenated; ``indices`` and the pre-capacity fields are kept when
    every part has them (all the same k), ``aux`` (per-batch values) is dropped."""
    if not parts:
        raise ValueError("cat_routings: parts is empty; give at least one Routing")

    def cat(name):
        vals = [getattr(p, name) for p in parts]
        if any(v is None for v in vals):
            if name in ("chosen", "chosen_weights") and not all(v is None for v in vals):
                base = {"chosen": "mask", "chosen_weights": "weights"}[name]
                return torch.cat([getattr(p, base) if v is None else v for p, v in zip(parts, vals)])
            return None
        if name == "indices" and len({v.shape[1] for v in vals}) > 1:
            return None
        return torch.cat(vals)

    return Routing(cat("logits"), cat("probs"), cat("weights"), cat("mask"), cat("dropped"), cat("indices"), {},
                   cat("chosen"), cat("chosen_weights"), all(p.has_logits for p in parts))


def capacity(capacity_factor: float, num_tokens: int, num_experts: int, k: int = 1) -> int:
    """Tokens one expert may take: ceil(capacity_factor * T * k / E), at least 1.

    Computed exactly: the factor is read as the decimal it prints as (``1.1`` is 11/10, not the
    binary float just above it), so ``capacity(1.1, 100, 2, 1)`` is 55, not the 56 that float
    rounding of 1.1 * 100 / 2 = 55.000000000000007 gives.
    """
    cf = Fraction(repr(float(capacity_factor)))
    return max(1, math.ceil(cf * num_tokens * k / num_experts))


def apply_capacity(indices: torch.Tensor, num_experts: int, cap: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Which of the (T, k) choices fit into experts of capacity ``cap``.

    Priority: every token's first choice is served before any token's second choice. Within the
    same rank, earlier tokens come first (``scores=None``, the order of Switch and GShard), or,
    with ``scores`` (T,), tokens with higher scores come first: batch prioritised routing
    (Riquelme et al., V-MoE, arXiv 2106.05974), which drops the tokens the router is least sure of.
    Returns ``keep`` (T, k) bool.
    """
    T, k = indices.shape
    order = None
    if scores is not None:
        order = torch.argsort(scores.detach(), descending=True, stable=True)
        indices = indices.index_select(0, order)
    # (k*T, E) one-hot in priority order; the running count is each assignment's queue position.
    onehot = F.one_hot(indices.t().reshape(-1), num_experts)
    position = onehot.cumsum(0) * onehot
    keep = (position.sum(-1) <= cap).reshape(k, T).t()
    if order is not None:
        keep = torch.empty_like(keep).index_copy_(0, order, keep)
    return keep


class Router(nn.Module):
    """Shared machinery: the gate network, temperature and input checks.

    ``gate`` may be any module mapping the input to (T, E) scores (e.g. seed 004's conv gate
    reading images); by default it is a bias-free ``nn.Linear(d_model, num_experts)``, which keeps
    the gate much smaller than the experts (seed 002's advice).

    Class attributes the layers read to refuse loss settings that cannot work: ``has_logits``
    (the ``logits`` of its Routing are real pre-softmax scores, so the z-loss means something)
    ``routes_all`` (every token goes to every expert) and ``equal_load`` (every expert gets the
    same number of tokens by construction): with either the Switch loss is a constant.
    """

    has_logits = True
    routes_all = False
    equal_load = False

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
        # The softmax runs in float32 (at least) whatever the module's or autocast's dtype, as
        # ST-MoE (arXiv 2202.08906) advises: bf16 rounding of router logits changes top-k choices.
        if logits.dtype != torch.float64:
            logits = logits.float()
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

    routes_all = True

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
    * ``normalize``: None (default) decides at every forward from the *current* k: with k > 1 the
      k selected weights are rescaled to sum to 1 (softmax over the chosen experts); with k = 1
      the weight is the raw probability, as in Switch (a single renormalised weight is exactly 1,
      and the gate would get no gradient from the task loss). ``True`` renormalises at every k
      (at k = 1 that is the dead gate chapter 10 shows), ``False`` never does.
    * ``capacity_factor``: each expert takes at most ceil(cf * T * k / E) tokens; overflow is
      dropped in priority order (all first choices before any second choice). Dropped assignments
      get weight 0; the surviving weights are not renormalised: they are normalised *before*
      dropping, as GShard does (arXiv 2006.16668, Algorithm 1).
    * ``priority``: which tokens capacity drops first within a choice rank: "position" (default;
      later rows of the batch, as Switch and GShard) or "score" (batch prioritised routing of
      V-MoE, arXiv 2106.05974: tokens with the lowest router probability are dropped first).
    * ``bias_update_rate`` u > 0: auxiliary-loss-free balancing (DeepSeek, arXiv 2408.15664 and
      DeepSeek-V3, arXiv 2412.19437). A per-expert bias ``b`` (a float32 buffer, whatever the
      module's dtype) is added to the scores for *selection only*; combine weights come from the
      unbiased probabilities. A training forward only *counts* the chosen load (before capacity)
      into ``expert_load``; :meth:`update_expert_bias` (which ``fit`` calls after every optimiser
      step) applies ``b += u * sign(mean_load - load)`` from everything counted since its last
      call, so gradient accumulation and recomputed forwards do not change the rate.
    * ``scoring``: how affinities are made from the gate's logits. "softmax" (default) is
      everything above. "sigmoid" is DeepSeek-V3's (arXiv 2412.19437, eqs. 15-17): each expert's
      affinity ``s_e = sigmoid(logit_e)`` stands on its own (no competition through a softmax),
      the top-k is taken of ``s + expert_bias`` (the bias, when ``bias_update_rate > 0``, chooses
      but never weighs), and the combine weights are the *unbiased* chosen affinities normalised
      over the chosen experts, ``g_e = s_e / sum_{j chosen} s_j`` (``normalize=None`` or True).
      ``normalize=False`` keeps the raw ``s_e``. Normalising one chosen affinity gives weight 1
      whatever the router says, so the task could not train it: sigmoid scoring with k = 1 is
      refused unless ``normalize=False``. ``Routing.probs`` then holds ``s / sum_e s_e`` (rows
      sum to 1), the normalised affinities DeepSeek-V3's sequence-wise balance loss averages, so
      the Switch and importance losses keep their meaning; ``logits`` are the raw gate logits.
      Noise (``noisy=True``) is softmax-only and refused with "sigmoid".
    * ``k`` and ``temperature`` may be changed between forwards (schedules do this).

    The balance signals (``switch``, ``importance`` losses, the bias) read ``routing.chosen``,
    the choices before capacity, as Switch, GShard and DeepSeek count the load.
    """

    def __init__(
        self,
        d_model: int | None,
        num_experts: int,
        k: int,
        noisy: bool = False,
        temperature: float = 1.0,
        capacity_factor: float | None = None,
        normalize: bool | None = None,
        bias_update_rate: float = 0.0,
        gate: nn.Module | None = None,
        priority: str = "position",
        scoring: str = "softmax",
    ):
        super().__init__(d_model, num_experts, temperature, gate)
        where = type(self).__name__
        if not isinstance(noisy, bool):
            raise TypeError(f"{where}: noisy must be a bool, got {type(noisy).__name__} {noisy!r}")
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"{where}: normalize must be None (decide from k at each forward) or a bool, "
                            f"got {type(normalize).__name__} {normalize!r}")
        self.scoring = check_choice("scoring", scoring, SCORINGS, where=where)
        if scoring == "sigmoid" and noisy:
            raise ValueError(f"{where}: noisy=True with scoring='sigmoid' is not supported (noisy top-k and its "
                             f"smooth load are defined for softmax scores); use scoring='softmax' or noisy=False")
        self.noisy = noisy
        self.normalize = normalize
        self.k = k
        self.capacity_factor = check_capacity_factor(capacity_factor, where=where)
        self.priority = check_choice("priority", priority, PRIORITIES, where=where)
        self.bias_update_rate = check_positive_float("bias_update_rate", bias_update_rate, where=where, allow_zero=True)
        if noisy:
            if self.d_model is None:
                raise ValueError(f"{where}: noisy=True needs d_model (the noise network reads x); got d_model=None")
            self.noise = nn.Linear(self.d_model, num_experts, bias=False)
            nn.init.zeros_(self.noise.weight)  # start at std softplus(0) ~ 0.69, as a learnable scale
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # Chosen (token, expert) pairs counted since the last update_expert_bias(); not saved in
        # checkpoints (a step's count, not state of the model).
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        #: Process group whose ranks share this router (set by ExpertParallelMoELayer); the load
        #: is summed over it in update_expert_bias when torch.distributed is initialised.
        self.process_group = None

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value):
        where = type(self).__name__
        value = check_int("k", value, low=1, high=self.num_experts, where=where)
        if value == 1 and getattr(self, "scoring", "softmax") == "sigmoid" and self.normalize is not False:
            raise ValueError(f"{where}: k=1 with scoring='sigmoid' normalises one affinity to weight 1 for every "
                             f"token, so the task loss cannot train the router; use k >= 2, or normalize=False "
                             f"(weight = the raw sigmoid affinity)")
        self._k = value

    def renormalizes(self) -> bool:
        """Whether the next forward rescales the chosen weights to sum to 1 (see ``normalize``;
        sigmoid scoring renormalises at every k unless ``normalize=False``)."""
        if self.normalize is None:
            return self.scoring == "sigmoid" or self.k > 1
        return self.normalize

    def _apply(self, fn, *args, **kwargs):
        # .half()/.bfloat16()/.to(dtype) would round the bias: updates of 1e-3 vanish next to a
        # bias of 1 in bf16 (its spacing there is 2^-7). Keep both buffers float32, values intact.
        keep = {n: self._buffers[n] for n in ("expert_bias", "expert_load") if n in self._buffers}
        super()._apply(fn, *args, **kwargs)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, noisy={self.noisy}, temperature={self.temperature}, "
            f"capacity_factor={self.capacity_factor}, normalize={self.normalize}, bias_update_rate={self.bias_update_rate}"
            + (f", priority={self.priority!r}" if self.priority != "position" else "")
            + (f", scoring={self.scoring!r}" if self.scoring != "softmax" else "")
        )

    @torch.no_grad()
    def update_expert_bias(self) -> torch.Tensor | None:
        """Apply one auxiliary-loss-free bias step from the load counted since the last call.

        ``b += u * sign(mean_load - load)``, then ``b -= mean(b)`` (only differences between
        experts matter for selection; centring keeps the bias from drifting), then the count is
        reset. When ``torch.distributed`` is initialised the load is first summed over
        ``process_group`` (a collective: every rank of the group must call it, once per step), so
        replicas that must route alike stay identical. Returns the step applied to the bias
        (zeros if nothing was counted), or None when ``bias_update_rate`` is 0.
        """
        if self.bias_update_rate <= 0:
            return None
        load = self.expert_load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=self.process_group)
        self.expert_load.zero_()
        if float(load.sum()) == 0:
            return torch.zeros_like(self.expert_bias)
        step = self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias += step
        self.expert_bias -= self.expert_bias.mean()
        return step

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        clean = self.scores(x)
        T, E, k = clean.shape[0], self.num_experts, self.k
        logits = clean
        noise_std = None
        if self.noisy and self.training:
            # A custom gate may read images (N, C, H, W); the noise network reads them flattened.
            noise_std = F.softplus(self.noise(x.flatten(1) if x.dim() > 2 else x)).to(clean.dtype) / self.temperature
            logits = clean + torch.randn_like(clean) * noise_std
        if self.scoring == "sigmoid":
            affinity = torch.sigmoid(logits)  # (T, E), each in (0, 1), no softmax competition
            # Normalised affinities: what DeepSeek-V3's sequence-wise balance loss averages, and
            # rows that sum to 1 like softmax ones, so the Switch/importance losses still apply.
            probs = affinity / affinity.sum(-1, keepdim=True)
            select = affinity.detach()
        else:
            probs = affinity = logits.softmax(-1)
            select = logits.detach()
        if self.bias_update_rate > 0:
            select = select + self.expert_bias  # selection only: the weights below read `affinity`
        indices = top_indices(select, k)  # (T, k), best first
        chosen = affinity.gather(1, indices)
        if self.renormalizes():
            chosen = chosen / chosen.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(1, indices, chosen)
        choice = torch.zeros(T, E, dtype=torch.bool, device=probs.device).scatter(1, indices, True)

        if self.capacity_factor is not None:
            scores = chosen.detach().max(-1).values if self.priority == "score" else None
            keep = apply_capacity(indices, E, capacity(self.capacity_factor, T, E, k), scores)
            weights = torch.zeros_like(probs).scatter(1, indices, chosen * keep)
            mask = torch.zeros(T, E, dtype=torch.bool, device=probs.device).scatter(1, indices, keep)
            dropped = ~keep.any(-1)
            pre_mask, pre_weights = choice, gates
        else:
            weights, mask, dropped = gates, choice, _no_drops(T, probs.device)
            pre_mask = pre_weights = None

        aux = {}
        if noise_std is not None:
            aux["load"] = _smooth_load(clean, logits, noise_std, k)
        if self.bias_update_rate > 0 and self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(indices.reshape(-1), minlength=E).to(self.expert_load.dtype)
        return Routing(logits, probs, weights, mask, dropped, indices, aux, pre_mask, pre_weights)


def update_expert_biases(model: nn.Module) -> int:
    """Call ``update_expert_bias()`` on every router inside ``model`` that has one; returns how many.

    ``fit`` does this after every optimiser step; a hand-written training loop that uses
    auxiliary-loss-free balancing must call it after ``optimizer.step()`` (on every rank).
    """
    n = 0
    for m in model.modules():
        fn = getattr(m, "update_expert_bias", None)
        if callable(fn) and getattr(m, "bias_update_rate", 0) > 0:
            fn()
            n += 1
    return n


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

    Deviation, as in the paper: C depends on the batch, so routing one token at inference gives
    C = 1 and *every* expert takes it (E experts per token instead of about ``capacity_factor``);
    evaluate expert choice on batches of the training size.
    """

    equal_load = True

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
    Weights are those products for the chosen pairs, renormalised to sum to 1 when ``normalize``
    (None, the default: when more than one expert is chosen, decided at each forward, as in
    :class:`TopKRouter`). Its ``logits`` are log-probabilities (the product has no single score
    matrix), so the z-loss, which reads pre-softmax scores, is refused for this router.
    """

    has_logits = False

    def __init__(self, d_model: int, num_groups: int, experts_per_group: int, k: int = 1, group_k: int = 1,
                 temperature: float = 1.0, normalize: bool | None = None):
        where = "HierarchicalRouter"
        check_int("num_groups", num_groups, low=1, where=where)
        check_int("experts_per_group", experts_per_group, low=1, where=where)
        super().__init__(d_model, num_groups * experts_per_group, temperature, None)
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.k = check_int("k", k, low=1, high=experts_per_group, where=where)
        self.group_k = check_int("group_k", group_k, low=1, high=num_groups, where=where)
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"{where}: normalize must be None or a bool, got {type(normalize).__name__} {normalize!r}")
        self.normalize = normalize
        self.group_gate = nn.Linear(d_model, num_groups, bias=False)
        nn.init.normal_(self.group_gate.weight, std=0.02)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        expert_scores = self.scores(x)  # (T, E) checks x
        T, G, J = x.shape[0], self.num_groups, self.experts_per_group
        group_scores = self.group_gate(x)
        if group_scores.dtype != torch.float64:
            group_scores = group_scores.float()
        p_group = (group_scores / self.temperature).softmax(-1)  # (T, G)
        p_within = expert_scores.view(T, G, J).softmax(-1)  # (T, G, J)
        probs = (p_group.unsqueeze(-1) * p_within).reshape(T, G * J)
        logits = probs.clamp_min(1e-30).log()
        groups = p_group.detach().topk(self.group_k, dim=-1).indices  # (T, group_k)
        inner = p_within.detach().gather(1, groups.unsqueeze(-1).expand(-1, -1, J)).topk(self.k, dim=-1).indices
        indices = (groups.unsqueeze(-1) * J + inner).reshape(T, -1)  # (T, group_k * k)
        chosen = probs.gather(1, indices)
        if (indices.shape[1] > 1) if self.normalize is None else self.normalize:
            chosen = chosen / chosen.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(1, indices, chosen)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, indices, True)
        return Routing(logits, probs, weights, mask, _no_drops(T, probs.device), indices, has_logits=False)


class _FixedRouter(nn.Module):
    """Routes by a fixed function of an integer id per token (no learned scores).

    Having no scores, ``logits`` are zeros and ``probs`` is the one-hot assignment itself.
    """

    has_logits = False
    routes_all = False

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
        return Routing(logits, onehot, onehot, onehot.bool(), _no_drops(T, x.device), expert.unsqueeze(1),
                       has_logits=False)


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

    The default decides renormalisation at each forward from the current k: the raw probability
    at k = 1 (Switch; renormalising a single weight makes it exactly 1 and the router would get
    no gradient from the task loss), weights summing to 1 at k > 1. With a ``router`` given, the
    layer arguments it would override are refused rather than ignored: ``k`` must equal
    ``router.k`` (for routers that have one), and ``capacity_factor``, ``noisy`` and
    ``temperature`` belong on the router.
    """
    if router is None:
        return TopKRouter(d_model, num_experts, k, noisy=noisy, temperature=temperature,
                          capacity_factor=capacity_factor)
    if not isinstance(router, nn.Module):
        raise TypeError(f"{where}: router must be an nn.Module returning Routing, got {type(router).__name__}")
    if getattr(router, "num_experts", num_experts) != num_experts:
        raise ValueError(f"{where}: router.num_experts={router.num_experts} != num_experts={num_experts}")
    if capacity_factor is not None:
        raise ValueError(f"{where}: capacity_factor={capacity_factor} with a custom router; set capacity on the router")
    conflicts = []
    router_k = getattr(router, "k", None)
    if isinstance(router_k, int) and router_k != k:
        conflicts.append(f"k={k} but router.k={router_k} (the router decides k; pass k={router_k})")
    if noisy:
        conflicts.append("noisy=True would be ignored (build the router with noisy=True)")
    if temperature != 1.0:
        conflicts.append(f"temperature={temperature} would be ignored (set the router's temperature)")
    if conflicts:
        raise ValueError(f"{where}: with router={type(router).__name__}(...) given, " + "; ".join(conflicts))
    return router
