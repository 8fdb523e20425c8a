#!/usr/bin/env python
"""The browser check: headless Chromium loads every page of the built book, as a reader would.

The site (_build/html) is served on 127.0.0.1 by a throw-away HTTP server that records every
request. For each page of _toc.yml, Chromium (no network, no GPU, a fresh profile) dumps the DOM
after the page's scripts ran (MathJax, the widget manager, animations) and takes a screenshot
into _build/screenshots/. A page fails when:

- a request it made was answered 404 (a missing image, script, font or stylesheet);
- it loads a script, stylesheet or image from another host (the pages must work offline);
- an internal link points to a missing file or to a missing #anchor;
- TeX is left unrendered in its visible text (``$$``, ``\\frac``, ``\\(`` ...) or a math element
  was not typeset by MathJax;
- an output area is empty: a widget view that did not render (no saved state, or no widget
  manager), an animation whose frame never loaded, or an output box with nothing in it;
- a chapter (a notebook page) lacks its Binder, Colab or Thebe launch button.

Usage: scripts/check_pages.py [--junitxml FILE] [--pages book/intro book/02_brainy ...]
"""
from __future__ import annotations

import argparse
import functools
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import yaml

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--disable-dev-shm-usage", "--mute-audio",
]
# TeX that MathJax should have turned into typeset math; code and outputs (<pre>, <code>) are
# exempt, because a Python string such as r"$\alpha$" is not meant to be typeset there.
UNRENDERED_TEX = re.compile(
    r"\$\$|\\\(|\\\[|\\(?:frac|sum|prod|begin|end|mathrm|mathbf|text|left|right|alpha|beta|"
    r"sqrt|cdot|times|log|exp|operatorname|mathcal|top|in)\b"
)
SKIP_TEXT = {"script", "style", "pre", "code", "textarea", "mjx-container", "svg", "math", "kbd"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
MEDIA = {"img", "svg", "canvas", "video", "iframe", "table", "mjx-container", "object"}


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary ($CHROMIUM first), or None."""
    candidates = [os.environ.get("CHROMIUM")] + ["chromium", "chromium-browser", "google-chrome",
                                                  "google-chrome-stable"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def toc_pages() -> list[str]:
    """Every page of _toc.yml, as docnames (e.g. 'book/intro')."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                pages.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)

    walk(toc)
    return [str(Path(p).with_suffix("")) for p in pages]


# ---------------------------------------------------------------------------------------------
# A small DOM: enough structure to ask "what is inside this element" without a parser library.
class Node:
    __slots__ = ("tag", "attrs", "children", "parent", "text")

    def __init__(self, tag, attrs=None, parent=None):
        self.tag, self.attrs, self.children, self.parent, self.text = tag, attrs or {}, [], parent, ""

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag=None, cls=None):
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.classes)]

    def visible_text(self) -> str:
        if self.tag in SKIP_TEXT:
            return ""
        return self.text + " ".join(c.visible_text() for c in self.children)

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class DomBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document")
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.current = node.parent

    def handle_data(self, data):
        text = Node("#text", parent=self.current)
        text.text = data
        self.current.children.append(text)


def parse(markup: str) -> Node:
    builder = DomBuilder()
    builder.feed(markup)
    return builder.root


# ---------------------------------------------------------------------------------------------
class Server:
    """Serves SITE on 127.0.0.1 and records (path, status) of every request."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_request(self, code="-", size="-"):
                server.log.append((unquote(urlparse(self.path).path), int(code)))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(SITE)))
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def chromium(binary: str, profile: str, *args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def ids_of(path: Path) -> frozenset[str]:
    markup = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(re.findall(r'\bid="([^"]+)"', markup))


def is_notebook_page(docname: str) -> bool:
    source = ROOT / f"{docname}.md"
    return source.exists() and "kernelspec:" in source.read_text(encoding="utf-8")[:2000]


def check_dom(docname: str, dom: Node, page_url: str, base: str) -> list[str]:
    """Problems in one page's rendered DOM (see the module docstring)."""
    problems = []
    if not dom.find_all("h1"):
        problems.append("no <h1>: the page did not render")

    # Resources from other hosts (the page must work offline).
    for tag, attr in (("script", "src"), ("link", "href"), ("img", "src")):
        for node in dom.find_all(tag):
            url = node.attrs.get(attr, "")
            if tag == "link" and node.attrs.get("rel") not in ("stylesheet", "preload", "icon", "modulepreload"):
                continue
            if re.match(r"(https?:)?//", url) and not url.startswith(base):
                problems.append(f"loads <{tag}> from the network: {url}")

    # Images: a src must be there (data: or a file of the site).
    for node in dom.find_all("img"):
        src = node.attrs.get("src", "")
        if not src:
            problems.append(f"image without src (id={node.attrs.get('id', '?')}): an animation "
                            "frame or a figure never loaded")
        elif not src.startswith("data:"):
            target = urlparse(urljoin(page_url, src))
            if target.netloc == urlparse(base).netloc and not (SITE / unquote(target.path).lstrip("/")).is_file():
                problems.append(f"missing image: {src}")

    # Internal links and their anchors.
    page_ids = {n.attrs["id"] for n in dom.iter() if n.attrs.get("id")}
    for node in dom.find_all("a"):
        href = node.attrs.get("href", "")
        if not href or href.startswith(("mailto:", "javascript:", "tel:")):
            continue
        target = urlparse(urljoin(page_url, href))
        if target.netloc != urlparse(base).netloc:
            continue
        if target.path == urlparse(page_url).path:  # an anchor on this page
            if target.fragment and unquote(target.fragment) not in page_ids:
                problems.append(f"broken anchor: {href}")
            continue
        path = SITE / unquote(target.path).lstrip("/")
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            problems.append(f"broken link: {href}")
        elif target.fragment and path.suffix == ".html" and unquote(target.fragment) not in ids_of(path):
            problems.append(f"broken anchor: {href}")

    # TeX left unrendered.
    body = (dom.find_all("body") or [dom])[0]
    for match in UNRENDERED_TEX.finditer(body.visible_text()):
        text = body.visible_text()
        snippet = text[max(0, match.start() - 40): match.end() + 40].replace("\n", " ")
        problems.append(f"unrendered TeX: ...{snippet.strip()}...")
        break
    math = [n for n in body.iter() if "math" in n.classes and n.tag in ("span", "div")]
    untyped = [n for n in math if not n.find_all("mjx-container")]
    if untyped:
        problems.append(f"{len(untyped)} of {len(math)} math element(s) not typeset by MathJax, "
                        f"e.g. {untyped[0].all_text().strip()[:60]!r}")

    # Output areas.
    state = [n for n in dom.find_all("script")
             if n.attrs.get("type") == "application/vnd.jupyter.widget-state+json"]
    for view in [n for n in dom.find_all("script")
                 if n.attrs.get("type") == "application/vnd.jupyter.widget-view+json"]:
        rendered = [n for n in view.parent.children if "widget-subarea" in n.classes
                    and any(c.tag != "#text" for c in n.children)]
        if not rendered:
            why = "no widget state saved in the page" if not state else "the widget manager did not render it"
            problems.append(f"empty widget output ({why})")
    for output in dom.find_all(cls="cell_output"):
        has_media = any(n.tag in MEDIA for n in output.iter())
        has_widget = any("widget-subarea" in n.classes for n in output.iter())
        if not has_media and not has_widget and not output.visible_text().strip() \
                and not any(n.tag == "pre" and n.all_text().strip() for n in output.iter()):
            problems.append("empty output area")
    for node in dom.find_all("div", cls="animation"):
        if not any(n.tag == "img" and n.attrs.get("src", "").startswith("data:") for n in node.iter()):
            problems.append("animation without a rendered frame")

    # Launch buttons on every chapter.
    if is_notebook_page(docname):
        hrefs = " ".join(n.attrs.get("href", "") for n in dom.find_all("a"))
        if "mybinder.org" not in hrefs:
            problems.append("no Binder launch button")
        if "colab.research.google.com" not in hrefs:
            problems.append("no Colab launch button")
        if not any("btn-launch-thebe" in n.classes for n in dom.iter()):
            problems.append("no Thebe (live code) button")
    return problems


def write_junit(path: Path, results: list[tuple[str, list[str], float]]) -> None:
    suite = ET.Element("testsuite", name="browser", tests=str(len(results)),
                       failures=str(sum(1 for _, p, _ in results if p)), errors="0", skipped="0")
    for docname, problems, seconds in results:
        case = ET.SubElement(suite, "testcase", classname="browser", name=docname, time=f"{seconds:.2f}")
        if problems:
            ET.SubElement(case, "failure", message=problems[0]).text = "\n".join(problems)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", nargs="*", help="docnames to check (default: every page of _toc.yml)")
    parser.add_argument("--junitxml", type=Path, help="write results as JUnit XML")
    parser.add_argument("--budget-ms", type=int, default=20000,
                        help="virtual time Chromium gives each page's scripts (default 20000)")
    args = parser.parse_args(argv)

    binary = find_chromium()
    if binary is None:
        print("browser: no Chromium found (apt-get install chromium)")
        return 2
    if not SITE.is_dir():
        print(f"browser: {SITE} does not exist: build the book first")
        return 2
    pages = args.pages or toc_pages()
    SHOTS.mkdir(parents=True, exist_ok=True)
    server = Server()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="tutorial_moe_chromium_") as profile:
            for docname in pages:
                start = time.perf_counter()
                page = SITE / f"{docname}.html"
                problems = []
                if not page.is_file():
                    results.append((docname, [f"page not built: {page.relative_to(ROOT)}"], 0.0))
                    print(f"FAIL {docname}: page not built")
                    continue
                url = server.base + f"{docname}.html"
                first = len(server.log)
                shot = SHOTS / (docname.replace("/", "_") + ".png")
                shot.unlink(missing_ok=True)
                # One load: the DOM after the scripts ran goes to stdout, the picture to `shot`.
                dump = chromium(binary, profile, f"--virtual-time-budget={args.budget_ms}",
                                f"--screenshot={shot}", "--window-size=1280,1800", "--dump-dom", url)
                if dump.returncode != 0 or "<html" not in dump.stdout:
                    problems.append(f"Chromium could not load the page (exit {dump.returncode}): "
                                    f"{dump.stderr.strip()[-300:]}")
                else:
                    problems += check_dom(docname, parse(dump.stdout), url, server.base)
                if not shot.is_file() or shot.stat().st_size < 5000:
                    problems.append("no screenshot written (blank page?)")
                # The browser asks for /favicon.ico by itself; no page links it.
                missing = sorted({p for p, code in server.log[first:]
                                  if code >= 400 and p != "/favicon.ico"})
                problems += [f"request failed: {p}" for p in missing]
                seconds = time.perf_counter() - start
                results.append((docname, problems, seconds))
                if problems:
                    print(f"FAIL {docname} ({seconds:.1f} s)")
                    for problem in problems:
                        print(f"     - {html.unescape(problem)}")
                else:
                    print(f"ok   {docname} ({seconds:.1f} s) -> {shot.relative_to(ROOT)}")
    finally:
        server.close()
    if args.junitxml:
        write_junit(args.junitxml, results)
    failed = sum(1 for _, p, _ in results if p)
    print(f"browser: {len(results) - failed} page(s) ok, {failed} failed; screenshots in "
          f"{SHOTS.relative_to(ROOT)}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
