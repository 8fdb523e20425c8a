"""The package's three layers import one way: library <- experiments <- book."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tutorial_moe"
FORBIDDEN = {"library": ("experiments", "book"), "experiments": ("book",), "book": ()}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 and rel[0] in ("experiments", "book") else "library"


def _imported_packages(path: Path) -> set[str]:
    """The first sub-package of tutorial_moe named by each import in ``path``."""
    here = list(path.relative_to(PKG).parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                mod = [*base, *(node.module.split(".") if node.module else [])]
                names = [".".join(["tutorial_moe", *mod])]
                if not node.module:  # `from . import x`
                    names = [".".join(["tutorial_moe", *base, a.name]) for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tutorial_moe" and len(parts) > 1:
                out.add(parts[1])
    return out


def _modules():
    return sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_one_way(path):
    layer = _layer(path)
    bad = _imported_packages(path) & set(FORBIDDEN[layer])
    assert not bad, f"{path.relative_to(PKG)} ({layer}) imports tutorial_moe.{sorted(bad)}"


def test_the_checker_sees_a_wrong_way_import(tmp_path, monkeypatch):
    # A library module that imports the book layer must be caught (relative and absolute forms).
    fake = PKG / "routing.py"
    source = "from .book.results import save_results\nimport tutorial_moe.experiments.lm\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert _imported_packages(fake) == {"book", "experiments"}
