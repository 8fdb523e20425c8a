"""A synthetic token-level task whose ideal routing is known: a mixture of regimes.

Every sample (a "token") belongs to one of R regimes. Regime ``r`` has a centre ``mu_r`` in input
space and its own target function ``f_r``, a random teacher network reading the sample's offset
from that centre::

    x = mu_r + z,            z ~ N(0, I_d_in)
    y = f_r(z) = V_r sin(U_r z + phase_r) / sqrt(width)    (then scaled to unit variance)

The centres make the regime readable from ``x`` (a router *can* find it); the unrelated teachers
make a single small network fit R different functions at once (a dense model of the same active
size is stretched thin). Because the true regime of each token is stored, specialisation can be
scored against ground truth (``tutorial_moe.metrics.specialization``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validate import check_int, check_positive_float

__all__ = ["RegimeSplit", "MixtureOfRegimes", "r2_score"]


@dataclass
class RegimeSplit:
    """Samples of a :class:`MixtureOfRegimes`.

    x (N, d_in) float32 inputs, y (N, d_out) float32 targets, regime (N,) int64 true regime,
    index (N,) int64 a unique id per sample (a stand-in for a token id, e.g. for hash routing).
    """

    x: torch.Tensor
    y: torch.Tensor
    regime: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def tensors(self, with_ids: bool = False) -> tuple:
        """(x, y) for ``fit``/``evaluate``, or (x, y, index) when the model routes by id."""
        return (self.x, self.y, self.index) if with_ids else (self.x, self.y)

    def token_ids(self, bits: int = 8) -> torch.Tensor:
        """(N,) int64 a discrete "token id" read from the input: the sign pattern of the first
        ``bits`` coordinates of x as a binary number (a vocabulary of 2**bits ids). Hash routing
        on it (Roller et al., arXiv 2106.04426) sends equal inputs to equal experts, as hashing a
        word's id does; unlike ``index`` it depends on the content."""
        check_int("bits", bits, low=1, high=min(self.x.shape[1], 62), where="RegimeSplit.token_ids")
        powers = 2 ** torch.arange(bits, dtype=torch.int64)
        return ((self.x[:, :bits] > 0).to(torch.int64) * powers).sum(1)

    def with_token_ids(self, bits: int = 8) -> "RegimeSplit":
        """The same samples with ``index`` replaced by :meth:`token_ids` (what a model routing by
        id then reads)."""
        return RegimeSplit(self.x, self.y, self.regime, self.token_ids(bits))

    def subset(self, n: int) -> "RegimeSplit":
        """The first ``n`` samples (already in random order)."""
        check_int("n", n, low=1, high=len(self), where="RegimeSplit.subset")
        return RegimeSplit(self.x[:n], self.y[:n], self.regime[:n], self.index[:n])


class MixtureOfRegimes:
    """R regimes, each a cluster in input space with its own random target function.

    Args:
        num_regimes: R.  d_in, d_out: input and target widths.
        teacher_width: hidden width of each regime's teacher (more = harder to fit).
        frequency: scale of the teacher's input weights (more = wigglier targets, harder to fit).
        separation: distance of each centre from the origin; centres are spread on a sphere, so
            neighbouring regimes are about ``separation * sqrt(2)`` apart against unit-variance noise.
        noise: std of Gaussian noise added to the targets (0 = the task is exactly learnable).
        seed: fixes the centres and teachers (the task); sampling has its own seed.
    """

    def __init__(self, num_regimes: int = 8, d_in: int = 16, d_out: int = 4, teacher_width: int = 16,
                 frequency: float = 1.5, separation: float = 4.0, noise: float = 0.0, seed: int = 0):
        where = "MixtureOfRegimes"
        self.num_regimes = check_int("num_regimes", num_regimes, low=1, where=where)
        self.d_in = check_int("d_in", d_in, low=1, where=where)
        self.d_out = check_int("d_out", d_out, low=1, where=where)
        self.teacher_width = check_int("teacher_width", teacher_width, low=1, where=where)
        self.frequency = check_positive_float("frequency", frequency, where=where)
        self.separation = check_positive_float("separation", separation, where=where, allow_zero=True)
        self.noise = check_positive_float("noise", noise, where=where, allow_zero=True)
        self.seed = check_int("seed", seed, low=0, where=where)
        g = torch.Generator().manual_seed(seed)
        R, d, w = num_regimes, d_in, teacher_width
        centres = torch.randn(R, d, generator=g)
        self.centres = centres / centres.norm(dim=1, keepdim=True) * separation  # (R, d_in)
        self.U = torch.randn(R, d, w, generator=g) * (frequency / math.sqrt(d))  # (R, d_in, width)
        self.phase = torch.rand(R, w, generator=g) * 2 * math.pi  # (R, width)
        self.V = torch.randn(R, w, d_out, generator=g)  # (R, width, d_out)
        # Per-regime output scale so every regime's targets have unit variance: no regime dominates the MSE.
        probe = torch.randn(4096, d, generator=g)
        raw = torch.stack([self._raw(probe, torch.full((4096,), r)) for r in range(R)])  # (R, 4096, d_out)
        self.scale = raw.std(dim=1).mean(-1).clamp_min(1e-6)  # (R,)

    def __repr__(self) -> str:
        return (f"MixtureOfRegimes(num_regimes={self.num_regimes}, d_in={self.d_in}, d_out={self.d_out}, "
                f"teacher_width={self.teacher_width}, frequency={self.frequency}, separation={self.separation}, "
                f"noise={self.noise}, seed={self.seed})")

    def _raw(self, z: torch.Tensor, regime: torch.Tensor) -> torch.Tensor:
        h = torch.sin(torch.einsum("nd,ndw->nw", z, self.U[regime]) + self.phase[regime])
        return torch.einsum("nw,nwo->no", h, self.V[regime]) / math.sqrt(self.teacher_width)

    def target(self, x: torch.Tensor, regime: torch.Tensor) -> torch.Tensor:
        """Noise-free targets (N, d_out) of inputs x (N, d_in) whose regimes are ``regime`` (N,)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"MixtureOfRegimes.target: x must have shape (N, {self.d_in}), got {tuple(getattr(x, 'shape', ()))}")
        regime = torch.as_tensor(regime, dtype=torch.long)
        if regime.shape != (x.shape[0],):
            raise ValueError(f"MixtureOfRegimes.target: regime must have shape ({x.shape[0]},), got {tuple(regime.shape)}")
        if regime.numel() and (regime.min() < 0 or regime.max() >= self.num_regimes):
            raise ValueError(f"MixtureOfRegimes.target: regime values must lie in 0..{self.num_regimes - 1}")
        z = x - self.centres[regime]
        return self._raw(z, regime) / self.scale[regime].unsqueeze(1)

    def sample(self, n: int, seed: int = 0, first_index: int = 0) -> RegimeSplit:
        """``n`` samples with regimes in equal shares (in random order); ``index`` counts from ``first_index``."""
        check_int("n", n, low=1, where="MixtureOfRegimes.sample")
        check_int("seed", seed, low=0, where="MixtureOfRegimes.sample")
        g = torch.Generator().manual_seed(10_007 * (self.seed + 1) + seed)
        regime = torch.arange(n) % self.num_regimes
        regime = regime[torch.randperm(n, generator=g)]
        z = torch.randn(n, self.d_in, generator=g)
        x = self.centres[regime] + z
        y = self.target(x, regime)
        if self.noise > 0:
            y = y + self.noise * torch.randn(n, self.d_out, generator=g)
        index = torch.arange(first_index, first_index + n)
        return RegimeSplit(x.float(), y.float(), regime, index)

    def splits(self, n_train: int, n_test: int, seed: int = 0) -> tuple[RegimeSplit, RegimeSplit]:
        """Independent train and test samples (different seeds, non-overlapping ids)."""
        check_int("n_train", n_train, low=1, where="MixtureOfRegimes.splits")
        check_int("n_test", n_test, low=1, where="MixtureOfRegimes.splits")
        return self.sample(n_train, seed=2 * seed), self.sample(n_test, seed=2 * seed + 1, first_index=n_train)


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Coefficient of determination 1 - SSE / SST over all outputs (1 = perfect, 0 = predicting the mean)."""
    if not isinstance(pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("r2_score: pred and y must be torch.Tensors")
    if pred.shape != y.shape:
        raise ValueError(f"r2_score: pred shape {tuple(pred.shape)} != y shape {tuple(y.shape)}")
    y = y.double()
    sse = (pred.double() - y).pow(2).sum()
    sst = (y - y.mean(0)).pow(2).sum()
    if sst <= 0:
        raise ValueError("r2_score: y is constant, so R^2 is undefined")
    return float(1 - sse / sst)
