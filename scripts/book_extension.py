"""Sphinx extension for the tutorial_moe book (loaded through ``_config.yml``'s local_extensions).

1. Offline math: MathJax 3 is served from the site's own ``_static/mathjax`` instead of a CDN.
   The files come from the PyPI package ``sphinx-mathjax-offline`` (MathJax 3.2.2, Apache-2.0;
   a dependency of the book and test extras), used here as a file source only (its own Sphinx
   hook would copy all 24 MB). We copy only what a page loads: ``tex-chtml.js``, the
   CHTML woff fonts, the TeX extensions that autoload on demand, the menu and the accessibility
   add-ons (about 3 MB of the package's 24 MB; the 3.9 MB speech-rule engine is left out, so the
   menu's speech options need a network).
2. Offline widgets: when ``scripts/setup.sh`` could fetch them (``npm pack``, needs node), the
   ipywidgets HTML manager (``@jupyter-widgets/html-manager`` ``embed-amd.js``) and RequireJS are
   served from ``_static/widgets``; without node the pages fall back to myst-nb's CDN links.
3. Cache-only builds: with ``TUTORIAL_MOE_BOOK_CACHE_ONLY=1`` (the test build), a chapter that is
   not in the execution cache is not executed: it is listed in a warning (so ``-W`` fails) and
   built without outputs. Every build writes ``_build/execution.json``: which chapters came from
   the cache and which were executed. When a build executes any chapter, a chapter that reads
   the others' saved results (``load_results``/``load_all_results``: the verdicts) is executed
   again too, after them, so that its table shows this build's numbers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

sys.path.insert(0, str(Path(__file__).parent))
from book_cache import cache_dir_for_mode, forget, is_cached, merge_consecutive_streams  # noqa: E402

logger = logging.getLogger(__name__)

READS_RESULTS = re.compile(r"\bload_(all_)?results\(")
MATHJAX_FILES = ["tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y"]
WIDGET_FILES = ["require.js", "embed-amd.js"]
# Each bundled module (@jupyter-widgets/base, /controls, /html-manager/dist/libembed-amd, ...)
# computes where its icon fonts are from its own AMD module URL, which RequireJS would place
# beside the page. Map those module names (and the manager's own override) to the folder of
# this script, which holds the fonts and works at any page depth.
WIDGETS_CONFIG_JS = """(function () {
  var here = document.currentScript.src.replace(/[^/]*$/, "");
  var folder = here.replace(/\\/$/, "");
  window.__jupyter_widgets_assets_path__ = here;
  require.config({paths: {
    "@jupyter-widgets": folder,
    "@jupyter-widgets/html-manager/dist": folder
  }});
})();
"""


def mathjax_source() -> Path | None:
    """The MathJax es5 tree shipped by sphinx-mathjax-offline, or None if not installed."""
    try:
        dist = metadata.distribution("sphinx-mathjax-offline")
    except metadata.PackageNotFoundError:
        return None
    folder = Path(str(dist.locate_file("sphinx-mathjax-offline/static/mathjax")))
    return folder if (folder / "tex-chtml.js").is_file() else None


def widgets_source() -> Path:
    """Where scripts/setup.sh puts the ipywidgets embed bundle (inside the virtual environment)."""
    return Path(sys.prefix) / "share" / "tutorial_moe" / "widgets"


def _copy(source: Path, names: list[str], target: Path) -> int:
    size = 0
    for name in names:
        src, dst = source / name, target / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
            size += sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            size += src.stat().st_size
    return size


def configure(app, config):
    if not config.nb_execution_cache_path:
        config.nb_execution_cache_path = str(cache_dir_for_mode())
    if mathjax_source() is None:
        logger.warning(
            "sphinx-mathjax-offline is not installed, so equations would need a CDN: "
            "run `bash scripts/setup.sh book` (or pip install sphinx-mathjax-offline)"
        )
    else:
        config.mathjax_path = "mathjax/tex-chtml.js"
    widgets = widgets_source()
    if all((widgets / name).is_file() for name in WIDGET_FILES):
        config.nb_ipywidgets_js = {
            "widgets/require.js": {},
            "widgets/config.js": {},
            "widgets/embed-amd.js": {},
        }
    else:
        logger.info("book_extension: ipywidgets embed bundle not set up; widget pages use a CDN")


def check_cache(app, env, docnames):
    """Record which chapters the cache answers; in cache-only mode, execute none of the rest."""
    cached, uncached = [], []
    for docname in sorted(docnames):
        path = Path(env.doc2path(docname))
        head = path.read_text(encoding="utf-8")[:2000] if path.suffix == ".md" else ""
        if path.suffix == ".md" and "kernelspec" not in head:
            continue  # a plain page, not a notebook
        (cached if is_cached(path, env.mystnb_config.execution_cache_path) else uncached).append(
            docname
        )
    cache_only = os.environ.get("TUTORIAL_MOE_BOOK_CACHE_ONLY") == "1"
    if uncached and not cache_only:
        # A chapter that reads the other chapters' saved results (the verdicts) must run after
        # them in the same build, or its cached table would show the previous run's numbers.
        # Sphinx reads documents in sorted order, so 17_verdicts runs after 00-13.
        readers = [d for d in cached
                   if READS_RESULTS.search(Path(env.doc2path(d)).read_text(encoding="utf-8"))]
        for docname in readers:
            forget(Path(env.doc2path(docname)), env.mystnb_config.execution_cache_path)
            cached.remove(docname)
            uncached.append(docname)
    app._tutorial_moe_exec = {"cached": cached, "executed": []}
    if cache_only:
        if uncached:
            logger.warning(
                "not in the execution cache, so built WITHOUT outputs (cache-only build; "
                "nbval did not run them or they failed): " + ", ".join(uncached)
            )
            patterns = list(env.mystnb_config.execution_excludepatterns)
            patterns += [str(Path(env.doc2path(d)).relative_to(app.srcdir)) for d in uncached]
            env.mystnb_config = env.mystnb_config.copy(execution_excludepatterns=patterns)
        app._tutorial_moe_exec["not_executed"] = uncached
    else:
        app._tutorial_moe_exec["executed"] = uncached


# matplotlib's `Animation.to_jshtml()` links Font Awesome 4.4 from a CDN for its player buttons.
# The theme already ships Font Awesome (as JavaScript that draws the `fa` icons), so the link
# is only a failed request offline: drop it.
ANIMATION_CDN_CSS = re.compile(
    r'<link rel="stylesheet"\s+href="https://maxcdn\.bootstrapcdn\.com/font-awesome/[^"]+">\s*'
)


class DropAnimationCdnLink(SphinxPostTransform):
    default_priority = 900
    formats = ("html",)

    def run(self, **kwargs):
        for node in self.document.findall(nodes.raw):
            if "bootstrapcdn" in node.astext():
                text = ANIMATION_CDN_CSS.sub("", node.astext())
                node.replace_self(nodes.raw(text, text, format=node.get("format", "html")))


def finish(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    source = mathjax_source()
    if source is not None:
        size = _copy(source, MATHJAX_FILES, static / "mathjax")
        logger.info(f"book_extension: MathJax served from _static/mathjax ({size / 1e6:.1f} MB)")
    widgets = widgets_source()
    if all((widgets / name).is_file() for name in WIDGET_FILES):
        _copy(widgets, [p.name for p in widgets.iterdir()], static / "widgets")
        (static / "widgets" / "config.js").write_text(WIDGETS_CONFIG_JS, encoding="utf-8")
    summary = getattr(app, "_tutorial_moe_exec", None)
    if summary is not None:
        out = Path(app.outdir).parent / "execution.json"
        out.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        logger.info(
            f"book_extension: {len(summary['cached'])} chapter(s) from the cache, "
            f"{len(summary['executed'])} executed"
        )


def setup(app):
    # myst-nb's stream merging (nb_merge_streams) moves every print of a cell into its first
    # stream output, so text printed after a figure would show above it; merge only runs of
    # consecutive prints, as a live notebook shows them (the nbval bridge does the same).
    import myst_nb.core.render

    myst_nb.core.render.coalesce_streams = merge_consecutive_streams
    app.add_post_transform(DropAnimationCdnLink)
    app.connect("config-inited", configure, priority=900)
    app.connect("env-before-read-docs", check_cache, priority=900)
    app.connect("build-finished", finish)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
