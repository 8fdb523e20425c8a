"""Chapter 14: upcycling a dense language model, and what serving an MoE costs.

Three experiments on chapter 11's :class:`~tutorial_moe.experiments.lm.TinyLM`:

* :func:`upcycling_run`: train a dense model, upcycle its feed-forward blocks into MoE layers
  (Komatsuzaki et al., arXiv 2212.05055; ``tutorial_moe.upcycle``), check that the upcycled model
  computes exactly what the dense one did, then continue training the upcycled MoE, the dense
  model and an MoE from scratch for the same number of extra steps on the same batches.
* :func:`distinct_curve`: how many distinct experts a decode batch of B tokens touches, measured
  from a trained MoE's routing on validation text, against independent uniform routing.
* :func:`generation_trace` + ``tutorial_moe.offload``: the routing of token-by-token generation,
  replayed against expert caches (Eliseev and Mazur, arXiv 2312.17238).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .._validate import check_int
from ..offload import RoutingTrace, distinct_experts, expected_distinct_experts, trace_generation
from ..upcycle import max_abs_diff, upcycle_model
from .corpus import encode
from .lm import DenseFFN, LMConfig, TinyLM, collect_lm_routing, evaluate_lm, train_lm

__all__ = ["DENSE", "MOE", "SERVE", "UpcycleResult", "upcycle_lm", "upcycling_run", "distinct_curve",
           "generation_trace", "expert_bytes"]

#: Chapter 11's dense model of equal active size (one MLP of width 128).
DENSE = LMConfig(context=32, d_model=64, n_layers=2, n_heads=4, ffn="dense", d_hidden=128)
#: The MoE the dense model is upcycled into (and its from-scratch twin): 4 copies, top-2.
MOE = DENSE.replace(ffn="moe", num_experts=4, k=2)
#: The model whose routing the serving experiments read: 8 experts of width 64, top-2.
SERVE = DENSE.replace(ffn="moe", num_experts=8, k=2, d_hidden=64)


def upcycle_lm(dense: TinyLM, num_experts: int = 4, k: int = 2, seed: int = 0) -> TinyLM:
    """A copy of ``dense`` whose every ``DenseFFN`` is an MoE layer of ``num_experts`` copies of it
    (routing to ``k``, weights renormalised so the copy is exact); ``dense`` is not modified."""
    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(seed)
    upcycle_model(model, num_experts, k, select=lambda name, m: isinstance(m, DenseFFN), activation="gelu",
                  generator=gen)
    return model


@dataclass
class UpcycleResult:
    seed: int
    max_abs_diff: float  # dense vs upcycled logits, at the upcycling
    loss_at_upcycle: tuple[float, float]  # validation loss of (dense, upcycled) before more training
    val_loss: dict  # {"upcycled", "dense", "scratch"}: after the extra steps
    curves: dict  # training loss per extra step


def upcycling_run(seed: int, split_train, split_val, pre_steps: int, extra_steps: int, *, batch_size: int = 32,
                  probe=None) -> UpcycleResult:
    """Dense pre-training, upcycling, then ``extra_steps`` more of each of three models on the
    same batches. ``probe`` (B, T) tokens for the exactness check (default: validation windows)."""
    check_int("pre_steps", pre_steps, low=1, where="upcycling_run")
    check_int("extra_steps", extra_steps, low=1, where="upcycling_run")
    torch.manual_seed(seed)
    dense = TinyLM(DENSE)
    train_lm(dense, split_train, pre_steps, batch_size=batch_size, seed=seed, show_progress=False)
    up = upcycle_lm(dense, seed=seed)
    if probe is None:
        from .corpus import eval_windows

        probe = eval_windows(split_val, DENSE.context, max_windows=16)[0]
    dense.eval(), up.eval()
    diff = max_abs_diff(dense, up, probe)
    at = (evaluate_lm(dense, split_val)["loss"], evaluate_lm(up, split_val)["loss"])
    torch.manual_seed(10_000 + seed)
    scratch = TinyLM(MOE)
    curves, val = {}, {}
    # The extra steps draw new batches (seed + 1000), the same for the three models.
    for name, model in (("upcycled", up), ("dense", dense), ("scratch", scratch)):
        model.train()
        hist = train_lm(model, split_train, extra_steps, batch_size=batch_size, seed=seed + 1000,
                        show_progress=False)
        curves[name] = hist.series("task")
        val[name] = evaluate_lm(model, split_val)["loss"]
    return UpcycleResult(seed, diff, at, val, curves)


def distinct_curve(model: TinyLM, split, batch_sizes, *, num_batches: int = 64, seed: int = 0) -> dict:
    """``{"measured": {layer: [mean distinct experts per B]}, "uniform": [...]}`` for decode
    batches of B tokens drawn at random from the validation text's routing."""
    layers = collect_lm_routing(model, split, max_windows=64)
    E, k = model.cfg.num_experts, model.cfg.k
    measured = {i: [float(distinct_experts(r["mask"], B, num_batches=num_batches, seed=seed).mean())
                    for B in batch_sizes] for i, r in enumerate(layers)}
    return {"measured": measured, "uniform": [expected_distinct_experts(E, k, B) for B in batch_sizes]}


def generation_trace(model: TinyLM, prompts, tokens_per_prompt: int, *, seed: int = 0, temperature: float = 0.8,
                     predict_next: bool = True) -> tuple[RoutingTrace, str]:
    """Generate ``tokens_per_prompt`` characters after each prompt in turn (one sequence, batch 1)
    and record which experts every new character used in each layer (and, with ``predict_next``,
    the guess of the next layer's router from the previous layer's input). Returns the trace and
    the generated text."""
    check_int("tokens_per_prompt", tokens_per_prompt, low=1, where="generation_trace")
    prompts = list(prompts)
    gen = torch.Generator().manual_seed(seed)
    state = {"tokens": None, "text": []}

    def step(i):
        p, j = divmod(i, tokens_per_prompt)
        if j == 0:
            if state["tokens"] is not None:
                state["text"].append(state["tokens"])
            state["tokens"] = encode(prompts[p]).unsqueeze(0)
        window = state["tokens"][:, -model.cfg.context:]
        logits = model(window)[0, -1] / temperature
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        state["tokens"] = torch.cat([state["tokens"], nxt.view(1, 1)], dim=1)

    trace = trace_generation(model, step, tokens_per_prompt * len(prompts), predict_next=predict_next)
    state["text"].append(state["tokens"])
    from .corpus import decode

    return trace, "\n".join(decode(t[0]) for t in state["text"])


def expert_bytes(model: TinyLM, bytes_per_param: float = 2.0) -> float:
    """Bytes of one expert's weights in ``model``'s first MoE layer, stored at ``bytes_per_param``
    (2: bf16, as models are usually served)."""
    bank = model.blocks[0].ffn.experts
    params = sum(p.numel() for p in bank.parameters()) / bank.num_experts
    return params * bytes_per_param
