"""A tiny decoder-only transformer whose feed-forward layers may be Mixtures of Experts.

nanoGPT-shaped: token + position embeddings, pre-norm blocks (causal self-attention, then a
feed-forward layer, each inside a residual connection), a final LayerNorm and a linear head.
The feed-forward layer of each block is chosen by ``LMConfig.ffn``:

* ``"dense"`` - Linear, GELU, Linear (:class:`DenseFFN`);
* ``"moe"``   - a :class:`tutorial_moe.MoELayer` (E experts, top-k, learned or oracle router);
* ``"smoe"``  - a :class:`tutorial_moe.experiments.smoe.SMoELayer` (one shared network, M fixed dropout masks).

Shapes: tokens and targets (B, T) int64, ``domains`` (B, T) int64 (one label per position, used
by oracle routers and for scoring), logits (B, T, V).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validate import check_choice, check_int, check_positive_float
from .corpus import VOCAB_SIZE, TextSplit, char_classes, decode, encode, eval_windows, sample_batch
from ..moe import MoELayer, moe_modules
from ..routing import OracleRouter, TopKRouter
from ..runtime import seed_everything
from .smoe import RandomRouter, SMoELayer  # smoe imports this module only inside functions: no cycle
from ..train import History, fit

__all__ = ["LMConfig", "DenseFFN", "CausalSelfAttention", "Block", "TinyLM", "lm_loss", "train_lm",
           "evaluate_lm", "generate", "collect_lm_routing", "parameter_counts", "ffn_modules"]

_FFN_KINDS = ("dense", "moe", "smoe")
_ROUTERS = ("learned", "oracle", "random")


@dataclass
class LMConfig:
    """Everything that defines a :class:`TinyLM`.

    ``d_hidden`` is the hidden width of the dense FFN, of *each* expert ("moe"), or of the one
    shared network ("smoe"). ``num_experts`` is E for "moe" and the number of masks M for "smoe".
    ``router``: "learned" (a linear gate, top-k), "oracle" (expert/mask = the domain label) or
    "random" (a uniformly random expert/mask per token, k=1).
    ``keep``: the share of hidden units each sMoE mask keeps; ``disjoint_masks`` makes the masks
    partition the units (then keep = 1/M and the sMoE becomes separate experts).
    """

    vocab_size: int = VOCAB_SIZE
    context: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn: str = "dense"
    d_hidden: int = 128
    num_experts: int = 4
    k: int = 1
    router: str = "learned"
    aux_losses: dict | None = None
    keep: float = 0.5
    disjoint_masks: bool = False
    mask_seed: int = 0
    dropout: float = 0.0

    def __post_init__(self):
        w = "LMConfig"
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads", "d_hidden", "num_experts"):
            check_int(name, getattr(self, name), low=1, where=w)
        check_choice("ffn", self.ffn, _FFN_KINDS, where=w)
        check_choice("router", self.router, _ROUTERS, where=w)
        check_int("k", self.k, low=1, high=self.num_experts, where=w)
        if self.d_model % self.n_heads:
            raise ValueError(f"{w}: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{w}: dropout={self.dropout} is not allowed; use 0 <= dropout < 1")

    def replace(self, **changes) -> "LMConfig":
        return LMConfig(**{**asdict(self), **changes})


class DenseFFN(nn.Module):
    """(..., d_model) -> (..., d_model): Linear(d_model, d_hidden), GELU, Linear(d_hidden, d_model)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t. (B, T, d) -> (B, T, d)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


def _make_ffn(cfg: LMConfig) -> nn.Module:
    if cfg.ffn == "dense":
        return DenseFFN(cfg.d_model, cfg.d_hidden)
    if cfg.ffn == "smoe":
        return SMoELayer(cfg.d_model, cfg.d_hidden, cfg.num_experts, keep=cfg.keep, router=cfg.router, k=cfg.k,
                         disjoint=cfg.disjoint_masks, mask_seed=cfg.mask_seed, losses=cfg.aux_losses)
    if cfg.router == "oracle":
        router = OracleRouter(cfg.num_experts)
    elif cfg.router == "random":
        router = RandomRouter(cfg.num_experts)
    else:
        # The default router renormalises only while k > 1: at k=1 a renormalised weight is always
        # exactly 1 and the gate would get no gradient from the task (Switch keeps the raw probability).
        router = TopKRouter(cfg.d_model, cfg.num_experts, cfg.k)
    return MoELayer(cfg.d_model, cfg.d_hidden, cfg.num_experts, cfg.k, router=router, losses=cfg.aux_losses)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + ffn(ln(x), ids)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = _make_ffn(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x), ids))


class TinyLM(nn.Module):
    """A character-level decoder-only transformer. ``forward(tokens (B, T), domains=None) -> logits (B, T, V)``.

    ``domains`` is only read by oracle routers (and ignored by dense layers and learned routers).
    """

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if not isinstance(cfg, LMConfig):
            raise TypeError(f"TinyLM: cfg must be an LMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, tokens: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"TinyLM: tokens must be a (batch, time) int64 tensor, got "
                             f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
        B, T = tokens.shape
        if T > self.cfg.context:
            raise ValueError(f"TinyLM: sequence length {T} exceeds context={self.cfg.context}")
        if domains is not None and tuple(domains.shape) != (B, T):
            raise ValueError(f"TinyLM: domains must have shape {(B, T)} like tokens, got {tuple(domains.shape)}")
        if domains is None and any(isinstance(getattr(m, "router", None), OracleRouter) for m in moe_modules(self)):
            raise ValueError("TinyLM: this model routes by domain (router='oracle'); pass domains=(B, T) labels")
        pos = torch.arange(T, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x, domains)
        return self.head(self.ln_f(x))


def ffn_modules(model: TinyLM) -> list[nn.Module]:
    """The feed-forward module of every block, in order (dense, MoE or sMoE)."""
    return [b.ffn for b in model.blocks]


def parameter_counts(model: TinyLM) -> dict:
    """``total`` parameters and ``active`` ones (those a single token uses).

    An MoE layer's token uses k of E experts; an sMoE token uses its mask's share of the hidden units.
    """
    total = sum(p.numel() for p in model.parameters())
    idle = 0.0
    for f in ffn_modules(model):
        if isinstance(f, MoELayer):
            expert_params = sum(p.numel() for p in f.experts.parameters())
            k = f.k or 1  # fixed (oracle) routers have no k: one expert per token
            idle += expert_params * (1 - k / f.num_experts)
        elif hasattr(f, "idle_parameters"):
            idle += f.idle_parameters()
    return {"total": int(total), "active": int(round(total - idle))}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy in nats: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_lm(model: TinyLM, split: TextSplit, steps: int, *, batch_size: int = 32, lr: float = 6e-3,
             seed: int = 0, domain_weights=None, clip_grad: float | None = 1.0, show_progress: bool = True,
             callback=None) -> History:
    """Train ``model`` for ``steps`` Adam steps on random windows of ``split``.

    The windows are drawn up front from a generator seeded with ``seed`` (so models trained with the
    same seed see exactly the same batches) and handed to :func:`tutorial_moe.train.fit`, which
    adds the auxiliary losses, clips gradients, guards against non-finite losses and logs each MoE
    layer's utilisation per step. ``domain_weights`` sets how often each domain is drawn.
    """
    where = "train_lm"
    if not isinstance(model, TinyLM):
        raise TypeError(f"{where}: model must be a TinyLM, got {type(model).__name__}")
    check_int("steps", steps, low=1, where=where)
    check_int("batch_size", batch_size, low=1, where=where)
    gen = seed_everything(seed)
    x, y, d = sample_batch(split, steps * batch_size, model.cfg.context, generator=gen, domain_weights=domain_weights)
    return fit(model, (x, y, d), epochs=1, batch_size=batch_size, lr=lr, loss_fn=lm_loss, clip_grad=clip_grad,
               seed=seed, show_progress=show_progress, callback=callback, max_steps=steps)


@torch.no_grad()
def evaluate_lm(model: TinyLM, split: TextSplit, *, max_windows: int | None = 64, batch_size: int = 64,
                predict=None, domain_names=None) -> dict:
    """Validation loss (nats per character) overall and per domain, on fixed non-overlapping windows.

    ``max_windows`` windows per domain, so every domain counts equally in ``loss``. Also returns
    ``window_loss`` (windows,) and ``window_domain`` (windows,) tensors, for paired comparisons
    of two predictors on the same windows (``tutorial_moe.book.evidence.compare``).
    ``predict(tokens, domains) -> log-probabilities (B, T, V)`` replaces the model's own prediction
    (e.g. an ensemble over masks); default ``log_softmax(model(tokens, domains))``.
    """
    x, y, d = eval_windows(split, model.cfg.context, max_windows=max_windows)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = []
    for s in range(0, len(x), batch_size):
        xb, yb, db = (t[s:s + batch_size].to(dev) for t in (x, y, d))
        logp = predict(xb, db) if predict is not None else F.log_softmax(model(xb, db), -1)
        nll.append(-logp.gather(-1, yb.unsqueeze(-1)).squeeze(-1).cpu())
    model.train(was_training)
    nll = torch.cat(nll).double()  # (windows, T)
    window_domain = d[:, 0].clone()  # every window lies inside one domain
    d = d.flatten()
    flat = nll.flatten()
    names = domain_names or [str(i) for i in range(len(split.spans))]
    per = {names[i]: float(flat[d == i].mean()) for i in range(len(split.spans)) if (d == i).any()}
    return {"loss": float(torch.tensor(list(per.values())).mean()), "per_domain": per,
            "window_loss": nll.mean(1), "window_domain": window_domain}


@torch.no_grad()
def generate(model: TinyLM, prompt: str, max_new_tokens: int = 100, *, temperature: float = 0.8,
             top_k: int | None = None, seed: int = 0, domain: int | None = None) -> str:
    """Continue ``prompt`` by sampling ``max_new_tokens`` characters; returns prompt + continuation.

    ``domain`` labels every position (needed by oracle routers). ``top_k`` keeps only the k most
    likely characters at each step. Sampling uses its own generator seeded with ``seed``.
    """
    where = "generate"
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: prompt must be a non-empty str, got {prompt!r}")
    check_int("max_new_tokens", max_new_tokens, low=0, where=where)
    check_positive_float("temperature", temperature, where=where)
    if top_k is not None:
        check_int("top_k", top_k, low=1, high=model.cfg.vocab_size, where=where)
    if model.cfg.router == "oracle" and model.cfg.ffn != "dense" and domain is None:
        raise ValueError(f"{where}: this model routes by domain; pass domain= (e.g. 0 for prose)")
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = encode(prompt).unsqueeze(0).to(dev)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        window = tokens[:, -model.cfg.context:]
        doms = None if domain is None else torch.full_like(window, domain)
        logits = model(window, doms)[0, -1] / temperature
        if top_k is not None:
            cutoff = logits.topk(top_k).values[-1]
            logits = logits.masked_fill(logits < cutoff, float("-inf"))
        nxt = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen).to(dev)
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    model.train(was_training)
    return decode(tokens[0].cpu())


@torch.no_grad()
def collect_lm_routing(model: TinyLM, split: TextSplit, *, max_windows: int | None = 32, batch_size: int = 64,
                       num_position_buckets: int = 4) -> list[dict]:
    """Run ``model`` over fixed validation windows and return, for every MoE/sMoE layer, a dict of
    per-token tensors (N = windows x context):

    ``mask`` (N, E) bool, ``probs`` (N, E), and labels (N,) int64: ``token`` (the input character),
    ``domain``, ``char_class`` (of the input character, indexing ``CHAR_CLASSES``), ``position``
    (0..T-1) and ``position_bucket`` (``num_position_buckets`` equal ranges of positions).
    """
    mods = moe_modules(model)
    if not mods:
        raise ValueError("collect_lm_routing: the model has no MoE layer (its ffn is 'dense')")
    check_int("num_position_buckets", num_position_buckets, low=1, high=model.cfg.context, where="collect_lm_routing")
    x, _, d = eval_windows(split, model.cfg.context, max_windows=max_windows)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = [{"mask": [], "probs": []} for _ in mods]
    for s in range(0, len(x), batch_size):
        model(x[s:s + batch_size].to(dev), d[s:s + batch_size].to(dev))
        for store, m in zip(parts, mods):
            store["mask"].append(m.last_routing.mask.cpu())
            store["probs"].append(m.last_routing.probs.float().cpu())
    model.train(was_training)
    T = model.cfg.context
    position = torch.arange(T).repeat(len(x))
    labels = {"token": x.flatten(), "domain": d.flatten(), "char_class": char_classes(x.flatten()),
              "position": position, "position_bucket": position * num_position_buckets // T}
    return [{"mask": torch.cat(p["mask"]), "probs": torch.cat(p["probs"]), **labels} for p in parts]
