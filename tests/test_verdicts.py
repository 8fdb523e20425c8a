from tutorial_moe.book import verdicts
from tutorial_moe.book.claims import Claims
from tutorial_moe.book.evidence import HOLDS, INCONCLUSIVE, NOT_REPRODUCED, compare, shown


def test_register_rows_are_well_formed():
    assert len(verdicts.SEED_CLAIMS) >= 25
    keys = set()
    for entry in verdicts.SEED_CLAIMS:
        assert entry["seed"] in verdicts.SEED_FILES
        assert entry["chapter"][:2].isdigit() and entry["claim"]
        assert isinstance(entry["key"], str) and entry["key"]
        assert (entry["chapter"], entry["key"]) not in keys
        keys.add((entry["chapter"], entry["key"]))
    assert {e["seed"] for e in verdicts.SEED_CLAIMS} == set(verdicts.SEED_FILES)


def test_verdict_words_are_the_protocols_plus_not_measured():
    assert verdicts.VERDICTS[:-1] == (HOLDS, "fails", INCONCLUSIVE, NOT_REPRODUCED, "shown")
    assert verdicts.VERDICTS[-1] == verdicts.NOT_MEASURED == "not measured in this build"


def _saved_claims():
    claims = Claims("05_top_k")
    claims.add("matthew_effect", compare([3.0, 3.2, 2.9], [1.0, 1.1, 1.2], ">", what="share"))
    claims.add(
        "expert_collapse",
        compare([1, 2, 3], [1.5, 1, 2], ">", what="dead", scale_note="48 steps, not 1,000"),
    )
    claims.add("top_k_saves_inference_compute", shown(0.52, what="MAC ratio"))
    claims.add("own_claim", compare([1, 2], [2, 1], ">"), claim="a claim of the chapter")
    return claims.to_results()


def test_table_joins_by_chapter_and_key_only():
    saved = {
        "05_top_k": {"claims": _saved_claims()},
        # a saved claim under a key of another chapter's register row is not picked up
        "03_gating": {"claims": {"some_other_key": {"verdict": HOLDS, "n": 3}}},
    }
    rows = verdicts.verdict_table(saved)
    assert len(rows) == len(verdicts.SEED_CLAIMS)
    by_key = {(r["chapter"], r["key"]): r for r in rows}
    matthew = by_key[("05_top_k", "matthew_effect")]
    assert matthew["verdict"] == HOLDS and matthew["n"] == 3
    assert "share: +" in matthew["effect"] and "95 % CI" in matthew["effect"]
    collapse = by_key[("05_top_k", "expert_collapse")]
    assert collapse["verdict"] == NOT_REPRODUCED and collapse["note"] == "48 steps, not 1,000"
    macs = by_key[("05_top_k", "top_k_saves_inference_compute")]
    assert macs["verdict"] == "shown" and macs["effect"] == "MAC ratio: 0.52"
    assert macs["n"] is None
    # nothing saved under the key: reported, never matched to another claim of the chapter
    gate = by_key[("03_gating", "gate_learns_jointly")]
    assert gate["verdict"] == verdicts.NOT_MEASURED and gate["effect"] == ""
    tough = by_key[("05_top_k", "tough_love_beats_helicopter")]
    assert tough["verdict"] == verdicts.NOT_MEASURED
    counts = verdicts.verdict_counts(rows)
    assert counts[HOLDS] == 1 and sum(counts.values()) == len(rows)
    assert list(counts)[-1] == verdicts.NOT_MEASURED


def test_unregistered_claims_are_listed_apart():
    saved = {"05_top_k": {"claims": _saved_claims()}}
    extra = verdicts.unregistered_claims(saved)
    assert [(r["chapter"], r["key"], r["claim"]) for r in extra] == [
        ("05_top_k", "own_claim", "a claim of the chapter")
    ]
    assert extra[0]["verdict"] == INCONCLUSIVE


def test_results_saved_before_the_protocol_still_show_their_text():
    saved = {"03_gating": {"claims": {"gate_learns_jointly": {"measured": "grad 0.3",
                                                              "verdict": HOLDS}}}}
    row = next(r for r in verdicts.verdict_table(saved) if r["key"] == "gate_learns_jointly")
    assert row["effect"] == "grad 0.3" and row["verdict"] == HOLDS and row["n"] is None


def test_every_register_row_states_what_its_seed_expected():
    for entry in verdicts.SEED_CLAIMS:
        assert entry["expected"] in (HOLDS, "shown"), entry


def test_closing_paragraph_counts_and_names_the_claims_that_differ():
    saved = {"05_top_k": {"claims": _saved_claims()}}
    rows = verdicts.verdict_table(saved)
    by_key = {r["key"]: r for r in rows}
    # matthew_effect holds as the seed expected; expert_collapse is not reproduced; a shown
    # mechanism for a claim the seed asserted agrees with it.
    assert verdicts.agrees_with_seed(by_key["matthew_effect"]) is True
    assert verdicts.agrees_with_seed(by_key["expert_collapse"]) is False
    assert verdicts.agrees_with_seed(by_key["top_k_saves_inference_compute"]) is True
    assert verdicts.agrees_with_seed(by_key["gate_learns_jointly"]) is None
    assert [r["key"] for r in verdicts.differs_from_seed(rows)] == ["expert_collapse"]
    per_seed = verdicts.counts_by_seed(rows)
    assert list(per_seed) == list(verdicts.SEED_FILES)
    assert sum(sum(c.values()) for c in per_seed.values()) == len(rows)
    assert per_seed["000"][HOLDS] == 1
    text = verdicts.closing_paragraph(rows)
    assert f"Of the {len(rows)} claims" in text
    assert "2 of the 3 measured claims" in text
    assert by_key["expert_collapse"]["claim"] in text
    assert by_key["matthew_effect"]["claim"] not in text
