"""Experts (and the small gate networks of seed 004).

* :class:`MLPExpert` - seed 002's expert: hidden layers, optional skip connections and LayerNorm.
* :class:`SwiGLUExpert` - the gated feed-forward of modern LLMs (Mixtral, DeepSeek).
* :class:`ConvExpert` - seed 004's image classifier: conv-pool-conv-pool-fc-fc.
* :class:`ConvGate`, :class:`DenseGate` - seed 004's two learned gates (they output logits).
* :class:`ExpertBank` - E same-shape feed-forward experts stored as stacked weights
  ``(E, d_in, d_out)``, which is what fast dispatch needs (one tensor per weight, sliceable by expert).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import check_choice, check_int

__all__ = ["MLPExpert", "SwiGLUExpert", "ConvExpert", "ConvGate", "DenseGate", "ExpertBank", "ACTIVATIONS"]

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh}


def _flatten(x: torch.Tensor) -> torch.Tensor:
    # Whole-image experts (seed 000) take (N, C, H, W); token experts take (T, d).
    return x.flatten(1) if x.dim() > 2 else x


class MLPExpert(nn.Module):
    """A feed-forward expert: Linear(d_in, d_hidden), ``depth - 1`` more hidden layers, Linear(d_hidden, d_out).

    ``skip``: residual connections around each hidden layer (and around the whole expert when
    d_in == d_out), which keep gradients flowing (seed 002). ``layer_norm``: a LayerNorm on the
    input (pre-norm), for stable training. Inputs with more than 2 dims are flattened from dim 1.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int | None = None, depth: int = 1, activation: str = "gelu",
                 skip: bool = False, layer_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        where = "MLPExpert"
        self.d_in = check_int("d_in", d_in, low=1, where=where)
        check_int("d_hidden", d_hidden, low=1, where=where)
        self.d_out = d_in if d_out is None else check_int("d_out", d_out, low=1, where=where)
        check_int("depth", depth, low=1, where=where)
        self.activation = check_choice("activation", activation, ACTIVATIONS, where=where)
        self.skip, self.layer_norm = skip, layer_norm
        self.norm = nn.LayerNorm(d_in) if layer_norm else nn.Identity()
        self.fc_in = nn.Linear(d_in, d_hidden)
        self.hidden = nn.ModuleList(nn.Linear(d_hidden, d_hidden) for _ in range(depth - 1))
        self.fc_out = nn.Linear(d_hidden, self.d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _flatten(x)
        if x.shape[-1] != self.d_in:
            raise ValueError(f"MLPExpert: input width {x.shape[-1]} (shape {tuple(x.shape)}) != d_in={self.d_in}")
        act = ACTIVATIONS[self.activation]
        h = self.drop(act(self.fc_in(self.norm(x))))
        for layer in self.hidden:
            step = self.drop(act(layer(h)))
            h = h + step if self.skip else step
        out = self.fc_out(h)
        if self.skip and self.d_out == self.d_in:
            out = out + x
        return out


class SwiGLUExpert(nn.Module):
    """down(silu(gate(x)) * up(x)), bias-free as in Mixtral."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        check_int("d_model", d_model, low=1, where="SwiGLUExpert")
        check_int("d_hidden", d_hidden, low=1, where="SwiGLUExpert")
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class ConvExpert(nn.Module):
    """Seed 004's expert: conv(width) - pool - conv(width) - pool - fc(fc) - fc(num_classes), ReLU.

    The seed uses width=128, fc=128 on 32x32 grayscale images; the book's default mode uses
    narrower nets to fit the CPU budget (each chapter says which).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 20, width: int = 128, fc: int = 128, image_size: int = 32,
                 conv_activation: bool = True):
        super().__init__()
        where = type(self).__name__
        check_int("in_channels", in_channels, low=1, where=where)
        check_int("num_classes", num_classes, low=1, where=where)
        check_int("width", width, low=1, where=where)
        check_int("fc", fc, low=1, where=where)
        check_int("image_size", image_size, low=4, where=where)
        self.in_channels, self.image_size = in_channels, image_size
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv_activation = conv_activation
        side = math.ceil(math.ceil(image_size / 2) / 2)  # 'same' pooling rounds up, as in the seed
        self.fc1 = nn.Linear(width * side * side, fc)
        self.fc2 = nn.Linear(fc, num_classes)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size:
            raise ValueError(
                f"{type(self).__name__}: x must have shape (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        # Pooling before the ReLU gives the same values and gradients (max and ReLU commute)
        # and runs the ReLU on a quarter of the elements.
        act = F.relu if self.conv_activation else (lambda t: t)
        h = act(F.max_pool2d(self.conv1(x), 2, ceil_mode=True))
        h = act(F.max_pool2d(self.conv2(h), 2, ceil_mode=True))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


class ConvGate(ConvExpert):
    """Seed 004's convolutional gate: conv(64) - pool - conv(64) - pool - fc(64) - fc(E) logits.

    As in the seed, the two convolutions have no activation (only the fc layer has a ReLU).
    """

    def __init__(self, num_experts: int = 2, in_channels: int = 1, width: int = 64, fc: int = 64, image_size: int = 32):
        super().__init__(in_channels, num_experts, width, fc, image_size, conv_activation=False)


class DenseGate(nn.Module):
    """Seed 004's dense gate: flatten - fc(hidden) ReLU - fc(E) logits."""

    def __init__(self, in_features: int, num_experts: int = 2, hidden: int = 64):
        super().__init__()
        check_int("in_features", in_features, low=1, where="DenseGate")
        check_int("num_experts", num_experts, low=1, where="DenseGate")
        check_int("hidden", hidden, low=1, where="DenseGate")
        self.in_features = in_features
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    def forward(self, x):
        x = _flatten(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"DenseGate: input has {x.shape[-1]} features (shape {tuple(x.shape)}), expected {self.in_features}")
        return self.net(x)


class ExpertBank(nn.Module):
    """E same-shape feed-forward experts held as stacked weights.

    kind="mlp":    y = W2[e] act(W1[e] x + b1[e]) + b2[e]    (w1: (E, d_model, d_hidden), w2: (E, d_hidden, d_model))
    kind="swiglu": y = Wd[e] (silu(Wg[e] x) * Wu[e] x)      (bias-free)

    The same parameters serve every dispatch mode, so a ``state_dict`` moves freely between them.
    Initialisation matches ``nn.Linear`` (uniform in +-1/sqrt(fan_in)) expert by expert.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, kind: str = "mlp", activation: str = "gelu"):
        super().__init__()
        where = "ExpertBank"
        self.num_experts = check_int("num_experts", num_experts, low=1, where=where)
        self.d_model = check_int("d_model", d_model, low=1, where=where)
        self.d_hidden = check_int("d_hidden", d_hidden, low=1, where=where)
        self.kind = check_choice("expert", kind, ("mlp", "swiglu"), where=where)
        self.activation = check_choice("activation", activation, ACTIVATIONS, where=where)
        E, d, h = num_experts, d_model, d_hidden

        def uniform(*shape, fan_in):
            bound = 1 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        if kind == "mlp":
            self.w1, self.b1 = uniform(E, d, h, fan_in=d), uniform(E, h, fan_in=d)
            self.w2, self.b2 = uniform(E, h, d, fan_in=h), uniform(E, d, fan_in=h)
        else:
            self.w_gate, self.w_up = uniform(E, d, h, fan_in=d), uniform(E, d, h, fan_in=d)
            self.w_down = uniform(E, h, d, fan_in=h)

    def extra_repr(self):
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, kind={self.kind!r}"

    def expert_params(self) -> list[tuple[torch.Tensor, ...]]:
        """Per-expert weight tuples, from one ``unbind`` per stacked tensor.

        Indexing ``w[e]`` inside a loop would make each backward build a full-size zero gradient
        per expert (cost ~E^2); ``unbind`` once gives all E views with a single backward.
        """
        if self.kind == "mlp":
            return list(zip(self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)))
        return list(zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)))

    def apply_expert(self, params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        """Run one expert (given its weights from :meth:`expert_params`) on tokens x (n, d_model)."""
        if self.kind == "mlp":
            w1, b1, w2, b2 = params
            return torch.addmm(b2, ACTIVATIONS[self.activation](torch.addmm(b1, x, w1)), w2)
        wg, wu, wd = params
        return (F.silu(x @ wg) * (x @ wu)) @ wd

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: (T, d_model) -> (E, T, d_model). The dense oracle's workhorse."""
        if self.kind == "mlp":
            h = ACTIVATIONS[self.activation](torch.einsum("td,edh->eth", x, self.w1) + self.b1[:, None, :])
            return torch.einsum("eth,ehd->etd", h, self.w2) + self.b2[:, None, :]
        g = torch.einsum("td,edh->eth", x, self.w_gate)
        u = torch.einsum("td,edh->eth", x, self.w_up)
        return torch.einsum("eth,ehd->etd", F.silu(g) * u, self.w_down)

    def as_module(self, e: int) -> nn.Module:
        """Expert ``e`` as an ordinary module holding copies of its weights (for tests and teaching)."""
        check_int("e", e, low=0, high=self.num_experts - 1, where="ExpertBank.as_module")
        with torch.no_grad():
            if self.kind == "mlp":
                m = MLPExpert(self.d_model, self.d_hidden, self.d_model, activation=self.activation)
                m.fc_in.weight.copy_(self.w1[e].t()); m.fc_in.bias.copy_(self.b1[e])
                m.fc_out.weight.copy_(self.w2[e].t()); m.fc_out.bias.copy_(self.b2[e])
            else:
                m = SwiGLUExpert(self.d_model, self.d_hidden)
                m.w_gate.weight.copy_(self.w_gate[e].t()); m.w_up.weight.copy_(self.w_up[e].t())
                m.w_down.weight.copy_(self.w_down[e].t())
        return m

    def active_params_per_token(self, k: int) -> int:
        """Parameters one token touches when routed to k experts."""
        return k * sum(p.numel() for p in self.parameters()) // self.num_experts
