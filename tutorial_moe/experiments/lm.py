"""A tiny decoder-only transformer whose feed-forward layers may be Mixtures of Experts.

nanoGPT-shaped: token + position embeddings, pre-norm blocks (causal self-attention, then a
feed-forward layer, each inside a residual connection), a final LayerNorm and a linear head.
The feed-forward layer of each block is chosen by ``LMConfig.ffn``:

* ``"dense"`` - Linear, GELU, Linear (:class:`DenseFFN`);
* ``"moe"``   - a :class:`tutorial_moe.MoELayer` (E experts, top-k, learned or oracle router);
* ``"smoe"``  - a :class:`tutorial_moe.experiments.smoe.SMoELayer` (one shared network, M fixed dropout masks);
* ``"shared"`` - a :class:`tutorial_moe.shared_experts.SharedExpertMoE` (one shared expert of width
  ``shared_hidden`` that every token uses, plus E routed experts of width ``d_hidden``; DeepSeekMoE).

Shapes: tokens and targets (B, T) int64, ``domains`` (B, T) int64 (one label per position, used
by oracle routers and for scoring), logits (B, T, V).
"""
from __future__ import annotations

import math
import re
import time
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
from ..metrics import utilization
from ..routing import update_expert_biases
from ..runtime import progress
from ..shared_experts import SharedExpertMoE
from ..train import History

__all__ = ["LMConfig", "DenseFFN", "CausalSelfAttention", "Block", "TinyLM", "lm_loss", "train_lm",
           "evaluate_lm", "generate", "lr_at", "train_many",
           "arithmetic_accuracy", "shuffle_within", "collect_lm_routing", "parameter_counts", "ffn_modules"]

_FFN_KINDS = ("dense", "moe", "smoe", "shared")
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
    shared_hidden: int | None = None

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
    router = _make_router(cfg)
    if cfg.ffn == "shared":
        return SharedExpertMoE(cfg.d_model, cfg.d_hidden, cfg.num_experts, cfg.k, num_shared=1,
                               shared_hidden=cfg.shared_hidden, router=router, losses=cfg.aux_losses)
    return MoELayer(cfg.d_model, cfg.d_hidden, cfg.num_experts, cfg.k, router=router, losses=cfg.aux_losses)


def _make_router(cfg: LMConfig) -> nn.Module:
    if cfg.router == "oracle":
        router = OracleRouter(cfg.num_experts)
    elif cfg.router == "random":
        router = RandomRouter(cfg.num_experts)
    else:
        # The default router renormalises only while k > 1: at k=1 a renormalised weight is always
        # exactly 1 and the gate would get no gradient from the task (Switch keeps the raw probability).
        router = TopKRouter(cfg.d_model, cfg.num_experts, cfg.k)
    return router


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
        if isinstance(f, SharedExpertMoE):
            f = f.moe  # the shared expert is active for every token; only the routed part idles
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


_SCHEDULES = ("constant", "cosine")
_EQUATION_LINE = re.compile(r"^(-?\d{1,3})([+*-])(-?\d{1,3})=(-?\d{1,6})$")


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant", warmup: int = 0,
          min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``steps``.

    ``warmup`` steps rise linearly to ``lr``; then "constant" stays there and "cosine" falls along
    half a cosine to ``min_lr_ratio * lr`` at the last step (nanoGPT's schedule).
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or steps <= warmup + 1:
        return lr
    progress = (step - warmup) / (steps - 1 - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_lm(model: TinyLM, split: TextSplit, steps: int, *, batch_size: int = 32, lr: float = 6e-3,
             seed: int = 0, domain_weights=None, clip_grad: float | None = 1.0, show_progress: bool = True,
             callback=None, schedule: str = "constant", warmup: int = 0, min_lr_ratio: float = 0.1,
             log_utilization: bool = True) -> History:
    """Train ``model`` for ``steps`` Adam steps on random windows of ``split``; returns a History.

    The windows are drawn up front from a generator seeded with ``seed`` (so models trained with the
    same seed see exactly the same batches, in the same order). Each step adds the MoE layers'
    auxiliary losses, clips the gradient norm to ``clip_grad``, applies the learning rate of
    :func:`lr_at` (``schedule``, ``warmup``, ``min_lr_ratio``) and gives every router with
    loss-free balancing its bias step. A non-finite loss raises ``FloatingPointError``.
    ``domain_weights`` sets how often each domain is drawn. Per step the history records
    ``loss``, ``task``, each auxiliary loss, ``lr``, ``grad_norm`` and (``log_utilization``) each
    MoE layer's expert utilisation; ``callback(row, model)`` runs after every step.
    """
    where = "train_lm"
    if not isinstance(model, TinyLM):
        raise TypeError(f"{where}: model must be a TinyLM, got {type(model).__name__}")
    check_int("steps", steps, low=1, where=where)
    check_int("batch_size", batch_size, low=1, where=where)
    check_positive_float("lr", lr, where=where)
    check_choice("schedule", schedule, _SCHEDULES, where=where)
    check_int("warmup", warmup, low=0, high=steps, where=where)
    if clip_grad is not None:
        check_positive_float("clip_grad", clip_grad, where=where)
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"{where}: min_lr_ratio={min_lr_ratio} is not allowed; use 0 <= min_lr_ratio <= 1")
    gen = seed_everything(seed)
    x, y, d = sample_batch(split, steps * batch_size, model.cfg.context, generator=gen, domain_weights=domain_weights)
    dev = next(model.parameters()).device
    # foreach: one fused update over all parameters instead of a Python loop over ~40 small
    # tensors (about 8 % of a CPU step here); the result is the same.
    opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    mods = moe_modules(model)
    hist = History()
    bar = progress(total=steps, desc="training", disable=not show_progress)
    model.train()
    for step in range(steps):
        rate = lr_at(step, steps, lr, schedule, warmup, min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = rate
        s = slice(step * batch_size, (step + 1) * batch_size)
        task = lm_loss(model(x[s].to(dev), d[s].to(dev)), y[s].to(dev))
        aux = {f"{name}[{i}]": v for i, m in enumerate(mods) for name, v in m.aux_losses.items()}
        loss = task + (torch.stack([m.aux_loss for m in mods]).sum() if mods else 0.0)
        if not torch.isfinite(loss):
            parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in {"task": task, **aux}.items())
            raise FloatingPointError(f"{where}: non-finite loss {float(loss.detach())} at step {step}; parts: "
                                     f"{parts}. Lower the learning rate or enable clip_grad.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        row = {"step": step, "loss": float(loss.detach()), "task": float(task.detach()), "lr": rate,
               **{k: float(v.detach()) for k, v in aux.items()}}
        if clip_grad is not None:
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True))
        opt.step()
        update_expert_biases(model)
        if mods and log_utilization:
            row["utilization"] = [utilization(m.last_routing.mask).tolist() for m in mods]
        hist.steps.append(row)
        if callback is not None:
            callback(row, model)
        bar.update(1)
    bar.close()
    return hist


def _train_job(job: dict) -> dict:
    """One run of :func:`train_many` (in a worker process): build, train, evaluate, return."""
    torch.set_num_threads(1)  # tiny matrices: a second thread costs more in hand-offs than it saves
    torch.manual_seed(job["seed"])
    model = TinyLM(job["cfg"])
    start = time.perf_counter()
    cpu0 = time.process_time()
    hist = train_lm(model, job["split"], job["steps"], seed=job["seed"], show_progress=False, **job["train"])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    evaluation = None
    if job["val"] is not None:
        torch.manual_seed(1000 + job["seed"])  # random routers draw during evaluation too
        evaluation = evaluate_lm(model, job["val"], domain_names=job["domain_names"])
    return {"state": model.state_dict(), "history": hist, "evaluation": evaluation, "seconds": seconds,
            "cpu_seconds": cpu}


def train_many(jobs, split: TextSplit, steps: int, *, val: TextSplit | None = None, workers: int = 2,
               domain_names=None, show_progress: bool = True, **train_kwargs) -> list[dict]:
    """Train several language models, ``workers`` at a time in separate processes (one thread each).

    ``jobs`` is a list of ``(name, cfg, seed)``: model ``TinyLM(cfg)`` initialised with
    ``torch.manual_seed(seed)`` and trained by :func:`train_lm` with that seed (so two configs with
    the same seed see the same batches: paired runs). ``train_kwargs`` go to :func:`train_lm`.
    Returns, in the order of ``jobs``, dicts with ``name``, ``seed``, ``cfg``, ``model`` (trained, in
    this process), ``history``, ``seconds`` and ``cpu_seconds`` of its training, and
    ``evaluation`` (:func:`evaluate_lm` on ``val``, or None). The result is the same whatever
    ``workers`` is; ``workers=1`` runs in this process. Worker processes are forked, so this needs a
    platform with ``fork`` (Linux, macOS) for ``workers > 1``.
    """
    where = "train_many"
    jobs = list(jobs)
    if not jobs or not all(isinstance(j, (tuple, list)) and len(j) == 3 and isinstance(j[1], LMConfig)
                           for j in jobs):
        raise ValueError(f"{where}: jobs must be a non-empty list of (name, LMConfig, seed), got {jobs!r:.200}")
    check_int("workers", workers, low=1, where=where)
    check_int("steps", steps, low=1, where=where)
    payloads = [{"cfg": cfg, "seed": seed, "split": split, "steps": steps, "train": train_kwargs, "val": val,
                 "domain_names": domain_names} for _, cfg, seed in jobs]
    bar = progress(total=len(jobs), desc="training runs", disable=not show_progress)
    if workers == 1 or len(jobs) == 1:
        outs = []
        threads = torch.get_num_threads()
        try:
            for p in payloads:
                outs.append(_train_job(p))
                bar.update(1)
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_train_job, p) for p in payloads]
            outs = []
            for f in futures:
                outs.append(f.result())
                bar.update(1)
    bar.close()
    results = []
    for (name, cfg, seed), out in zip(jobs, outs):
        model = TinyLM(cfg)
        model.load_state_dict(out.pop("state"))
        results.append({"name": name, "seed": seed, "cfg": cfg, "model": model, **out})
    return results


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
    ``prev_token`` (the character before it; ``VOCAB_SIZE`` at a window's first position),
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
    # The character before each input; position 0 has none inside its window (id VOCAB_SIZE).
    prev = torch.cat([torch.full((len(x), 1), VOCAB_SIZE, dtype=torch.long), x[:, :-1]], 1)
    labels = {"token": x.flatten(), "prev_token": prev.flatten(), "domain": d.flatten(),
              "char_class": char_classes(x.flatten()),
              "position": position, "position_bucket": position * num_position_buckets // T}
    return [{"mask": torch.cat(p["mask"]), "probs": torch.cat(p["probs"]), **labels} for p in parts]


def shuffle_within(mask: torch.Tensor, groups: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A routing that knows only ``groups``: the rows of ``mask`` (N, E) permuted at random among the
    tokens of the same group (``groups`` (N,) int64, e.g. the character class).

    Every group keeps exactly its experts' counts, so whatever the routing says about the group
    survives, and everything else it knew (domain, context, position) is destroyed. Comparing a
    statistic of the real routing with this one asks whether the router uses more than the group.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"shuffle_within: mask must be an (N, E) tensor, got {tuple(getattr(mask, 'shape', ()))}")
    if not isinstance(groups, torch.Tensor) or groups.shape != mask.shape[:1] or groups.is_floating_point():
        raise ValueError(f"shuffle_within: groups must be an integer tensor of shape ({mask.shape[0]},), "
                         f"got {getattr(groups, 'dtype', type(groups))} {tuple(getattr(groups, 'shape', ()))}")
    out = torch.empty_like(mask)
    for g in groups.unique().tolist():
        idx = (groups == g).nonzero().flatten()
        out[idx] = mask[idx[torch.randperm(len(idx), generator=generator)]]
    return out


@torch.no_grad()
def arithmetic_accuracy(model: TinyLM, split: TextSplit, *, domain: int = 2, num_problems: int = 100,
                        max_answer: int = 8) -> dict:
    """Ask ``model`` the first ``num_problems`` arithmetic lines of ``split``'s ``domain`` (the math
    domain): the prompt is the held-out text up to and including a line's ``=`` (so the lines
    before it are real context), the answer is decoded greedily up to a newline and compared with
    the true value. Returns ``{"problems", "correct", "accuracy", "by_operator": {op: [correct, n]},
    "examples": [(question, answer given, right answer)]}`` (the first five)."""
    where = "arithmetic_accuracy"
    check_int("num_problems", num_problems, low=1, where=where)
    check_int("domain", domain, low=0, high=len(split.spans) - 1, where=where)
    start, end = split.spans[domain]
    text = decode(split.tokens[start:end])
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    line_start = text.index("\n") + 1  # skip a possibly cut first line
    by_op, examples, correct, n = {}, [], 0, 0
    while n < num_problems:
        line_end = text.find("\n", line_start)
        if line_end < 0:
            break
        line = text[line_start:line_end]
        m = _EQUATION_LINE.match(line)
        if m and line_start > 0:
            prompt = text[:line_start] + line[:line.index("=") + 1]
            tokens = encode(prompt[-model.cfg.context:]).unsqueeze(0).to(dev)
            answer = ""
            for _ in range(max_answer):
                window = tokens[:, -model.cfg.context:]
                doms = torch.full_like(window, domain)
                nxt = model(window, doms)[0, -1].argmax()
                ch = decode([int(nxt)])
                if ch == "\n":
                    break
                answer += ch
                tokens = torch.cat([tokens, nxt.view(1, 1)], 1)
            truth = m[4]
            ok = answer == truth
            correct += ok
            n += 1
            tally = by_op.setdefault(m[2], [0, 0])
            tally[0] += ok
            tally[1] += 1
            if len(examples) < 5:
                examples.append((line[:line.index("=") + 1], answer, truth))
        line_start = line_end + 1
    model.train(was_training)
    if n == 0:
        raise ValueError(f"{where}: domain {domain} of this split holds no line like 12+7=19")
    return {"problems": n, "correct": correct, "accuracy": correct / n, "by_operator": by_op,
            "examples": examples}
