from tutorial_moe.book import verdicts


def test_register_rows_are_well_formed():
    assert len(verdicts.SEED_CLAIMS) >= 25
    for entry in verdicts.SEED_CLAIMS:
        assert entry["seed"] in verdicts.SEED_FILES
        assert entry["chapter"][:2].isdigit() and entry["claim"]
    assert {e["seed"] for e in verdicts.SEED_CLAIMS} == set(verdicts.SEED_FILES)


def test_table_joins_saved_claims_and_reports_missing_ones():
    saved = {
        "03_gating": {"claims": {"gate_learns_jointly": {"seed": "000", "claim": "x", "measured": "grad 0.3",
                                                         "verdict": "holds"}}},
        "12_single_moe": {"claims": {"split": {"seed": "001", "claim": "y", "measured": "1/4", "verdict": "fails"}}},
        "99_extra": {"claims": {"new": {"seed": "002", "claim": "an extra claim", "measured": "m", "verdict": "mixed"}}},
    }
    rows = verdicts.verdict_table(saved)
    by_claim = {(r["chapter"], r["claim"]): r for r in rows}
    joined = next(r for r in rows if r["chapter"] == "03_gating" and r["verdict"] == "holds")
    assert joined["measured"] == "grad 0.3"
    # a keyless register entry takes the chapter's first claim of that seed
    assert any(r["chapter"] == "12_single_moe" and r["verdict"] == "fails" for r in rows)
    # a claim not in the register is still shown
    assert ("99_extra", "an extra claim") in by_claim
    # a chapter that did not run is reported, not guessed
    assert any(r["chapter"] == "06_two_domains" and r["verdict"] == "not measured in this build" for r in rows)
    counts = verdicts.verdict_counts(rows)
    assert counts["holds"] == 1 and sum(counts.values()) == len(rows)
