"""The browser check's page rules (scripts/check_pages.py), on small hand-made DOMs: each rule
must catch its fault and stay quiet on a good page. The check itself runs on the built book as
phase 4 of `make test` (scripts/run_tests.py) when Chromium is installed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_pages  # noqa: E402

BASE = "http://127.0.0.1:8000/"
URL = BASE + "book/99_page.html"

GOOD_BODY = """
<h1>A chapter<a class="headerlink" href="#a-chapter">#</a></h1>
<section id="a-chapter">
<p>Inline <span class="math notranslate nohighlight"><mjx-container>x</mjx-container></span>.</p>
<pre>label = r"$\\frac{a}{b}$"  # code may hold TeX</pre>
<div class="cell_output docutils container">
  <div class="output"><div class="widget-subarea"><div class="widget-slider">k</div></div>
  <script type="application/vnd.jupyter.widget-view+json">{"model_id": "abc"}</script></div>
</div>
<div class="cell_output docutils container"><div class="animation">
  <img id="_anim_img1" src="data:image/png;base64,AAAA"></div></div>
<div class="cell_output docutils container"><pre>printed text</pre></div>
</section>
"""


def page(body: str, head: str = "") -> check_pages.Node:
    state = '<script type="application/vnd.jupyter.widget-state+json">{"state": {}}</script>'
    return check_pages.parse(f"<html><head>{state}{head}</head><body>{body}</body></html>")


def problems(body: str, head: str = "", docname: str = "book/99_page") -> list[str]:
    return check_pages.check_dom(docname, page(body, head), URL, BASE)


def test_a_good_page_passes():
    assert problems(GOOD_BODY) == []


@pytest.mark.parametrize("body, expected", [
    ("<h1>T</h1><p>$$ y = \\frac{a}{b} $$</p>", "unrendered TeX"),
    ("<h1>T</h1><p>where \\(x_i\\) is a token</p>", "unrendered TeX"),
    ('<h1>T</h1><div class="math notranslate nohighlight">y = x</div>', "not typeset by MathJax"),
    ('<h1>T</h1><div class="cell_output"><div class="output">'
     '<script type="application/vnd.jupyter.widget-view+json">{}</script></div></div>',
     "empty widget output"),
    ('<h1>T</h1><div class="cell_output"><div class="output"> </div></div>', "empty output area"),
    ('<h1>T</h1><div class="animation"><img id="_anim_img9"></div>', "image without src"),
    ('<h1>T</h1><img src="../_images/nowhere-to-be-found.png">', "missing image"),
    ('<h1>T</h1><a href="00_nowhere.html">x</a>', "broken link"),
    ('<h1>T</h1><a href="#no-such-anchor">x</a>', "broken"),
    ('<h1>T</h1><script src="https://cdn.example.org/lib.js"></script>', "from the network"),
    ("<p>no title</p>", "no <h1>"),
])
def test_each_fault_is_reported(body, expected):
    found = problems(body)
    assert any(expected in p for p in found), found


def test_widget_without_saved_state_says_why():
    dom = check_pages.parse(
        '<html><body><h1>T</h1><div class="cell_output"><div class="output">'
        '<script type="application/vnd.jupyter.widget-view+json">{}</script></div></div></body></html>')
    found = check_pages.check_dom("book/99_page", dom, URL, BASE)
    assert any("no widget state" in p for p in found), found


def test_chapters_need_their_launch_buttons():
    chapter = "book/" + sorted(ROOT.glob("book/0*.md"))[0].stem
    found = check_pages.check_dom(chapter, page(GOOD_BODY), BASE + chapter + ".html", BASE)
    assert {"no Binder launch button", "no Colab launch button",
            "no Thebe (live code) button"} <= set(found), found
    buttons = ('<a href="https://mybinder.org/v2/gh/x">b</a>'
               '<a href="https://colab.research.google.com/github/x">c</a>'
               '<button class="btn btn-launch-thebe">t</button>')
    found = check_pages.check_dom(chapter, page(GOOD_BODY + buttons), BASE + chapter + ".html", BASE)
    assert not [p for p in found if "button" in p], found


def test_toc_pages_are_every_chapter():
    pages = check_pages.toc_pages()
    assert pages[0] == "book/intro"
    assert all((ROOT / f"{p}.md").exists() for p in pages)
    assert sum(p.startswith("book/1") or p.startswith("book/0") for p in pages) >= 15
