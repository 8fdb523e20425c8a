"""Where to go after this book: engines that train MoE models across many GPUs (chapter 16).

``ENGINES`` is data, one dict per engine, so the chapter renders it (:func:`engines_table`) and
a test checks its shape. Versions are the newest releases as of November 2026; every row names
the page its facts come from. torchtitan is the one this book runs side by side with its own
layer (``tutorial_moe.peers``); the others are described, not run.
"""
from __future__ import annotations

__all__ = ["ENGINES", "ENGINE_COLUMNS", "engines_table", "torchtitan_rows", "torchtitan_table", "defaults_rows",
           "defaults_table", "torchtitan_max_abs_diff"]

ENGINE_COLUMNS = ("engine", "version", "install", "offers", "needs")

ENGINES = [
    {
        "engine": "torchtitan (PyTorch)",
        "version": "0.3.0 (PyPI, 2026-09)",
        "install": "pip install torchtitan==0.3.0",
        "offers": (
            "PyTorch-native MoE: token-choice top-k router (softmax or sigmoid, optional renormalisation, "
            "node-limited groups), grouped-matmul experts, aux-loss-free bias balancing, shared experts; "
            "expert parallelism (--parallelism.expert_parallel_degree) composed with FSDP, TP, PP and CP; "
            "all-to-all, DeepEP and HybridEP dispatchers"
        ),
        "needs": (
            "recent PyTorch; CUDA GPUs and NCCL for training (the trainer assumes an accelerator); "
            "its MoE module alone runs on CPU (this chapter)"
        ),
        "source": "torchtitan 0.3.0 wheel: torchtitan/models/common/moe.py, token_dispatcher.py, config/configs.py",
    },
    {
        "engine": "Megatron-Core (NVIDIA)",
        "version": "0.19.2 (PyPI megatron-core, 2026-09)",
        "install": "pip install megatron-core",
        "offers": (
            "MoE for the largest training runs: expert, tensor, pipeline, context and data parallelism "
            "together; all-gather, all-to-all and flex (DeepEP, HybridEP) token dispatchers; grouped GEMM; "
            "overlap of the EP all-to-all with computation; FSDP with EP"
        ),
        "needs": "NVIDIA GPUs; Transformer Engine and DeepEP/HybridEP for the fastest paths",
        "source": "docs.nvidia.com/megatron-core/developer-guide/0.19.0 (core.transformer.moe.token_dispatcher); "
                  "Megatron-LM megatron/core/transformer/moe/README.md",
    },
    {
        "engine": "DeepSpeed-MoE (Microsoft)",
        "version": "0.19.8 (PyPI deepspeed, 2026-10)",
        "install": "pip install deepspeed",
        "offers": (
            "deepspeed.moe.layer.MoE wraps any expert module: top-1 or top-2 gating, capacity factor with "
            "token dropping, random token selection, residual MoE; expert parallelism (ep_size) with data "
            "and tensor parallelism; PR-MoE and MoE inference"
        ),
        "needs": "the DeepSpeed engine (deepspeed.initialize) and GPUs (CUDA, or another DeepSpeed accelerator)",
        "source": "DeepSpeed deepspeed/moe/layer.py docstring; deepspeed.ai/tutorials/mixture-of-experts-inference",
    },
    {
        "engine": "Tutel (Microsoft)",
        "version": "0.3.2 (GitHub release; not on PyPI)",
        "install": "pip install from the GitHub release tarball (builds extensions)",
        "offers": (
            "an MoE layer that switches parallelism, capacity and top-k at run time without moving weights; "
            "2-D hierarchical all-to-all for very large clusters; all-to-all-v; usable from DeepSpeed "
            "(use_tutel)"
        ),
        "needs": "PyTorch; CUDA or ROCm GPUs, or CPU in float32/float64",
        "source": "github.com/microsoft/tutel README and releases (v0.1.5, v0.3.2)",
    },
]


def engines_table(columns=ENGINE_COLUMNS):
    """``ENGINES`` as a Markdown table (the chapter's "other engines" table)."""
    from .show import markdown_table

    unknown = [c for c in columns if c not in ENGINES[0]]
    if unknown:
        raise ValueError(f"engines_table: columns {unknown} are unknown; choose from {list(ENGINES[0])}")
    return markdown_table(ENGINES, list(columns))


_QUANTITIES = {"output": "output", "input_grad": "input gradient", "router_grad": "router gate gradient",
               "w_gate_grad": "w_gate gradient (torchtitan w1)", "w_up_grad": "w_up gradient (torchtitan w3)",
               "w_down_grad": "w_down gradient (torchtitan w2)"}


def _check_report(report, where):
    if not isinstance(report, dict) or "equivalence" not in report:
        raise ValueError(f"{where}: report must be the dict of tutorial_moe.peers.torchtitan_report(), "
                         f"got {type(report).__name__}")


def torchtitan_rows(report: dict) -> list[dict]:
    """One row per compared quantity: max |ours - torchtitan| in each run of ``torchtitan_report``
    (and on the expert-parallel gloo ranks, when they ran)."""
    _check_report(report, "torchtitan_rows")
    runs = dict(report["equivalence"])
    if report.get("expert_parallel"):
        runs[f"{report['expert_parallel']['world_size']} gloo ranks (EP), float32"] = report["expert_parallel"]
    return [{"max abs difference in": label, **{run: f"{r['absolute'][key]:.1e}" for run, r in runs.items()}}
            for key, label in _QUANTITIES.items()]


def torchtitan_table(report: dict):
    """:func:`torchtitan_rows` as a Markdown table."""
    from .show import markdown_table

    return markdown_table(torchtitan_rows(report))


_OURS = {"score_func": "softmax", "route_norm": "True when k > 1 (renormalise the k weights)", "top_k": "our k",
         "route_scale": "1.0", "load_balance_coeff": "None (no expert bias; aux losses are a separate term)",
         "shared_experts": "None", "expert_dtype": "the input's dtype (precision='float')"}


def defaults_rows(report: dict) -> list[dict]:
    """torchtitan's default for each setting that differs from ``MoELayer``, and what the peer is set to."""
    _check_report(report, "defaults_rows")
    return [{"setting": name, "torchtitan default": repr(value), "set to (as MoELayer)": _OURS[name]}
            for name, value in report["defaults"].items()]


def defaults_table(report: dict):
    """:func:`defaults_rows` as a Markdown table."""
    from .show import markdown_table

    return markdown_table(defaults_rows(report))


def torchtitan_max_abs_diff(report: dict) -> dict:
    """What chapter 16 saves as ``torchtitan_max_abs_diff``: per run, the max |difference| of the
    output and of every gradient (float32, float64, stock bfloat16 experts, expert-parallel ranks)."""
    _check_report(report, "torchtitan_max_abs_diff")
    out = {name: dict(r["absolute"]) for name, r in report["equivalence"].items()}
    if report.get("expert_parallel"):
        out["expert_parallel_gloo"] = dict(report["expert_parallel"]["absolute"])
    return out
