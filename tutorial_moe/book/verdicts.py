"""Every claim of the five seed documents, joined with what the chapters measured.

``SEED_CLAIMS`` is the register: one row per claim (paraphrased), the chapter whose experiment
tests it and the key under which that chapter saves its verdict (``save_results(...)["claims"]``).
:func:`verdict_table` reads the saved results of the current build and fills in what was
measured; a claim whose chapter has not run (or saved no verdict) is reported as
"not measured in this build", never guessed. Claims a chapter saved that are not in the
register are appended, so nothing measured is hidden.
"""
from __future__ import annotations

from .results import load_all_results

__all__ = ["SEED_CLAIMS", "SEED_FILES", "VERDICTS", "verdict_table", "verdict_counts"]

SEED_FILES = {
    "000": "000_a0da35f8602ce113.txt",
    "001": "001_4e5c30dd8aa8e3e9.txt",
    "002": "002_bf412b551397532f.txt",
    "003": "003_aa6965b88b9a0130.txt",
    "004": "004_25a6c5fe7c08fe0d.txt",
}

#: The verdict words chapters may use.
VERDICTS = ("holds", "fails", "mixed", "no significant difference", "untested")

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
     "claim": "top-3 of 6 experts at inference, timed with the fast dispatch (recorded benchmark)"},
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
     "claim": "the dense gate gives one expert to digits while the other takes both domains"},
    {"seed": "004", "chapter": "06_two_domains", "key": "moe_underperforms_baseline_on_test",
     "claim": "both MoE models do worse on test than the oracle gate"},
    {"seed": "004", "chapter": "06_two_domains", "key": "moe_overperforms_baseline_in_training",
     "claim": "both MoE models do better in (accumulated) training accuracy than the oracle gate"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "entropy_loss_moves_dense_gate",
     "claim": "the batch + sample entropy loss moves the dense gate"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "variance_loss_collapses",
     "claim": "the variance version of the loss collapses onto one expert"},
]


def _lookup(saved: dict, chapter: str, key: str | None, seed: str, used: set):
    claims = (saved.get(chapter) or {}).get("claims") or {}
    if key is not None:
        if key in claims:
            used.add((chapter, key))
            return claims[key]
        return None
    # Registered without a fixed key: take the chapter's first unused claim of this seed.
    for k, c in claims.items():
        if (chapter, k) not in used and str(c.get("seed")) == seed:
            used.add((chapter, k))
            return c
    return None


def verdict_table(saved: dict | None = None) -> list[dict]:
    """One row per seed claim: seed, claim, chapter, measured, verdict (from this build's results)."""
    saved = load_all_results() if saved is None else saved
    used: set = set()
    rows = []
    for entry in SEED_CLAIMS:
        found = _lookup(saved, entry["chapter"], entry["key"], entry["seed"], used)
        rows.append({
            "seed": entry["seed"], "claim": entry["claim"], "chapter": entry["chapter"],
            "measured": found.get("measured", "") if found else "",
            "verdict": found.get("verdict", "untested") if found else "not measured in this build",
        })
    for chapter, res in sorted(saved.items()):
        for key, c in (res.get("claims") or {}).items():
            if (chapter, key) not in used:
                rows.append({"seed": str(c.get("seed", "?")), "claim": c.get("claim", key), "chapter": chapter,
                             "measured": c.get("measured", ""), "verdict": c.get("verdict", "untested")})
    rows.sort(key=lambda r: (r["seed"], r["chapter"]))
    return rows


def verdict_counts(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["verdict"]] = out.get(r["verdict"], 0) + 1
    return out
