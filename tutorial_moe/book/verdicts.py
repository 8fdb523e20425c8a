"""Every claim of the five seed documents, joined with what the chapters measured.

``SEED_CLAIMS`` is the register: one row per claim (paraphrased), the chapter whose experiment
tests it and the key under which that chapter saves its evidence
(``save_results(chapter, {..., "claims": claims.to_results()})``, see ``book.claims``).
:func:`verdict_table` joins the register with the saved results of the current build by
(chapter, key) and by nothing else: a claim whose chapter saved nothing under its key is
reported as "not measured in this build", never matched to some other measurement. Claims a
chapter saved that the register does not list are returned by :func:`unregistered_claims`, so
nothing measured is hidden and nothing is counted twice.
"""
from __future__ import annotations

import math

from .evidence import VERDICTS as EVIDENCE_VERDICTS
from .results import load_all_results

__all__ = [
    "SEED_CLAIMS",
    "SEED_FILES",
    "NOT_MEASURED",
    "VERDICTS",
    "effect_text",
    "verdict_table",
    "unregistered_claims",
    "verdict_counts",
]

SEED_FILES = {
    "000": "000_a0da35f8602ce113.txt",
    "001": "001_4e5c30dd8aa8e3e9.txt",
    "002": "002_bf412b551397532f.txt",
    "003": "003_aa6965b88b9a0130.txt",
    "004": "004_25a6c5fe7c08fe0d.txt",
}

#: The verdict of a registered claim whose chapter saved nothing under its key in this build.
NOT_MEASURED = "not measured in this build"
#: Every verdict the table can show: the protocol's, then "not measured in this build".
VERDICTS = (*EVIDENCE_VERDICTS, NOT_MEASURED)

SEED_CLAIMS = [
    # seed 000: Brainy
    {"seed": "000", "chapter": "03_gating", "key": "gate_learns_jointly",
     "claim": "the gate is learned jointly with the experts, by the same gradient descent"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "world_of_only_ones",
     "claim": "an expert trained on one digit never learns what that digit is not"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "gate_does_all_the_work",
     "claim": "with one expert per digit and k = 1 the gate does all the real work"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "per_digit_worse_than_free_experts",
     "claim": "one expert per digit does worse than experts free to choose their own speciality"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "presupposing_specialisation",
     "claim": "assigning digits to experts presupposes a split the network would not choose"},
    {"seed": "000", "chapter": "05_top_k", "key": "tough_love_beats_helicopter",
     "claim": "training with top-k from the start beats training with all experts when inference uses top-k"},
    {"seed": "000", "chapter": "05_top_k", "key": "helicopter_hamstrung_at_inference",
     "claim": "a model trained with all experts is hamstrung when only the top k run at inference"},
    {"seed": "000", "chapter": "05_top_k", "key": "cold_start_gate_is_random",
     "claim": "at the start the gate knows nothing, so its first top-k choices are random (cold start)"},
    {"seed": "000", "chapter": "05_top_k", "key": "cold_start_hurts_tough_love",
     "claim": "top-k training from the first step suffers from that cold start"},
    {"seed": "000", "chapter": "05_top_k", "key": "matthew_effect",
     "claim": "experts that start ahead get more tokens and pull further ahead (Matthew effect)"},
    {"seed": "000", "chapter": "05_top_k", "key": "expert_collapse",
     "claim": "top-k training can collapse onto a subset of experts"},
    {"seed": "000", "chapter": "05_top_k", "key": "gradual_detachment_beats_tough_love",
     "claim": "gradual detachment (k = 6, 5, 4, 3, 3, 3) softens the cold start of tough love"},
    {"seed": "000", "chapter": "05_top_k", "key": "gradual_detachment_beats_helicopter",
     "claim": "gradual detachment prepares the model for top-k inference better than helicopter training"},
    {"seed": "000", "chapter": "05_top_k", "key": "top_k_saves_inference_compute",
     "claim": "running only the top-k experts at inference saves computation (multiply-adds and wall time)"},
    {"seed": "000", "chapter": "15_fast_moe", "key": "topk_inference_saves_compute",
     "claim": "top-3 of 6 experts at inference takes less time than running all 6 (timed live, fast dispatch)"},
    # seed 001: Single Mixture of Experts
    {"seed": "001", "chapter": "12_single_moe", "key": "gradient_split",
     "claim": "with E experts and top-1 routing each expert sees only 1/E of the data (the gradient is split)"},
    {"seed": "001", "chapter": "12_single_moe", "key": "common_base",
     "claim": "one shared network with fixed dropout masks keeps a common base that separate experts lack"},
    {"seed": "001", "chapter": "12_single_moe", "key": "mask_ensemble",
     "claim": "averaging over dropout masks gives an ensemble effect"},
    # seed 002: from scratch
    {"seed": "002", "chapter": "08_moe_layer", "key": "gate_smaller_than_experts",
     "claim": "a gate smaller than the experts is enough and keeps the overhead low"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "temperature_controls_specialisation",
     "claim": "the gate's temperature controls how specialised the routing is"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "capacity_factor_controls_routing",
     "claim": "a capacity factor controls how tokens are spread over experts"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "diversity_loss_diversifies_experts",
     "claim": "an expert-diversity loss makes the experts differ"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "skip_connection_handles_dropped_tokens",
     "claim": "skip connections keep the layer working when experts drop tokens"},
    {"seed": "002", "chapter": "09_routing_strategies", "key": "routing_strategies_differ",
     "claim": "routing strategies (top-k, differentiable, learned thresholds, hierarchical) trade quality, balance and cost"},
    {"seed": "002", "chapter": "10_debugging", "key": "collapse_is_detectable",
     "claim": "expert collapse can be detected from the routing statistics"},
    {"seed": "002", "chapter": "10_debugging", "key": "moe_beats_dense_equal_active",
     "claim": "an MoE should be compared with a non-MoE baseline at equal active compute, and beat it"},
    {"seed": "002", "chapter": "15_fast_moe", "key": "efficient_routing_matters",
     "claim": "efficient routing implementations matter"},
    {"seed": "002", "chapter": "16_expert_parallel", "key": "expert_sharding",
     "claim": "experts can be sharded across devices to scale"},
    # seed 003: MoE in LLMs
    {"seed": "003", "chapter": "03_gating", "key": "soft_moe_saves_compute",
     "claim": "an MoE saves computation by activating only a subset of experts (said of a soft layer)"},
    {"seed": "003", "chapter": "03_gating", "key": "soft_moe_vs_dense_equal_params",
     "claim": "with diverse experts an MoE beats a standard model; without, it is no better"},
    {"seed": "003", "chapter": "11_moe_language_model", "key": "experts_specialise_in_lm",
     "claim": "in language models, experts specialise on different slices of the language"},
    # seed 004: two domains
    {"seed": "004", "chapter": "06_two_domains", "key": "conv_gate_collapses",
     "claim": "the convolutional gate sends every image to one expert"},
    {"seed": "004", "chapter": "06_two_domains", "key": "dense_gate_splits_domains",
     "claim": "the dense gate splits the domains only partly: one expert serves one domain, the other both"},
    {"seed": "004", "chapter": "06_two_domains", "key": "moe_underperforms_baseline_on_test",
     "claim": "both MoE models do worse on test than the oracle gate"},
    {"seed": "004", "chapter": "06_two_domains", "key": "moe_overperforms_baseline_in_training",
     "claim": "both MoE models do better in (accumulated) training accuracy than the oracle gate"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "entropy_loss_moves_dense_gate",
     "claim": "the batch + sample entropy loss moves the dense gate"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "variance_loss_collapses",
     "claim": "the variance version of the loss collapses onto one expert"},
]


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def effect_text(saved_claim: dict) -> str:
    """The measured effect of one saved claim, with its interval when it is a comparison."""
    what = saved_claim.get("what") or ""
    prefix = f"{what}: " if what else ""
    diff, ci = saved_claim.get("diff"), saved_claim.get("ci")
    if diff is not None and ci is not None:
        lo, hi = ci
        return f"{prefix}{diff:+.3g} (95 % CI {lo:+.3g} to {hi:+.3g})"
    if "value" in saved_claim and saved_claim.get("value") is not None:
        return f"{prefix}{_fmt(saved_claim['value'])}"
    # results saved before the evidence protocol: the chapter's own text
    return str(saved_claim.get("measured") or saved_claim.get("text") or "")


def _row(seed: str, chapter: str, key: str, claim: str, found: dict | None) -> dict:
    if found is None:
        return {"seed": seed, "chapter": chapter, "key": key, "claim": claim,
                "effect": "", "n": None, "verdict": NOT_MEASURED, "note": ""}
    n = found.get("n")
    return {"seed": seed, "chapter": chapter, "key": key, "claim": claim,
            "effect": effect_text(found), "n": n if n else None,
            "verdict": str(found.get("verdict") or NOT_MEASURED),
            "note": str(found.get("note") or "")}


def _saved_claims(saved: dict, chapter: str) -> dict:
    return (saved.get(chapter) or {}).get("claims") or {}


def verdict_table(saved: dict | None = None) -> list[dict]:
    """One row per registered seed claim, in register order: seed, chapter, key, claim, effect
    (mean paired difference and its 95 % interval, or the shown value), n, verdict and note
    (the scale note of a claim not reproduced at this scale). ``saved`` maps chapter stems to
    their saved results (default: this build's, from ``load_all_results``)."""
    saved = load_all_results() if saved is None else saved
    return [
        _row(e["seed"], e["chapter"], e["key"], e["claim"],
             _saved_claims(saved, e["chapter"]).get(e["key"]))
        for e in SEED_CLAIMS
    ]


def unregistered_claims(saved: dict | None = None) -> list[dict]:
    """Claims the chapters saved under keys the register does not list (the chapters' own
    claims), as rows like :func:`verdict_table`'s with seed "-"."""
    saved = load_all_results() if saved is None else saved
    registered = {(e["chapter"], e["key"]) for e in SEED_CLAIMS}
    rows = []
    for chapter, res in sorted(saved.items()):
        for key, c in _saved_claims(saved, chapter).items():
            if (chapter, key) not in registered:
                rows.append(_row("-", chapter, key, str(c.get("claim") or key), c))
    return rows


def verdict_counts(rows: list[dict]) -> dict[str, int]:
    """How many rows have each verdict, in the order of :data:`VERDICTS` (others after)."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["verdict"]] = out.get(r["verdict"], 0) + 1
    order = {v: i for i, v in enumerate(VERDICTS)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
