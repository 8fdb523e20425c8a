"""A chapter's claim checks: each registered once under its key, shown as a box, saved for the
verdicts chapter.

    claims = Claims("05_top_k")
    claims.add("tough_love_beats_helicopter", compare(tough, heli, ">", what="top-3 accuracy"))
    claims.show("tough_love_beats_helicopter")        # the admonition box on the page
    save_results("05_top_k", {..., "claims": claims.to_results()})

The register of seed claims (``tutorial_moe.book.verdicts.SEED_CLAIMS``) names the chapter and
key of each; the verdicts chapter joins on that key and nothing else.
"""
from __future__ import annotations

from .evidence import HOLDS, SHOWN, Evidence

__all__ = ["Claims", "claim_markdown"]


def _register():
    from .verdicts import SEED_CLAIMS  # local: verdicts imports results only, no cycle

    return {(c["chapter"], c["key"]): c for c in SEED_CLAIMS}


def claim_markdown(claim: str, evidence: Evidence, seed_file: str | None = None) -> str:
    """A MyST admonition stating the claim, the measurement and the computed verdict."""
    source = f" ({seed_file})" if seed_file else ""
    lines = [
        f":::{{admonition}} Claim check: {evidence.verdict}",
        ":class: tip" if evidence.verdict in (HOLDS, SHOWN) else ":class: note",
        f"**The claim{source}:** {claim}",
        "",
        f"**Measured:** {evidence.summary()}.",
        "",
        f"**Verdict:** {evidence.verdict}" + (f" ({evidence.note})" if evidence.note else "") + ".",
        ":::",
    ]
    return "\n".join(lines)


class Claims:
    """The claim checks of one chapter, in the order the chapter makes them."""

    def __init__(self, chapter: str):
        if not isinstance(chapter, str) or not chapter:
            raise ValueError(f"Claims: chapter={chapter!r} must be a chapter stem like '05_top_k'")
        self.chapter = chapter
        self._items: dict[str, tuple[Evidence, str]] = {}

    def add(self, key: str, evidence: Evidence, claim: str | None = None) -> Evidence:
        """Record ``evidence`` for ``key``. ``claim`` (the claim in words) is required for a key the
        seed register does not list; a registered key takes its wording from the register."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"Claims.add: key={key!r} must be a non-empty str")
        if not isinstance(evidence, Evidence):
            raise TypeError(f"Claims.add: evidence must come from compare() or shown(), got {type(evidence).__name__}")
        if key in self._items:
            raise ValueError(f"Claims.add: key {key!r} is already recorded in {self.chapter}; each claim once")
        registered = _register().get((self.chapter, key))
        if claim is None:
            if registered is None:
                raise ValueError(f"Claims.add: key {key!r} is not in the seed register for {self.chapter}; "
                                 "pass claim='...' (the claim in words)")
            claim = registered["claim"]
        self._items[key] = (evidence, claim)
        return evidence

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> Evidence:
        return self._items[key][0]

    def markdown(self, key: str) -> str:
        evidence, claim = self._items[key]
        registered = _register().get((self.chapter, key))
        seed_file = None
        if registered is not None:
            from .verdicts import SEED_FILES

            seed_file = SEED_FILES.get(registered["seed"])
        return claim_markdown(claim, evidence, seed_file)

    def show(self, key: str):
        """The claim box, as an IPython Markdown object (renders as an admonition in the book)."""
        from IPython.display import Markdown

        return Markdown(self.markdown(key))

    def to_results(self) -> dict:
        """``{key: {verdict, diff, ci, n, ..., claim}}`` for ``save_results(...)["claims"]``."""
        return {key: {**ev.to_dict(), "claim": claim} for key, (ev, claim) in self._items.items()}
