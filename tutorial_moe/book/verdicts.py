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

from .evidence import HOLDS, SHOWN
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
    "counts_by_seed",
    "agrees_with_seed",
    "differs_from_seed",
    "closing_paragraph",
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
    {"seed": "000", "chapter": "03_gating", "key": "gate_learns_jointly", "expected": SHOWN,
     "claim": "the gate is learned jointly with the experts, by the same gradient descent"},
    {"seed": "000", "chapter": "03_gating", "key": "most_confident_beats_gate_top1", "expected": HOLDS,
     "claim": "one could choose experts by running all of them and trusting the most confident"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "world_of_only_ones", "expected": HOLDS,
     "claim": "an expert trained on one digit never learns what that digit is not"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "gate_does_all_the_work", "expected": SHOWN,
     "claim": "with one expert per digit and k = 1 the gate does all the real work"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "per_digit_worse_than_free_experts", "expected": HOLDS,
     "claim": "one expert per digit does worse than experts free to choose their own speciality"},
    {"seed": "000", "chapter": "04_one_expert_per_digit", "key": "presupposing_specialisation", "expected": HOLDS,
     "claim": "assigning digits to experts presupposes a split the network would not choose"},
    {"seed": "000", "chapter": "05_top_k", "key": "tough_love_beats_helicopter", "expected": HOLDS,
     "claim": "training with top-k from the start beats training with all experts when inference uses top-k"},
    {"seed": "000", "chapter": "05_top_k", "key": "helicopter_hamstrung_at_inference", "expected": HOLDS,
     "claim": "a model trained with all experts is hamstrung when only the top k run at inference"},
    {"seed": "000", "chapter": "05_top_k", "key": "cold_start_gate_is_random", "expected": HOLDS,
     "claim": "at the start the gate knows nothing, so its first top-k choices are random (cold start)"},
    {"seed": "000", "chapter": "05_top_k", "key": "cold_start_hurts_tough_love", "expected": HOLDS,
     "claim": "top-k training from the first step suffers from that cold start"},
    {"seed": "000", "chapter": "05_top_k", "key": "matthew_effect", "expected": HOLDS,
     "claim": "experts that start ahead get more tokens and pull further ahead (Matthew effect)"},
    {"seed": "000", "chapter": "05_top_k", "key": "expert_collapse", "expected": HOLDS,
     "claim": "top-k training can collapse onto a subset of experts"},
    {"seed": "000", "chapter": "05_top_k", "key": "rarely_chosen_expert_underdeveloped", "expected": HOLDS,
     "claim": "an expert that rarely wins is left with an underdeveloped speciality"},
    {"seed": "000", "chapter": "05_top_k", "key": "gradual_detachment_beats_tough_love", "expected": HOLDS,
     "claim": "gradual detachment (k = 6, 5, 4, 3, 3, 3) softens the cold start of tough love"},
    {"seed": "000", "chapter": "05_top_k", "key": "gradual_detachment_beats_helicopter", "expected": HOLDS,
     "claim": "gradual detachment prepares the model for top-k inference better than helicopter training"},
    {"seed": "000", "chapter": "05_top_k", "key": "top_k_saves_inference_compute", "expected": HOLDS,
     "claim": "running only the top-k experts at inference saves computation (multiply-adds and wall time)"},
    {"seed": "000", "chapter": "15_fast_moe", "key": "topk_inference_saves_compute", "expected": HOLDS,
     "claim": "top-3 of 6 experts at inference takes less time than running all 6 (timed live, fast dispatch)"},
    # seed 001: Single Mixture of Experts
    {"seed": "001", "chapter": "12_single_moe", "key": "gradient_split", "expected": SHOWN,
     "claim": "with E experts and top-1 routing each expert sees only 1/E of the data (the gradient is split)"},
    {"seed": "001", "chapter": "12_single_moe", "key": "common_base", "expected": HOLDS,
     "claim": "one shared network with fixed dropout masks keeps a common base that separate experts lack"},
    {"seed": "001", "chapter": "12_single_moe", "key": "experts_relearn_common", "expected": HOLDS,
     "claim": "separate experts each relearn what all inputs share (grammar in every expert)"},
    {"seed": "001", "chapter": "12_single_moe", "key": "mask_ensemble", "expected": HOLDS,
     "claim": "averaging over dropout masks gives an ensemble effect"},
    # seed 002: from scratch
    {"seed": "002", "chapter": "08_moe_layer", "key": "gate_smaller_than_experts", "expected": SHOWN,
     "claim": "a gate smaller than the experts is enough and keeps the overhead low"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "temperature_controls_specialisation", "expected": HOLDS,
     "claim": "the gate's temperature controls how specialised the routing is"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "capacity_factor_controls_routing", "expected": SHOWN,
     "claim": "a capacity factor controls how tokens are spread over experts"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "diversity_loss_diversifies_experts", "expected": HOLDS,
     "claim": "an expert-diversity loss makes the experts differ"},
    {"seed": "002", "chapter": "08_moe_layer", "key": "skip_connection_handles_dropped_tokens", "expected": SHOWN,
     "claim": "skip connections keep the layer working when experts drop tokens"},
    {"seed": "002", "chapter": "09_routing_strategies", "key": "routing_strategies_differ", "expected": SHOWN,
     "claim": "routing strategies (top-k, differentiable, learned thresholds, hierarchical) trade quality, balance and cost"},
    {"seed": "002", "chapter": "10_debugging", "key": "collapse_is_detectable", "expected": SHOWN,
     "claim": "expert collapse can be detected from the routing statistics"},
    {"seed": "002", "chapter": "10_debugging", "key": "moe_beats_dense_equal_active", "expected": HOLDS,
     "claim": "an MoE should be compared with a non-MoE baseline at equal active compute, and beat it"},
    {"seed": "002", "chapter": "10_debugging", "key": "temperature_annealing", "expected": HOLDS,
     "claim": "annealing the gate's temperature from soft to sharp trains a better model"},
    {"seed": "002", "chapter": "10_debugging", "key": "dynamic_capacity", "expected": HOLDS,
     "claim": "adjusting the capacity factor during training reduces dropped tokens"},
    {"seed": "002", "chapter": "10_debugging", "key": "curriculum", "expected": HOLDS,
     "claim": "a curriculum (easy examples first) helps an MoE learn"},
    {"seed": "002", "chapter": "10_debugging", "key": "gradient_scaling", "expected": HOLDS,
     "claim": "scaling up the gradients of rarely used experts keeps them in play"},
    {"seed": "002", "chapter": "10_debugging", "key": "pruning_costs_little", "expected": SHOWN,
     "claim": "a rarely used expert can be pruned (the quality it costs is measured)"},
    {"seed": "002", "chapter": "10_debugging", "key": "growth_rebalances", "expected": HOLDS,
     "claim": "splitting an overloaded expert spreads its load"},
    {"seed": "002", "chapter": "10_debugging", "key": "mixture_density_head", "expected": HOLDS,
     "claim": "mixture-density outputs model targets with several modes"},
    {"seed": "002", "chapter": "15_fast_moe", "key": "efficient_routing_matters", "expected": HOLDS,
     "claim": "efficient routing implementations matter"},
    {"seed": "002", "chapter": "16_expert_parallel", "key": "expert_sharding", "expected": SHOWN,
     "claim": "experts can be sharded across devices to scale"},
    # seed 003: MoE in LLMs
    {"seed": "003", "chapter": "03_gating", "key": "soft_moe_saves_compute", "expected": HOLDS,
     "claim": "an MoE saves computation by activating only a subset of experts (said of a soft layer)"},
    {"seed": "003", "chapter": "03_gating", "key": "soft_moe_vs_dense_equal_params", "expected": HOLDS,
     "claim": "with diverse experts an MoE beats a standard model; without, it is no better"},
    {"seed": "003", "chapter": "11_moe_language_model", "key": "moe_beats_equal_active_dense", "expected": HOLDS,
     "claim": "activating only a subset of experts lets a language model outgrow a dense one of the same compute"},
    {"seed": "003", "chapter": "11_moe_language_model", "key": "experts_specialise_in_lm", "expected": HOLDS,
     "claim": "in language models, experts specialise on different slices of the language (here: domains, beyond what the kind of character explains)"},
    # seed 004: two domains
    {"seed": "004", "chapter": "06_two_domains", "key": "conv_gate_collapses", "expected": HOLDS,
     "claim": "the convolutional gate sends every image to one expert"},
    {"seed": "004", "chapter": "06_two_domains", "key": "dense_gate_splits_domains", "expected": HOLDS,
     "claim": "the dense gate splits the domains only partly: one expert serves one domain, the other both"},
    {"seed": "004", "chapter": "06_two_domains", "key": "oracle_is_upper_bound", "expected": HOLDS,
     "claim": "the oracle gate, which is told each image's domain, is an upper bound for a learned gate"},
    {"seed": "004", "chapter": "06_two_domains", "key": "moe_underperforms_baseline_on_test", "expected": HOLDS,
     "claim": "both MoE models do worse on test than the oracle gate"},
    {"seed": "004", "chapter": "06_two_domains", "key": "moe_overperforms_baseline_in_training", "expected": HOLDS,
     "claim": "both MoE models do better in (accumulated) training accuracy than the oracle gate"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "entropy_loss_moves_dense_gate", "expected": HOLDS,
     "claim": "the batch + sample entropy loss moves the dense gate"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "variance_loss_collapses", "expected": HOLDS,
     "claim": "the variance version of the loss collapses onto one expert"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "batch_variance_balances", "expected": HOLDS,
     "claim": "remark (c): the batch variance (read across samples) encourages balanced use of the experts"},
    {"seed": "004", "chapter": "07_gate_losses", "key": "separating_gate_below_oracle", "expected": HOLDS,
     "claim": "remark (b): an MoE whose gate separates the domains cannot beat the oracle gate"},
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


def _row(seed: str, chapter: str, key: str, claim: str, found: dict | None,
         expected: str | None = None) -> dict:
    if found is None:
        return {"seed": seed, "chapter": chapter, "key": key, "claim": claim,
                "effect": "", "n": None, "verdict": NOT_MEASURED, "note": "",
                "expected": expected}
    n = found.get("n")
    return {"seed": seed, "chapter": chapter, "key": key, "claim": claim,
            "effect": effect_text(found), "n": n if n else None,
            "verdict": str(found.get("verdict") or NOT_MEASURED),
            "note": str(found.get("note") or ""), "expected": expected}


def _saved_claims(saved: dict, chapter: str) -> dict:
    return (saved.get(chapter) or {}).get("claims") or {}


def verdict_table(saved: dict | None = None) -> list[dict]:
    """One row per registered seed claim, in register order: seed, chapter, key, claim, effect
    (mean paired difference and its 95 % interval, or the shown value), n, verdict, note
    (the scale note of a claim not reproduced at this scale) and expected (the seed's own
    prediction: "holds" for a comparison it asserts, "shown" for a mechanism it describes). ``saved`` maps chapter stems to
    their saved results (default: this build's, from ``load_all_results``)."""
    saved = load_all_results() if saved is None else saved
    return [
        _row(e["seed"], e["chapter"], e["key"], e["claim"],
             _saved_claims(saved, e["chapter"]).get(e["key"]), e.get("expected"))
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


# The seed asserted every claim it made: a comparison that holds and a mechanism that is shown
# both say what the seed said, whichever of the two ways a chapter tests it.
_AGREE = {HOLDS, SHOWN}


def agrees_with_seed(row: dict) -> bool | None:
    """Whether a row's verdict says what its seed predicted (``row["expected"]``); None when
    the claim was not measured in this build or the row has no prediction."""
    verdict, expected = row["verdict"], row.get("expected")
    if verdict == NOT_MEASURED or not expected:
        return None
    return verdict == expected or {verdict, expected} <= _AGREE


def differs_from_seed(rows: list[dict]) -> list[dict]:
    """The measured rows whose verdict is not what the seed expected, in table order."""
    return [r for r in rows if agrees_with_seed(r) is False]


def counts_by_seed(rows: list[dict]) -> dict[str, dict[str, int]]:
    """``{seed: verdict_counts(rows of that seed)}`` for every seed document, in order."""
    return {seed: verdict_counts([r for r in rows if r["seed"] == seed]) for seed in SEED_FILES}


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {verdict}" for verdict, n in counts.items()) or "none"


def closing_paragraph(rows: list[dict]) -> str:
    """The verdicts page's closing paragraph (Markdown), generated from the table's rows:
    counts per verdict, counts per seed document, and the claims whose verdict differs from
    what their seed expected. Nothing in it is typed by hand."""
    counts = verdict_counts(rows)
    text = [f"Of the {len(rows)} claims in the register, this build gave: {_counts_text(counts)}."]
    per_seed = counts_by_seed(rows)
    text.append("Per seed document: " + "; ".join(
        f"`{SEED_FILES[seed]}` {_counts_text(c)}" for seed, c in per_seed.items()) + ".")
    differ = differs_from_seed(rows)
    agree = sum(agrees_with_seed(r) is True for r in rows)
    measured = sum(agrees_with_seed(r) is not None for r in rows)
    text.append(f"{agree} of the {measured} measured claims came out as their seed expected.")
    if differ:
        text.append(
            f"These {len(differ)} did not: "
            + "; ".join(f"{r['claim']} (seed {r['seed']}, `{r['chapter']}`: {r['verdict']})"
                        for r in differ) + ".")
    else:
        text.append("None of the measured claims came out otherwise.")
    return " ".join(text)
