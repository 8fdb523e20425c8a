"""Single Mixture of Experts (seed 001): one shared feed-forward network, many fixed dropout masks.

Instead of E separate experts, an :class:`SMoELayer` has ONE network Linear(d, H), GELU,
Linear(H, d) and M masks over its H hidden units, drawn once at construction and stored as a
buffer. A router picks a mask for every token (by the domain label as an oracle, or with a
learned top-k gate); the token then runs through the network with the other units zeroed.
Masks overlap, so every "expert" shares most of its weights with the others - the "common base"
the seed argues separate experts lack. With ``disjoint=True`` the masks partition the units and
the layer becomes M separate experts of width H/M (sharing only the output bias).

Also here: tools to test the seed's argument -

* :func:`gradient_reach` - for every weight of every feed-forward layer, the share of tokens whose
  gradient reaches it (the "each expert sees 1/E of the data" claim, measured by autograd);
* :func:`route_override` and :func:`mask_ensemble` - inference with a forced mask/expert, with the
  average of all masks, with the whole network, or as an ensemble of the M sub-networks'
  predictions (the seed's "wisdom of the crowd" observation).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_int, check_positive_float
from ..moe import AuxLossMixin, MoELayer, moe_modules
from ..losses import check_loss_weights
from ..routing import OracleRouter, Routing, TopKRouter

__all__ = ["make_masks", "SMoELayer", "RandomRouter", "ForcedRouter", "route_override", "mask_ensemble", "gradient_reach",
           "linear_cka", "ffn_inputs", "expert_hidden",
           "reach_summary", "unit_reach", "subnetwork_reach"]

_DEFAULT_LOSSES = {"switch": 0.01}


def make_masks(num_masks: int, d_hidden: int, keep: float, seed: int = 0, disjoint: bool = False) -> torch.Tensor:
    """(M, H) bool masks; each keeps exactly ``round(keep * H)`` units (at least 1), chosen at random.

    ``disjoint=True`` instead splits the H units into M groups of (nearly) equal size, so no unit is
    shared (``keep`` is then ignored; each mask keeps ~H/M units). Uses its own generator, so the
    masks depend only on ``seed``.
    """
    where = "make_masks"
    check_int("num_masks", num_masks, low=1, where=where)
    check_int("d_hidden", d_hidden, low=1, where=where)
    check_positive_float("keep", keep, where=where)
    if keep > 1:
        raise ValueError(f"{where}: keep={keep} is not allowed; it is a share of units, 0 < keep <= 1")
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_masks, d_hidden, dtype=torch.bool)
    if disjoint:
        if num_masks > d_hidden:
            raise ValueError(f"{where}: disjoint masks need num_masks <= d_hidden, got {num_masks} > {d_hidden}")
        order = torch.randperm(d_hidden, generator=gen)
        for m, chunk in enumerate(order.tensor_split(num_masks)):
            masks[m, chunk] = True
        return masks
    n_keep = max(1, int(round(keep * d_hidden)))
    for m in range(num_masks):
        masks[m, torch.randperm(d_hidden, generator=gen)[:n_keep]] = True
    return masks


class RandomRouter(nn.Module):
    """Each token gets one expert/mask drawn uniformly at random on every forward (from the global
    torch generator, so seeded runs repeat). An sMoE trained this way is dropout with a fixed pool of
    masks - the Masksembles recipe (Durasov et al., arXiv 2012.08334) - and averaging its masks at
    inference is an ensemble of the sub-networks it trained."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1, where="RandomRouter")

    def forward(self, x: torch.Tensor, ids=None) -> Routing:
        T, E = x.shape[0], self.num_experts
        choice = torch.randint(E, (T,), device=x.device)
        weights = F.one_hot(choice, E).to(x.dtype if x.is_floating_point() else torch.float32)
        dropped = torch.zeros(T, dtype=torch.bool, device=x.device)
        return Routing(torch.zeros_like(weights), weights, weights, weights.bool(), dropped, choice.unsqueeze(1))


class SMoELayer(AuxLossMixin, nn.Module):
    """(..., d_model) -> (..., d_model): one shared FFN, and per token a routed dropout mask.

    out = fc2( gelu(fc1(x)) * sum_m weights[t, m] * masks[m] / keep_m ) + b2

    where ``keep_m`` is mask m's share of kept units (inverted-dropout scaling keeps the expected
    activation size of the full network). With one-hot routing weights this is "run the network
    with mask m"; with uniform weights it is the average of all masks.

    Args:
        num_masks: M, the number of "experts" (masks).  keep: share of units each mask keeps.
        router: "learned" (a linear gate, top-k; with k=1 the weight is the raw gate probability,
            as in Switch, so the gate learns from the task), "oracle" (mask = the ``ids`` label),
            "random" (a uniformly random mask per token: :class:`RandomRouter`), or any router
            module with ``num_experts == M``.
        disjoint: masks partition the units (separate experts in one matrix).
        mask_seed: seed of the masks (fixed at init, saved in the state dict as a buffer).
        losses: auxiliary losses as in :class:`~tutorial_moe.MoELayer` (default ``{"switch": 0.01}``).
    """

    def __init__(self, d_model: int, d_hidden: int, num_masks: int, keep: float = 0.5, router="learned", k: int = 1,
                 disjoint: bool = False, mask_seed: int = 0, losses: dict | None = None):
        super().__init__()
        where = "SMoELayer"
        self.d_model = check_int("d_model", d_model, low=1, where=where)
        self.d_hidden = check_int("d_hidden", d_hidden, low=1, where=where)
        self.num_experts = check_int("num_masks", num_masks, low=1, where=where)
        check_int("k", k, low=1, high=num_masks, where=where)
        self.keep = keep
        self.register_buffer("masks", make_masks(num_masks, d_hidden, keep, seed=mask_seed, disjoint=disjoint))
        if router == "learned":
            router = TopKRouter(d_model, num_masks, k)  # renormalises only while k > 1
        elif router == "oracle":
            router = OracleRouter(num_masks)
        elif router == "random":
            router = RandomRouter(num_masks)
        elif not isinstance(router, nn.Module):
            raise ValueError(f"{where}: router={router!r} is unknown; use 'learned', 'oracle', 'random' "
                             "or a router module")
        if getattr(router, "num_experts", num_masks) != num_masks:
            raise ValueError(f"{where}: router.num_experts={router.num_experts} != num_masks={num_masks}")
        self.router = router
        self.losses = check_loss_weights(_DEFAULT_LOSSES if losses is None else losses, where)
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)
        self.use_all_units = False  # set by route_override(model, "full"): plain dropout-style inference
        self.last_routing = None
        self.aux_losses = {}
        self.aux_loss = torch.zeros(())

    @property
    def k(self) -> int:
        return getattr(self.router, "k", 1)

    def extra_repr(self):
        share = self.masks.float().mean().item()
        return f"num_masks={self.num_experts}, kept_share={share:.3f}, losses={self.losses}"

    def unit_scale(self) -> torch.Tensor:
        """(M, H) float: each mask divided by its kept share (inverted-dropout scaling)."""
        m = self.masks.float()
        return m / m.mean(1, keepdim=True)

    def idle_parameters(self) -> float:
        """Parameters a token does not use: the hidden units outside its mask(s) (expected, for k masks)."""
        unit_params = self.fc1.weight.numel() + self.fc1.bias.numel() + self.fc2.weight.numel()
        kept = self.masks.float().mean().item()
        used = 1 - (1 - kept) ** self.k
        return unit_params * (1 - used)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"SMoELayer: x must have shape (..., {self.d_model}), got {tuple(getattr(x, 'shape', ()))}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        flat_ids = None if ids is None else torch.as_tensor(ids, device=x.device).reshape(-1)
        routing = self.router(flat, flat_ids)
        hidden = F.gelu(self.fc1(flat))
        if not self.use_all_units:
            hidden = hidden * (routing.weights.to(hidden.dtype) @ self.unit_scale())
        out = self.fc2(hidden)
        self._set_aux(routing)
        return out.reshape(*lead, self.d_model)


class ForcedRouter(nn.Module):
    """Routes every token the same way: ``choice`` = an expert index, or "uniform" (all experts,
    equal weights). Used at inference to probe one expert/mask or to average them all."""

    def __init__(self, num_experts: int, choice):
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1, where="ForcedRouter")
        if choice != "uniform":
            check_int("choice", choice, low=0, high=num_experts - 1, where="ForcedRouter")
        self.choice = choice

    def forward(self, x: torch.Tensor, ids=None) -> Routing:
        T, E = x.shape[0], self.num_experts
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if self.choice == "uniform":
            weights = torch.full((T, E), 1.0 / E, dtype=dtype, device=x.device)
            mask = torch.ones(T, E, dtype=torch.bool, device=x.device)
            indices = torch.arange(E, device=x.device).expand(T, E)
        else:
            indices = torch.full((T, 1), self.choice, dtype=torch.long, device=x.device)
            weights = F.one_hot(indices[:, 0], E).to(dtype)
            mask = weights.bool()
        dropped = torch.zeros(T, dtype=torch.bool, device=x.device)
        return Routing(torch.zeros_like(weights), weights, weights, mask, dropped, indices)


@contextmanager
def route_override(model: nn.Module, choice):
    """Temporarily route every MoE/sMoE layer of ``model`` by ``choice``:

    an int m (every token to expert/mask m), "uniform" (equal weights on all experts/masks: the
    average of the masks for an sMoE, the plain average of the experts for an MoE), or "full"
    (sMoE only: all hidden units, no mask - what ordinary dropout does at test time).
    """
    mods = moe_modules(model)
    if not mods:
        raise ValueError("route_override: model has no MoE or sMoE layer to override")
    if choice == "full":
        bad = [type(m).__name__ for m in mods if not isinstance(m, SMoELayer)]
        if bad:
            raise ValueError(f"route_override: choice='full' needs sMoE layers, but the model has {bad[0]}")
        for m in mods:
            m.use_all_units = True
        try:
            yield
        finally:
            for m in mods:
                m.use_all_units = False
        return
    if not (choice == "uniform" or (isinstance(choice, int) and not isinstance(choice, bool))):
        raise ValueError(f"route_override: choice={choice!r} is not allowed; use an expert index, 'uniform' or 'full'")
    saved = [m.router for m in mods]
    try:
        for m in mods:
            m.router = ForcedRouter(m.num_experts, choice)
        yield
    finally:
        for m, r in zip(mods, saved):
            m.router = r


def mask_ensemble(model: nn.Module):
    """A ``predict(tokens, domains) -> log-probs`` that averages the model's predicted distributions
    over its E sub-networks (every token through mask/expert m, for m = 0..E-1): an explicit ensemble."""
    mods = moe_modules(model)
    if not mods:
        raise ValueError("mask_ensemble: model has no MoE or sMoE layer")
    E = mods[0].num_experts
    if any(m.num_experts != E for m in mods):
        raise ValueError("mask_ensemble: every MoE layer must have the same number of experts/masks")

    def predict(tokens, domains=None):
        total = 0.0
        for m in range(E):
            with route_override(model, m):
                total = total + F.softmax(model(tokens, domains), -1)
        return (total / E).clamp_min(1e-30).log()

    return predict


def gradient_reach(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, domains=None,
                   max_tokens: int = 256) -> list[dict]:
    """For each feed-forward layer: the share of tokens whose gradient reaches each weight.

    One ordinary forward/backward of the language-model loss records every feed-forward layer's
    input x_t and the gradient g_t arriving at its output. Then, for ``max_tokens`` evenly spaced
    token positions t, the layer alone is run on x_t and ``<layer(x_t), g_t>`` is backpropagated:
    that is exactly token t's share of the layer's weight gradient. A weight is *reached* by t when
    that gradient is non-zero. Returns, per layer, ``{parameter name: (same shape) share of tokens}``.
    Auxiliary (balancing) losses are left out: this is about the task's gradient.
    """
    from .lm import ffn_modules, lm_loss

    check_int("max_tokens", max_tokens, low=1, where="gradient_reach")
    ffns = ffn_modules(model)
    seen = {}

    def keep(i):
        def hook(module, args, output):
            output.retain_grad()
            seen[i] = (args[0].detach(), None if len(args) < 2 or args[1] is None else args[1].detach(), output)
        return hook

    was_training = model.training
    model.eval()
    handles = [f.register_forward_hook(keep(i)) for i, f in enumerate(ffns)]
    try:
        with torch.enable_grad():
            lm_loss(model(tokens, domains), targets).backward()
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, f in enumerate(ffns):
        x_in, ids, y = seen[i]
        d = x_in.shape[-1]
        x = x_in.reshape(-1, d)
        g = y.grad.reshape(-1, d)
        flat_ids = None if ids is None else ids.reshape(-1)
        n = min(max_tokens, x.shape[0])
        picks = torch.linspace(0, x.shape[0] - 1, n).round().long().unique()
        counts = {name: torch.zeros_like(p) for name, p in f.named_parameters()}
        for t in picks.tolist():
            f.zero_grad(set_to_none=True)
            with torch.enable_grad():
                yt = f(x[t:t + 1], None if flat_ids is None else flat_ids[t:t + 1])
                (yt * g[t:t + 1]).sum().backward()
            for name, p in f.named_parameters():
                if p.grad is not None:
                    counts[name] += (p.grad != 0).to(counts[name].dtype)
        out.append({name: c / len(picks) for name, c in counts.items()})
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return out


def unit_reach(module: nn.Module, reach: dict) -> torch.Tensor:
    """Share of tokens reaching each hidden unit (its input weights), from :func:`gradient_reach`.

    (H,) for a dense or sMoE layer; (E, h) for an MoE layer (one row per expert).
    """
    if isinstance(module, MoELayer):
        return reach["experts.w1"].amax(1)  # (E, d, h) -> (E, h)
    return reach["fc1.weight"].amax(1)  # (H, d): a unit is reached if any of its input weights is


def subnetwork_reach(module: nn.Module, reach: dict, expert: int) -> float:
    """Mean share of tokens reaching the hidden units of expert ``expert`` (MoE) or of the units kept
    by mask ``expert`` (sMoE): how much of the data trains the sub-network that one route uses."""
    u = unit_reach(module, reach)
    if isinstance(module, MoELayer):
        check_int("expert", expert, low=0, high=module.num_experts - 1, where="subnetwork_reach")
        return float(u[expert].mean())
    if isinstance(module, SMoELayer):
        check_int("expert", expert, low=0, high=module.num_experts - 1, where="subnetwork_reach")
        return float(u[module.masks[expert]].mean())
    return float(u.mean())  # dense: one sub-network, the whole layer


def reach_summary(model: nn.Module, reach: list[dict], steps: int | None = None, tokens_per_step: int | None = None):
    """One row per feed-forward layer: mean / min / max over hidden units of the share of tokens
    that update the unit, and (given ``steps`` and ``tokens_per_step``) the expected number of
    token-gradients each unit received in training."""
    from .lm import ffn_modules

    rows = []
    for layer, (f, r) in enumerate(zip(ffn_modules(model), reach)):
        u = unit_reach(f, r).flatten()
        row = {"layer": layer, "kind": type(f).__name__, "units": int(u.numel()), "mean_reach": float(u.mean()),
               "min_reach": float(u.min()), "max_reach": float(u.max())}
        if steps is not None and tokens_per_step is not None:
            row["token_updates_per_unit"] = float(u.mean()) * steps * tokens_per_step
        rows.append(row)
    return rows


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two representations of the same N inputs (Kornblith et
    al., arXiv 1905.00414): x (N, p), y (N, q) -> a number in [0, 1].

    1 when y is an orthogonal transform of x times a scale (the same representation up to rotation
    and size), near 0 for unrelated ones. Invariant to rotations and isotropic scaling but not to
    arbitrary linear maps, which is what makes it a measure of *shared* structure.
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"linear_cka: {name} must be an (N, features) tensor, got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"linear_cka: x and y need the same N >= 2 rows, got {x.shape[0]} and {y.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).square().sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if norm == 0:
        raise ValueError("linear_cka: a representation is constant over the inputs; CKA is undefined")
    return float(cross / norm)


@torch.no_grad()
def ffn_inputs(model: nn.Module, tokens: torch.Tensor, domains=None, layer: int = 0) -> torch.Tensor:
    """The vectors the feed-forward layer of block ``layer`` receives (after its LayerNorm) for
    ``tokens`` (B, T): (B*T, d_model)."""
    from .lm import ffn_modules

    ffns = ffn_modules(model)
    check_int("layer", layer, low=0, high=len(ffns) - 1, where="ffn_inputs")
    seen = []
    handle = ffns[layer].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        model(tokens, domains)
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0].reshape(-1, seen[0].shape[-1])


@torch.no_grad()
def expert_hidden(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each route's hidden representation of the same tokens x (N, d_model): for an MoE layer,
    gelu(x W1_e + b1_e) of every expert e, (N, h) each; for an sMoE layer, the shared hidden layer
    restricted to each mask's units, (N, kept_e) each."""
    if isinstance(module, MoELayer):
        bank = module.experts
        return [F.gelu(x @ bank.w1[e] + bank.b1[e]) for e in range(module.num_experts)]
    if isinstance(module, SMoELayer):
        hidden = F.gelu(module.fc1(x))
        return [hidden[:, m] for m in module.masks]
    raise ValueError(f"expert_hidden: module must be an MoELayer or SMoELayer, got {type(module).__name__}")
