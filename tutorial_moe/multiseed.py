"""Several seeds of one small model, trained together as one stacked model.

A chapter that wants five seeds of a small network would otherwise call ``fit`` five times, and
each run pays the per-step costs of Python, autograd and the optimiser again while its matrix
products are too small to keep a core busy. :func:`fit_seeds` builds the S models (one per
seed, exactly as ``torch.manual_seed(seed); make_model()`` would), stacks every parameter along
a new leading seed dimension and trains the stack as one model:

* a ``Linear`` layer becomes one batched matrix product (``bmm``) over the S seeds;
* a ``Conv2d`` becomes one grouped convolution (seed s owns group s);
* the E experts of an :class:`~tutorial_moe.moe.MoE` become one stacked network over S * E
  members; the first layer, which every expert of a seed reads from the same input, is one
  matrix product (or convolution) per seed with the E experts side by side;
* routing (softmax, top-k with a per-seed k, noisy top-k, a fixed oracle assignment) runs on
  (S, B, E) tensors; every expert is computed on every sample and the combine weights, zero
  outside the chosen experts, mask the rest. That is the ``dispatch="dense"`` path of ``MoE``
  (what Parts I and II train with); a model built with ``dispatch="loop"`` or ``"auto"`` trains
  the same function, except that an expert that receives no sample in a batch gets a zero
  gradient here instead of none (Adam then still decays its moments).

Each seed keeps its own batch order (its own ``torch.Generator``, seeded as ``fit`` seeds it),
its own k and temperature schedule, its own noise stream for noisy routers, its own gradient
clipping and early stopping, and gets its own :class:`~tutorial_moe.train.History` with the rows
``fit`` writes (training accuracy accumulated over the epoch before each step, seed 004's
definition; each MoE's utilisation; auxiliary losses). The trained weights are written back
into the S modules, so everything that works on a model from ``fit`` works on them. The oracle
tests (tests/test_multiseed.py) check all of this against S sequential ``fit`` runs.

The optimiser is Adam as in ``fit``, in its fused form (one pass per stacked tensor), so results
agree with ``fit`` to float rounding, not bit for bit.

Supported modules: ``nn.Linear``, ``nn.Conv2d``, ``nn.MaxPool2d``, ``nn.Sequential``, parameter-free
``Flatten``/``ReLU``/``GELU``/``Tanh``/``Sigmoid``/``SiLU``/``Identity``, :class:`~tutorial_moe.experts.MLPExpert` (no active dropout),
:class:`~tutorial_moe.experts.ConvExpert`, :class:`~tutorial_moe.experts.ConvGate`,
:class:`~tutorial_moe.experts.DenseGate`, and :class:`~tutorial_moe.moe.MoE` with a
``SoftmaxRouter``, ``TopKRouter`` (softmax scoring, no capacity; bias balancing per seed) or ``OracleRouter``. Other
module types can declare an equivalent ``nn.Sequential`` of these with :func:`register_stacking`.
Anything else raises ``TypeError`` naming the module.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_int, check_positive_float
from .experts import ACTIVATIONS, ConvExpert, DenseGate, MLPExpert
from .losses import compute_aux_losses
from .moe import MoE, moe_modules
from .routing import OracleRouter, Routing, SoftmaxRouter, TopKRouter, _smooth_load
from .runtime import device as default_device, progress
from .train import History, check_fit_arguments

__all__ = ["StackedModel", "SeedRuns", "fit_seeds", "stack_models", "register_stacking"]

_ELEMENTWISE = {nn.ReLU: F.relu, nn.GELU: F.gelu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid,
                nn.SiLU: F.silu, nn.Identity: lambda x: x}

#: module type -> function returning an equivalent ``nn.Sequential`` built from the same
#: parameter tensors (so the stacked weights write back into the original module).
_EQUIVALENTS: dict[type, object] = {
    DenseGate: lambda gate: nn.Sequential(nn.Flatten(), gate.net),
}


def _softmax(t: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(log-)softmax over the last dim. For a short last dim (10 classes, a few experts) it runs
    on a transposed copy, over dim -2: on CPU torch's last-dim kernel handles a row shorter than
    its vector width element by element, measured ~10x slower for (5, 6, 512, 10) forward."""
    if t.shape[-1] >= 16 or t.dim() < 2 or t.device.type != "cpu":
        return t.log_softmax(-1) if log else t.softmax(-1)
    tt = t.transpose(-1, -2).contiguous()
    return (tt.log_softmax(-2) if log else tt.softmax(-2)).transpose(-1, -2)


def register_stacking(cls: type, equivalent) -> None:
    """Let :func:`fit_seeds` stack modules of type ``cls``.

    ``equivalent(module)`` must return an ``nn.Sequential`` of supported modules that computes
    the same function with the same parameter tensors (e.g. ``nn.Sequential(nn.Flatten(),
    module.net)`` for a gate that flattens its input and applies ``net``).
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_stacking: cls must be an nn.Module subclass, got {cls!r}")
    if not callable(equivalent):
        raise TypeError(f"register_stacking: equivalent must be callable (module -> nn.Sequential), "
                        f"got {type(equivalent).__name__}")
    _EQUIVALENTS[cls] = equivalent


# ----------------------------------------------------------------------------- stacking helpers


def _same(sources, attr_names, where):
    first = sources[0]
    for i, m in enumerate(sources[1:], 1):
        for name in attr_names:
            a, b = getattr(first, name), getattr(m, name)
            if a != b:
                raise ValueError(f"stack_models: {where}: model {i} has {name}={b!r} but model 0 has {a!r}; "
                                 "every seed's model must have the same architecture")


def _requires_grad(tensors, where):
    flags = {bool(t.requires_grad) for t in tensors}
    if len(flags) > 1:
        raise ValueError(f"stack_models: {where}: requires_grad differs between the seeds' models; "
                         "freeze the same parameters in every model")
    return flags.pop()


def _param(data: torch.Tensor, sources, where) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=_requires_grad(sources, where))


class _SLinear(nn.Module):
    """G ``nn.Linear`` layers; input (G // share, B, in), output (G, B, out).

    ``share`` members read the same input (the E experts of one seed): their weights sit side
    by side in one (in, share * out) matrix, so the layer is one ``bmm`` per input group.
    """

    def __init__(self, linears, share: int = 1, where: str = "Linear"):
        super().__init__()
        G = len(linears)
        self._sources = tuple(linears)
        self.share, self.outer = share, G // share
        self.d_in, self.d_out = linears[0].in_features, linears[0].out_features
        _same(linears, ("in_features", "out_features"), where)
        if len({l.bias is None for l in linears}) > 1:
            raise ValueError(f"stack_models: {where}: some models' Linear has a bias and some do not")
        w = torch.stack([l.weight.detach().t() for l in linears])  # (G, in, out)
        if share > 1:
            w = w.view(self.outer, share, self.d_in, self.d_out).permute(0, 2, 1, 3)
        self.weight = _param(w.reshape(self.outer, self.d_in, share * self.d_out), [l.weight for l in linears], where)
        if linears[0].bias is None:
            self.bias = None
        else:
            b = torch.stack([l.bias.detach() for l in linears]).reshape(self.outer, 1, share * self.d_out)
            self.bias = _param(b, [l.bias for l in linears], where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"Linear (stacked): input width {x.shape[-1]} (shape {tuple(x.shape)}) != in_features={self.d_in}")
        lead = x.shape[1:-1]
        x3 = x.reshape(self.outer, -1, self.d_in)
        y = torch.bmm(x3, self.weight) if self.bias is None else torch.baddbmm(self.bias, x3, self.weight)
        if self.share > 1:
            y = y.view(self.outer, -1, self.share, self.d_out).transpose(1, 2)
        return y.reshape(self.outer * self.share, *lead, self.d_out)

    @torch.no_grad()
    def write_back(self):
        w = self.weight.detach().view(self.outer, self.d_in, self.share, self.d_out).permute(0, 2, 1, 3)
        w = w.reshape(-1, self.d_in, self.d_out)
        for lin, wg in zip(self._sources, w):
            lin.weight.copy_(wg.t())
        if self.bias is not None:
            for lin, bg in zip(self._sources, self.bias.detach().reshape(-1, self.d_out)):
                lin.bias.copy_(bg)


class _SConv2d(nn.Module):
    """G ``nn.Conv2d`` as one grouped convolution over channel-stacked maps (B, groups * C, H, W)."""

    def __init__(self, convs, share: int = 1, where: str = "Conv2d"):
        super().__init__()
        self._sources = tuple(convs)
        G = len(convs)
        self.groups = G // share
        c = convs[0]
        _same(convs, ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                      "padding_mode"), where)
        if c.groups != 1 or c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise TypeError(f"stack_models: {where}: only Conv2d with groups=1, zero padding given as numbers "
                            f"can be stacked, got groups={c.groups}, padding={c.padding!r}, padding_mode={c.padding_mode!r}")
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.out_channels = c.out_channels
        self.weight = _param(torch.cat([m.weight.detach() for m in convs]), [m.weight for m in convs], where)
        self.bias = None if c.bias is None else _param(torch.cat([m.bias.detach() for m in convs]),
                                                       [m.bias for m in convs], where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def write_back(self):
        C = self.out_channels
        for g, conv in enumerate(self._sources):
            conv.weight.copy_(self.weight[g * C:(g + 1) * C])
            if self.bias is not None:
                conv.bias.copy_(self.bias[g * C:(g + 1) * C])


def _to_channels(x: torch.Tensor) -> torch.Tensor:
    """(G, B, C, H, W) -> (B, G * C, H, W): each member's channels side by side."""
    G, B, C, H, W = x.shape
    return x.transpose(0, 1).reshape(B, G * C, H, W)


class _SConvExpert(nn.Module):
    """:class:`ConvExpert` / :class:`ConvGate`: conv-pool-conv-pool-fc-fc over G members."""

    def __init__(self, nets, share: int = 1, where: str = "ConvExpert"):
        super().__init__()
        self._sources = tuple(nets)
        _same(nets, ("in_channels", "image_size", "conv_activation"), where)
        self.in_channels, self.image_size = nets[0].in_channels, nets[0].image_size
        self.conv_activation = nets[0].conv_activation
        self.G = len(nets)
        self.conv1 = _SConv2d([n.conv1 for n in nets], share, where + ".conv1")
        self.conv2 = _SConv2d([n.conv2 for n in nets], 1, where + ".conv2")
        self.fc1 = _SLinear([n.fc1 for n in nets], 1, where + ".fc1")
        self.fc2 = _SLinear([n.fc2 for n in nets], 1, where + ".fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[2] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(f"ConvExpert (stacked): x must have shape (groups, N, {self.in_channels}, "
                             f"{self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        act = F.relu if self.conv_activation else (lambda t: t)
        # Channels-last: the members' channels sit side by side in memory, where the CPU's
        # convolution and pooling kernels vectorise (about 2x faster at these sizes).
        x = _to_channels(x).contiguous(memory_format=torch.channels_last)
        h = act(F.max_pool2d(self.conv1(x), 2, ceil_mode=True))  # as ConvExpert
        h = act(F.max_pool2d(self.conv2(h), 2, ceil_mode=True))
        B = h.shape[0]
        h = h.reshape(B, self.G, -1).transpose(0, 1)  # (G, B, C * h * w), the order ConvExpert flattens in
        return self.fc2(F.relu(self.fc1(h)))

    def write_back(self):
        for m in (self.conv1, self.conv2, self.fc1, self.fc2):
            m.write_back()


class _SMLP(nn.Module):
    """:class:`MLPExpert` over G members (LayerNorm, depth, skip connections, activation)."""

    def __init__(self, mlps, share: int = 1, where: str = "MLPExpert"):
        super().__init__()
        self._sources = tuple(mlps)
        _same(mlps, ("d_in", "d_out", "activation", "skip", "layer_norm"), where)
        for i, m in enumerate(mlps):
            if m.drop.p > 0:
                raise TypeError(f"stack_models: {where}: model {i} has dropout={m.drop.p}; dropout cannot be "
                                "stacked (each seed's masks would not come from the random stream fit uses); "
                                "use dropout=0 or train the seeds one by one with fit")
        if len({len(m.hidden) for m in mlps}) > 1:
            raise ValueError(f"stack_models: {where}: the models' depths differ")
        m0 = mlps[0]
        self.G, self.share = len(mlps), share
        self.d_in, self.d_out, self.skip = m0.d_in, m0.d_out, m0.skip
        self.act = ACTIVATIONS[m0.activation]
        self.layer_norm = m0.layer_norm
        if self.layer_norm:
            _same([m.norm for m in mlps], ("normalized_shape", "eps", "elementwise_affine"), where + ".norm")
            self.eps = m0.norm.eps
            self.norm_weight = _param(torch.stack([m.norm.weight.detach() for m in mlps]).unsqueeze(1),
                                      [m.norm.weight for m in mlps], where)
            self.norm_bias = _param(torch.stack([m.norm.bias.detach() for m in mlps]).unsqueeze(1),
                                    [m.norm.bias for m in mlps], where)
        # A LayerNorm's affine part differs per member, so its input is expanded first.
        first_share = 1 if self.layer_norm else share
        self.fc_in = _SLinear([m.fc_in for m in mlps], first_share, where + ".fc_in")
        self.hidden = nn.ModuleList(_SLinear([m.hidden[j] for m in mlps], 1, f"{where}.hidden[{j}]")
                                    for j in range(len(m0.hidden)))
        self.fc_out = _SLinear([m.fc_out for m in mlps], 1, where + ".fc_out")

    def _expand(self, x):
        if self.share == 1:
            return x
        return x.unsqueeze(1).expand(x.shape[0], self.share, *x.shape[1:]).reshape(self.G, *x.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 3:
            x = x.flatten(2)
        if x.shape[-1] != self.d_in:
            raise ValueError(f"MLPExpert (stacked): input width {x.shape[-1]} (shape {tuple(x.shape)}) != d_in={self.d_in}")
        inp = x
        if self.layer_norm:
            inp = self._expand(x)
            inp = F.layer_norm(inp, (self.d_in,), eps=self.eps) * self.norm_weight + self.norm_bias
        h = self.act(self.fc_in(inp))
        for layer in self.hidden:
            step = self.act(layer(h))
            h = h + step if self.skip else step
        out = self.fc_out(h)
        if self.skip and self.d_out == self.d_in:
            out = out + self._expand(x)
        return out

    @torch.no_grad()
    def write_back(self):
        if self.layer_norm:
            for m, w, b in zip(self._sources, self.norm_weight.squeeze(1), self.norm_bias.squeeze(1)):
                m.norm.weight.copy_(w)
                m.norm.bias.copy_(b)
        for layer in (self.fc_in, *self.hidden, self.fc_out):
            layer.write_back()


class _SConvLayer(nn.Module):
    """A lone ``nn.Conv2d`` (e.g. inside an ``nn.Sequential``): (G // share, B, C, H, W) -> (G, B, C', H', W')."""

    def __init__(self, convs, share: int = 1, where: str = "Conv2d"):
        super().__init__()
        self.conv = _SConv2d(convs, share, where)
        self.G = len(convs)

    def forward(self, x):
        y = self.conv(_to_channels(x))
        B, _, H, W = y.shape
        return y.view(B, self.G, -1, H, W).transpose(0, 1)

    def write_back(self):
        self.conv.write_back()


class _SMaxPool(nn.Module):
    """``nn.MaxPool2d`` on (G, B, C, H, W): the members are folded into the batch."""

    def __init__(self, pool):
        super().__init__()
        self.args = (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        if pool.return_indices:
            raise TypeError("stack_models: nn.MaxPool2d(return_indices=True) cannot be stacked")

    def forward(self, x):
        G, B = x.shape[:2]
        y = F.max_pool2d(x.reshape(G * B, *x.shape[2:]), *self.args)
        return y.view(G, B, *y.shape[1:])

    def write_back(self):
        pass


class _SElementwise(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)

    def write_back(self):
        pass


class _SFlatten(nn.Module):
    def forward(self, x):
        return x.flatten(2)

    def write_back(self):
        pass


class _SSequential(nn.Module):
    """``nn.Sequential`` over G members; ``share`` applies until the first layer with parameters."""

    def __init__(self, seqs, share: int = 1, where: str = "Sequential", ctx=None):
        super().__init__()
        self._sources = tuple(seqs)
        n = {len(s) for s in seqs}
        if len(n) > 1:
            raise ValueError(f"stack_models: {where}: the models' Sequential lengths differ: {sorted(n)}")
        layers = []
        for j in range(len(seqs[0])):
            parts = [s[j] for s in seqs]
            layers.append(_stack(parts, share, f"{where}[{j}]", ctx))
            if any(True for _ in parts[0].parameters()):
                share = 1
        self.layers = nn.ModuleList(layers)
        self.share_out = share

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        if self.share_out > 1:  # no layer had parameters: hand every member its copy
            x = x.unsqueeze(1).expand(x.shape[0], self.share_out, *x.shape[1:]).reshape(-1, *x.shape[1:])
        return x

    def write_back(self):
        for layer in self.layers:
            layer.write_back()


class _SMoE(nn.Module):
    """:class:`MoE` over S seeds: stacked experts (S * E members), stacked gate, batched routing."""

    def __init__(self, moes, share: int = 1, where: str = "MoE", ctx=None):
        super().__init__()
        if share != 1:
            raise TypeError(f"stack_models: {where}: an MoE inside another MoE's experts cannot be stacked")
        self._sources = tuple(moes)
        S = len(moes)
        m0 = moes[0]
        _same(moes, ("num_experts", "combine", "losses"), where)
        routers = [m.router for m in moes]
        rtype = type(routers[0])
        if any(type(r) is not rtype for r in routers):
            raise ValueError(f"stack_models: {where}: the models' routers have different types")
        if rtype not in (SoftmaxRouter, TopKRouter, OracleRouter):
            raise TypeError(f"stack_models: {where}: router {rtype.__name__} cannot be stacked; supported: "
                            "SoftmaxRouter, TopKRouter (no capacity), OracleRouter")
        self.S, self.E = S, m0.num_experts
        self.combine, self.losses = m0.combine, dict(m0.losses)
        self.kind = rtype.__name__
        self.noisy, self.normalize = False, True
        self.bias_update_rate = 0.0
        if rtype is TopKRouter:
            for i, r in enumerate(routers):
                if r.capacity_factor is not None:
                    raise TypeError(f"stack_models: {where}: model {i}'s TopKRouter has capacity_factor="
                                    f"{r.capacity_factor}; capacity (dropping) cannot be stacked, use fit")
                if getattr(r, "scoring", "softmax") != "softmax":
                    raise TypeError(f"stack_models: {where}: model {i}'s TopKRouter has scoring="
                                    f"{r.scoring!r}; only softmax scoring can be stacked, use fit")
            _same(routers, ("noisy", "normalize", "bias_update_rate"), where + ".router")
            self.noisy, self.normalize = routers[0].noisy, routers[0].normalize
            # Auxiliary-loss-free balancing: one bias row per seed, counted and stepped as
            # TopKRouter does (fit_seeds calls update_expert_bias after every optimiser step).
            self.bias_update_rate = float(routers[0].bias_update_rate)
            if self.bias_update_rate > 0:
                self.register_buffer("expert_bias", torch.stack([r.expert_bias.detach().float() for r in routers]))
                self.register_buffer("expert_load", torch.zeros(S, self.E), persistent=False)
            if self.noisy:
                self.noise = _SLinear([r.noise for r in routers], 1, where + ".router.noise")
        if rtype is OracleRouter:
            tables = [r.table for r in routers]
            if any(not torch.equal(t, tables[0]) for t in tables):
                raise ValueError(f"stack_models: {where}: the OracleRouters' assignments differ")
            self.register_buffer("table", tables[0].clone(), persistent=False)
            self.gate = None
        else:
            self.gate = _stack([r.gate for r in routers], 1, where + ".router.gate", ctx)
            self.gate_is_linear = isinstance(routers[0].gate, nn.Linear)
        experts = [e for m in moes for e in m.experts]  # seed-major: member s * E + e
        etypes = {type(e) for e in experts}
        if len(etypes) > 1:
            raise TypeError(f"stack_models: {where}: experts of different types ({sorted(t.__name__ for t in etypes)}) "
                            "cannot be stacked")
        self.experts = _stack(experts, self.E, where + ".experts", ctx)
        self.ks = [getattr(r, "k", self.E) for r in routers]
        self.temperatures = [getattr(r, "temperature", 1.0) for r in routers]
        self.generators = None  # per-seed noise streams, set by fit_seeds
        self.last = None
        self.aux_losses: dict = {}
        if ctx is not None:
            ctx.append((moes, self))

    # -- routing
    def _routing(self, x, ids):
        S, E = self.S, self.E
        B = x.shape[1]
        aux = {}
        if self.gate is None:  # OracleRouter
            if ids is None:
                raise ValueError("OracleRouter (stacked): ids are required (pass data as (x, y, ids))")
            expert = self.table.to(ids.device)[ids]
            onehot = F.one_hot(expert, E).to(x.dtype if x.is_floating_point() else torch.float32)
            return torch.zeros_like(onehot), onehot, onehot, onehot.bool(), aux
        if self.gate_is_linear and x.dim() != 3:
            raise ValueError(f"{self.kind} (stacked): a Linear gate reads (tokens, d_model); got x of shape "
                             f"{tuple(x.shape[1:])} per seed")
        clean = self.gate(x)
        temps = self.temperatures
        if any(t != 1.0 for t in temps):
            clean = clean / clean.new_tensor(temps).view(S, 1, 1)
        if self.kind == "SoftmaxRouter":
            probs = _softmax(clean)
            return clean, probs, probs, torch.ones_like(probs, dtype=torch.bool), aux
        logits, noise_std = clean, None
        if self.noisy and self.training:
            noise_std = F.softplus(self.noise(x.flatten(2) if x.dim() > 3 else x))
            if any(t != 1.0 for t in temps):
                noise_std = noise_std / clean.new_tensor(temps).view(S, 1, 1)
            eps = torch.stack([torch.randn(B, E, generator=g, device=x.device, dtype=clean.dtype)
                               for g in self._noise_generators(x.device)])
            logits = clean + eps * noise_std
        probs = _softmax(logits)
        ks = self.ks
        kmax = max(ks)
        select = logits.detach()
        if self.bias_update_rate > 0:
            select = select + self.expert_bias.unsqueeze(1).to(select.dtype)  # selection only
        indices = select.topk(kmax, dim=-1).indices  # (S, B, kmax), best first
        chosen = probs.gather(-1, indices)
        keep = None
        if min(ks) < kmax:
            keep = torch.arange(kmax, device=x.device) < torch.tensor(ks, device=x.device).view(S, 1, 1)
            keep = keep.expand(S, B, kmax)
            chosen = chosen * keep
        # Renormalise the chosen weights as the router would at each seed's current k: a bool
        # ``normalize`` always or never; None (the package's default since issue 14) only when k > 1.
        renorm = [(k > 1) if self.normalize is None else bool(self.normalize) for k in ks]
        if all(renorm):
            chosen = chosen / chosen.sum(-1, keepdim=True)
        elif any(renorm):
            flags = torch.tensor(renorm, device=x.device).view(S, 1, 1)
            chosen = torch.where(flags, chosen / chosen.sum(-1, keepdim=True), chosen)
        weights = torch.zeros_like(probs).scatter(-1, indices, chosen)
        mask = torch.zeros(probs.shape, dtype=torch.bool, device=x.device)
        mask = mask.scatter(-1, indices, True if keep is None else keep)
        if noise_std is not None:
            aux["load"] = torch.stack([_smooth_load(clean[s], logits[s], noise_std[s], ks[s]) for s in range(S)])
        if self.bias_update_rate > 0 and self.training:
            with torch.no_grad():
                self.expert_load += mask.sum(1).to(self.expert_load.dtype)
        return logits, probs, weights, mask, aux

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """TopKRouter.update_expert_bias for every seed at once (seeds with no count keep their bias)."""
        if self.bias_update_rate <= 0:
            return
        load = self.expert_load.clone()
        self.expert_load.zero_()
        counted = load.sum(-1, keepdim=True) > 0
        step = self.bias_update_rate * torch.sign(load.mean(-1, keepdim=True) - load)
        bias = self.expert_bias + step
        bias = bias - bias.mean(-1, keepdim=True)
        self.expert_bias.copy_(torch.where(counted, bias, self.expert_bias))

    def _noise_generators(self, dev):
        if self.generators is None:
            raise RuntimeError("a noisy TopKRouter trained outside fit_seeds has no per-seed noise generators")
        return self.generators

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        S, E = self.S, self.E
        logits, probs, weights, mask, aux = self._routing(x, ids)
        ys = self.experts(x)  # (S * E, B, C)
        ys = ys.view(S, E, *ys.shape[1:])
        w = weights.transpose(1, 2).unsqueeze(-1).to(ys.dtype)  # (S, E, B, 1)
        out = (w * (_softmax(ys) if self.combine == "probs" else ys)).sum(1)
        if self.combine == "probs":
            # MoE's mixture of probabilities, renormalised over the weights each sample kept (a
            # no-op when they sum to 1); a sample that kept no expert gets the uniform distribution.
            total = weights.sum(-1, keepdim=True).to(out.dtype)
            kept = total > 0
            log_mix = out.clamp_min(1e-12).log() - torch.where(kept, total, torch.ones_like(total)).log()
            out = torch.where(kept, log_mix, torch.full_like(log_mix, -math.log(out.shape[-1])))
        self.last = (logits, probs, weights, mask)
        self.aux_losses = self._aux(logits, probs, weights, mask, aux, ys) if self.losses else {}
        return out

    def _aux(self, logits, probs, weights, mask, aux, ys):
        """``{name: (S,) weighted loss}`` from the package's own loss code, vectorised over seeds."""
        losses = self.losses
        use_ys = losses.get("diversity", 0) > 0

        def one_seed(lg, pr, wt, mk, ax, y):
            dropped = torch.zeros(mk.shape[0], dtype=torch.bool, device=mk.device)
            return compute_aux_losses(Routing(lg, pr, wt, mk, dropped, None, ax), losses, y if use_ys else None)

        return torch.vmap(one_seed)(logits, probs, weights, mask, aux, ys)

    @torch.no_grad()
    def write_back(self):
        self.experts.write_back()
        if self.gate is not None:
            self.gate.write_back()
        if self.noisy:
            self.noise.write_back()
        if self.bias_update_rate > 0:
            for m, b in zip(self._sources, self.expert_bias):
                m.router.expert_bias.copy_(b)
                m.router.expert_load.zero_()
        for m, k, t in zip(self._sources, self.ks, self.temperatures):
            if hasattr(m.router, "k"):
                m.router.k = k
            if hasattr(m.router, "temperature"):
                m.router.temperature = t


def _stack(modules, share, where, ctx):
    """The stacked counterpart of ``modules`` (one per member)."""
    first = modules[0]
    t = type(first)
    if any(type(m) is not t for m in modules):
        raise ValueError(f"stack_models: {where}: the models differ in type "
                         f"({sorted({type(m).__name__ for m in modules})})")
    if t in _EQUIVALENTS:
        return _stack([_EQUIVALENTS[t](m) for m in modules], share, where, ctx)
    if t is nn.Linear:
        return _SLinear(modules, share, where)
    if t is MLPExpert:
        return _SMLP(modules, share, where)
    if t in (ConvExpert,) or (isinstance(first, ConvExpert) and t.forward is ConvExpert.forward):
        return _SConvExpert(modules, share, where)
    if t is MoE:
        return _SMoE(modules, share, where, ctx)
    if t is nn.Sequential:
        return _SSequential(modules, share, where, ctx)
    if t is nn.Conv2d:
        return _SConvLayer(modules, share, where)
    if t is nn.MaxPool2d:
        _same(modules, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"), where)
        return _SMaxPool(first)
    if t is nn.Flatten:
        if (first.start_dim, first.end_dim) != (1, -1):
            raise TypeError(f"stack_models: {where}: only nn.Flatten() with start_dim=1, end_dim=-1 can be stacked")
        return _SFlatten()
    if t in _ELEMENTWISE:
        if t is nn.GELU and first.approximate != "none":
            raise TypeError(f"stack_models: {where}: nn.GELU(approximate={first.approximate!r}) is not supported")
        return _SElementwise(_ELEMENTWISE[t])
    raise TypeError(
        f"stack_models: {where}: cannot stack a {t.__name__}; supported: Linear, Conv2d, MaxPool2d, Sequential, Flatten, "
        "ReLU/GELU/Tanh/Sigmoid/SiLU/Identity, MLPExpert, ConvExpert, ConvGate, DenseGate, MoE "
        "(SoftmaxRouter, TopKRouter, OracleRouter), and types added with register_stacking; "
        "train this model with fit, one seed at a time"
    )


class StackedModel(nn.Module):
    """S models of one architecture as one module: ``forward(x)`` maps (S, B, ...) to (S, B, C).

    Built by :func:`stack_models`; ``write_back()`` copies the stacked weights (and each
    router's k and temperature) back into the S original modules.
    """

    def __init__(self, models):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("StackedModel: models is empty; give at least one module (S >= 1)")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"StackedModel: models[{i}] must be an nn.Module, got {type(m).__name__}")
        if len({id(m) for m in models}) < len(models):
            raise ValueError("StackedModel: models contains the same module twice; build one model per seed")
        shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in models]
        for i, s in enumerate(shapes[1:], 1):
            if s != shapes[0]:
                raise ValueError(f"StackedModel: models[{i}] has other parameters than models[0] "
                                 "(names or shapes differ); every seed's model must have the same architecture")
        self.S = len(models)
        self._sources = tuple(models)
        ctx: list = []
        self.root = _stack(models, 1, type(models[0]).__name__, ctx)
        self.takes_ids = isinstance(self.root, _SMoE)
        by_source = {id(srcs[0]): sm for srcs, sm in ctx}
        self.moes = [by_source[id(m)] for m in moe_modules(models[0])]
        self._gate_ids = {id(p) for sm in self.moes if sm.gate is not None for p in sm.gate.parameters()}
        self._gate_ids |= {id(p) for sm in self.moes if sm.noisy for p in sm.noise.parameters()}

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] != self.S:
            raise ValueError(f"StackedModel: x must have shape (S={self.S}, batch, ...), got {tuple(x.shape)}")
        if ids is not None:
            if not self.takes_ids:
                raise TypeError(f"StackedModel: ids were given but the model ({type(self._sources[0]).__name__}) "
                                "does not take ids")
            return self.root(x, ids)
        return self.root(x)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The stacked parameters of every router (gate and noise network)."""
        return [p for p in self.parameters() if id(p) in self._gate_ids]

    def set_k(self, ks) -> None:
        """Per-seed k for every top-k router (a list of S ints)."""
        for sm in self.moes:
            if sm.kind == "TopKRouter":
                for s, k in enumerate(ks):
                    check_int(f"k of seed index {s}", k, low=1, high=sm.E, where="StackedModel.set_k")
                sm.ks = list(ks)

    def set_temperature(self, temps) -> None:
        for sm in self.moes:
            if sm.kind != "OracleRouter":
                sm.temperatures = [check_positive_float("temperature", float(t), where="StackedModel.set_temperature")
                                   for t in temps]

    def write_back(self) -> list[nn.Module]:
        self.root.write_back()
        return list(self._sources)


def stack_models(models) -> StackedModel:
    """Stack S modules of one architecture (``TypeError`` for a module type that cannot be stacked)."""
    return StackedModel(models)


# ----------------------------------------------------------------------------- training


@dataclass
class SeedRuns:
    """What :func:`fit_seeds` returns: the trained models and histories, one per seed."""

    seeds: list
    models: list
    histories: list
    seconds: float
    path: str = ""
    extra: dict = field(default_factory=dict)

    def final(self, key: str = "test_acc") -> list:
        """``key`` of each seed's last epoch row (e.g. the final test accuracy per seed)."""
        return [h.epochs[-1][key] for h in self.histories]


def _schedules(name, value, S, where):
    if value is None:
        return None
    if callable(value):
        return [value] * S
    if isinstance(value, (list, tuple)):
        if len(value) != S:
            raise ValueError(f"{where}: {name} has {len(value)} schedules but there are {S} seeds; give one "
                             "schedule for all or one per seed")
        for i, v in enumerate(value):
            if not callable(v):
                raise TypeError(f"{where}: {name}[{i}] must be callable, got {type(v).__name__}")
        return list(value)
    raise TypeError(f"{where}: {name} must be a callable or a list of S callables, got {type(value).__name__}")


def _check_seeds(seeds, where):
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"{where}: seeds must be a list of ints >= 0, got {type(seeds).__name__} {seeds!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError(f"{where}: seeds is empty; S must be >= 1 (give at least one int seed)")
    for i, s in enumerate(seeds):
        check_int(f"seeds[{i}]", s, low=0, where=where)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds={seeds} repeats a seed; each run must have its own seed")
    return seeds


@torch.no_grad()
def _evaluate(stacked: StackedModel, data, loss_fn, dev, batch_size=512):
    S = stacked.S
    was = stacked.training
    stacked.eval()
    correct = torch.zeros(S, dtype=torch.long, device=dev)
    loss_sum = torch.zeros(S, dtype=torch.float64, device=dev)
    total = 0
    n = len(data[0])
    for start in range(0, n, batch_size):
        x = data[0][start:start + batch_size].to(dev)
        y = data[1][start:start + batch_size].to(dev)
        xs = x.unsqueeze(0).expand(S, *x.shape)
        ids = None if len(data) < 3 else data[2][start:start + batch_size].to(dev).unsqueeze(0).expand(S, -1)
        out = stacked(xs, ids)
        loss_sum += _per_seed_loss(loss_fn, out, y.unsqueeze(0).expand(S, -1)).double() * len(y)
        if out.dim() == 3 and y.dim() == 1:
            correct += (out.argmax(-1) == y).sum(1)
        total += len(y)
    stacked.train(was)
    return (correct.double() / total).tolist(), (loss_sum / total).tolist()


def _per_seed_loss(loss_fn, out, y):
    """(S,) mean loss of each seed."""
    S = out.shape[0]
    if loss_fn is F.cross_entropy and out.dim() == 3 and y.dtype == torch.long:
        logp = _softmax(out.reshape(-1, out.shape[-1]), log=True)
        return F.nll_loss(logp, y.reshape(-1), reduction="none").view(S, -1).mean(1)
    return torch.stack([loss_fn(out[s], y[s]) for s in range(S)])


def fit_seeds(
    model,
    train,
    test=None,
    *,
    seeds,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    gate_lr: float | None = None,
    weight_decay: float = 0.0,
    loss_fn=F.cross_entropy,
    clip_grad: float | None = None,
    early_stopping: int | None = None,
    k_schedule=None,
    temperature_schedule=None,
    device=None,
    show_progress: bool = True,
    callback=None,
    max_steps: int | None = None,
    stop_on: str = "test_acc",
) -> SeedRuns:
    """Train one model per seed, all seeds at once; the same result as ``fit`` once per seed.

    ``model`` is either a function ``make_model()`` (called as ``torch.manual_seed(seed);
    make_model()`` for each seed, as a chapter's loop would) or a list of S modules already
    built, one per seed in the order of ``seeds``. Every other argument means what it means for
    :func:`tutorial_moe.train.fit`, applied per seed; ``k_schedule`` and
    ``temperature_schedule`` may also be lists with one schedule per seed. ``callback(rows,
    stacked)`` runs after every step with the S step rows; ``stacked.write_back()`` copies the
    current weights into the S modules if the callback needs them.

    Returns :class:`SeedRuns` (``.models`` trained in place, ``.histories`` one
    :class:`~tutorial_moe.train.History` per seed). Epoch rows' ``seconds`` is the wall time of
    the whole stacked epoch (all seeds together). Raises ``FloatingPointError`` naming the step,
    the seed and the loss parts if a seed's loss is not finite.
    """
    where = "fit_seeds"
    seeds = _check_seeds(seeds, where)
    S = len(seeds)
    if isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a function make_model() or a list of {S} modules, one per seed; "
                        f"got a single {type(model).__name__} (its seeds would share one set of weights)")
    if callable(model):
        models = []
        for s in seeds:
            torch.manual_seed(s)
            m = model()
            if not isinstance(m, nn.Module):
                raise TypeError(f"{where}: model() must return an nn.Module, got {type(m).__name__}")
            models.append(m)
    elif isinstance(model, (list, tuple)):
        models = list(model)
        if len(models) != S:
            raise ValueError(f"{where}: model is a list of {len(models)} modules but seeds has {S} entries "
                             f"({seeds}); give one model per seed")
    else:
        raise TypeError(f"{where}: model must be a function make_model() or a list of modules, "
                        f"got {type(model).__name__}")
    train, test = check_fit_arguments(where, train, test, epochs=epochs, batch_size=batch_size, lr=lr,
                                      gate_lr=gate_lr, clip_grad=clip_grad, early_stopping=early_stopping,
                                      stop_on=stop_on, max_steps=max_steps)
    if callback is not None and not callable(callback):
        raise TypeError(f"{where}: callback must be callable (rows, stacked) or None, got {type(callback).__name__}")
    k_scheds = _schedules("k_schedule", k_schedule, S, where)
    t_scheds = _schedules("temperature_schedule", temperature_schedule, S, where)

    dev = torch.device(device) if device is not None else default_device()
    stacked = StackedModel(models).to(dev)
    gens = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(s)
        gens.append(g)
    for sm in stacked.moes:
        if sm.noisy:  # fit seeds the global stream with the seed; the noise is its only consumer
            sm.generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    gate_params = stacked.gate_parameters() if gate_lr is not None else []
    gate_ids = {id(p) for p in gate_params}
    groups = [{"params": [p for p in stacked.parameters() if id(p) not in gate_ids], "lr": lr}]
    if gate_params:
        groups.append({"params": gate_params, "lr": gate_lr})
    opt = _adam(groups, lr, weight_decay)
    trainable = [p for p in stacked.parameters() if p.requires_grad]

    hists = [History() for _ in range(S)]
    moes = stacked.moes
    aux_names = None
    active = [True] * S  # False once a seed has stopped early
    best = [None] * S  # (score, epoch, {param index: slice copy})
    bad = [0] * S
    x_all, y_all = train[0], train[1]
    ids_all = train[2] if len(train) == 3 else None
    n = len(x_all)
    n_batches = math.ceil(n / batch_size)
    step = 0
    t_start = time.perf_counter()
    bar = progress(total=epochs * n_batches, desc=f"training {S} seed{'s' if S > 1 else ''}",
                   disable=not show_progress)
    for epoch in range(epochs):
        if k_scheds is not None:
            stacked.set_k([sch(epoch) for sch in k_scheds])
        stacked.train()
        t0 = time.perf_counter()
        correct = torch.zeros(S, dtype=torch.long, device=dev)
        seen = 0
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (S, n): each seed's own order
        for start in range(0, n, batch_size):
            idx = order[:, start:start + batch_size]
            if t_scheds is not None:
                stacked.set_temperature([sch(step) for sch in t_scheds])
            flat = idx.reshape(-1)
            B = idx.shape[1]
            # index_select on the flat index: about twice as fast as x[idx] with an (S, B) index.
            xb = x_all.index_select(0, flat).view(S, B, *x_all.shape[1:]).to(dev)
            yb = y_all.index_select(0, flat).view(S, B, *y_all.shape[1:]).to(dev)
            ib = None if ids_all is None else ids_all.index_select(0, flat).view(S, B).to(dev)
            out = stacked(xb, ib)
            task = _per_seed_loss(loss_fn, out, yb)
            if len(moes) == 1:
                aux = dict(moes[0].aux_losses)
            else:
                aux = {f"{name}[{i}]": v for i, m in enumerate(moes) for name, v in m.aux_losses.items()}
            if aux_names is None:
                aux_names = list(aux)
            loss = task
            per_module = [torch.stack(list(m.aux_losses.values())).sum(0) for m in moes if m.aux_losses]
            if per_module:
                loss = task + torch.stack(per_module).sum(0)
            if out.dim() == 3 and yb.dim() == 2:
                correct += (out.detach().argmax(-1) == yb).sum(1)
            seen += idx.shape[1]
            stats = torch.stack([loss.detach(), task.detach(), *(aux[k].detach() for k in aux_names),
                                 correct.to(loss.dtype)]).tolist()
            for s in range(S):
                if active[s] and not math.isfinite(stats[0][s]):
                    parts = ", ".join(f"{k}={stats[j][s]:.4g}" for j, k in enumerate(["task", *aux_names], 1))
                    raise FloatingPointError(
                        f"{where}: non-finite loss {stats[0][s]} at step {step} (epoch {epoch}) of seed {seeds[s]} "
                        f"(seed index {s}); parts: {parts}. Lower the learning rate, enable clip_grad, or add the z loss."
                    )
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            grad_norms = None
            if clip_grad is not None:
                grad_norms = _clip_per_seed(trainable, clip_grad, S)
            opt.step()
            for sm in moes:
                sm.update_expert_bias()  # as fit does after every optimiser step
            util = None
            if moes:
                util = torch.stack([m.last[3].float().sum(1) / m.last[3].float().sum((1, 2)).clamp_min(1).unsqueeze(1)
                                    for m in moes], 1).tolist()  # (S, modules, E)
            rows = []
            for s in range(S):
                row = {"step": step, "epoch": epoch, "loss": stats[0][s], "task": stats[1][s],
                       "train_acc": stats[-1][s] / seen,
                       **{k: stats[j][s] for j, k in enumerate(aux_names, 2)}}
                if grad_norms is not None:
                    row["grad_norm"] = grad_norms[s]
                if util is not None:
                    row["utilization"] = util[s]
                    row["dropped"] = [0.0] * len(moes)
                rows.append(row)
                if active[s]:
                    hists[s].steps.append(row)
            if callback is not None:
                callback(rows, stacked)
            step += 1
            bar.update(1)
            if max_steps is not None and step >= max_steps:
                break
        seconds = time.perf_counter() - t0
        acc_list = (correct.double() / max(seen, 1)).tolist()
        test_acc = test_loss = None
        if test is not None:
            test_acc, test_loss = _evaluate(stacked, test, loss_fn, dev)
            bar.set_postfix(test_acc=f"{sum(test_acc) / S:.3f} (mean of {S})")
        for s in range(S):
            if not active[s]:
                continue
            erow = {"epoch": epoch, "train_acc": acc_list[s], "seconds": seconds}
            if moes and moes[0].kind == "TopKRouter":  # as fit: routers without a k (softmax) log none
                erow["k"] = moes[0].ks[s]
            if test is not None:
                erow.update(test_acc=test_acc[s], test_loss=test_loss[s])
            hists[s].epochs.append(erow)
            if early_stopping is not None:
                score = erow["test_acc"] if stop_on == "test_acc" else -erow["test_loss"]
                if best[s] is None or score > best[s][0]:
                    best[s] = (score, epoch, _seed_slices(stacked, s))
                    bad[s] = 0
                    hists[s].best_epoch = epoch
                else:
                    bad[s] += 1
                    if bad[s] >= early_stopping:
                        hists[s].stopped_early = True
                        active[s] = False
        if not any(active) or (max_steps is not None and step >= max_steps):
            break
    bar.close()
    for s in range(S):
        if best[s] is not None:
            _restore_seed(stacked, s, best[s][2])
    stacked.write_back()
    return SeedRuns(seeds, models, hists, time.perf_counter() - t_start,
                    path=describe_path(stacked))


def _adam(groups, lr, weight_decay):
    """Adam as ``fit`` uses it, in its fused form where this torch has one: one pass over each
    stacked tensor instead of about ten (Adam is elementwise, so stacking changes nothing else;
    the fused kernel rounds differently from the loop in the last bit)."""
    try:
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


def _seed_slices(stacked: StackedModel, s: int) -> dict:
    """Copies of seed s's part of every stacked parameter (for early stopping's best state)."""
    out = {}
    for name, p in stacked.named_parameters():
        out[name] = _seed_view(stacked, name, p, s).detach().clone()
    return out


def _restore_seed(stacked: StackedModel, s: int, state: dict) -> None:
    with torch.no_grad():
        for name, p in stacked.named_parameters():
            _seed_view(stacked, name, p, s).copy_(state[name])


def _seed_view(stacked: StackedModel, name: str, p: torch.Tensor, s: int) -> torch.Tensor:
    """Seed s's part of the stacked parameter ``p`` (a view). Every stacked parameter's leading
    dim is seed-major: S, or S * members (experts, conv channels), so seed s owns one slice."""
    per = p.shape[0] // stacked.S
    return p[s * per:(s + 1) * per]


def _clip_per_seed(params, max_norm: float, S: int) -> list[float]:
    """Clip each seed's gradient to global norm ``max_norm`` (as ``clip_grad_norm_`` does per model);
    returns each seed's norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return [0.0] * S
    sq = torch.stack([g.reshape(S, -1).pow(2).sum(1) for g in grads]).sum(0)
    norms = sq.sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.view(S, -1).mul_(coef.unsqueeze(1))  # leading dims are seed-major (see _seed_view)
    return norms.tolist()


def describe_path(stacked: StackedModel) -> str:
    """In words, what ran for each part of the stacked model (for a chapter or benchmark to print)."""
    parts = []
    for sm in stacked.moes:
        parts.append(f"MoE with {sm.kind}: {sm.E} experts stacked over {stacked.S} seeds "
                     f"({stacked.S * sm.E} members), every expert computed, combine weights masking the unchosen")
    if not parts:
        parts.append(f"{stacked.S} seeds stacked: batched matrix products / grouped convolutions")
    return "; ".join(parts)
