"""Builds the docs site into ``site/`` and checks it: ``make docs``.

1. Copies MathJax (from the ``jupyter-server-mathjax`` package, an extra of ``docs``) into
   ``docs/javascripts/mathjax``, so the site renders formulas without a network.
2. ``mkdocs build --strict``: any warning (a broken reference, a docstring mkdocstrings
   cannot read, a missing page) fails the build.
3. Every internal link and image of every page resolves to a file of the site.
4. With Chromium installed (``chromium``, ``chromium-browser`` or ``google-chrome`` on the
   PATH), every page is opened headless: it must load, and each page with formulas must
   have them typeset by MathJax. Without Chromium this step says so and is skipped; the
   link check still runs.

Run: ``python scripts/build_docs.py`` from the repository root (``make docs``).
"""

from __future__ import annotations

import html.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "site"
MATHJAX = ROOT / "docs" / "javascripts" / "mathjax"


def copy_mathjax() -> None:
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    if spec is None or spec.origin is None:
        sys.exit("make docs needs the docs extra: pip install -e '.[docs]'")
    static = Path(spec.origin).parent / "static"
    if not (MATHJAX / "MathJax.js").exists():
        shutil.copytree(static, MATHJAX, dirs_exist_ok=True)


def build() -> None:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-q"]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(cmd, cwd=ROOT, check=False, env=env)
    if done.returncode != 0:
        sys.exit("mkdocs build --strict failed (see the warnings above)")


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.math = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])
        if "arithmatex" in (attrs.get("class") or ""):
            self.math += 1


def pages() -> list[Path]:
    # 404.html links from the site root (it is served at any depth): not a page to check.
    skip = {"404.html"}
    return sorted(p for p in SITE.rglob("*.html") if "javascripts" not in p.parts
                  and p.name not in skip)  # fmt: skip


def check_links() -> dict[Path, int]:
    """Every relative link of every page points to a file of the site; formula counts."""
    broken, math = [], {}
    for page in pages():
        parser = _Links()
        parser.feed(page.read_text(encoding="utf-8"))
        math[page] = parser.math
        for link in parser.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or url.netloc or not url.path or link.startswith("#"):
                continue
            target = (page.parent / urllib.parse.unquote(url.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(SITE)}: {link}")
    if broken:
        sys.exit("broken links:\n  " + "\n  ".join(broken))
    print(f"links: {len(pages())} pages, every internal link resolves")
    return math


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def check_render(math: dict[Path, int]) -> None:
    """Opens every page headless; pages with formulas must come out typeset by MathJax."""
    browser = chromium()
    if browser is None:
        print("render: no Chromium on the PATH; skipped (apt-get install chromium)")
        return
    failed = []
    for page in pages():
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
               "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
               page.as_uri()]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        dom = done.stdout
        name = page.relative_to(SITE)
        if done.returncode != 0 or "</html>" not in dom:
            failed.append(f"{name}: did not load ({done.returncode})")
        elif math[page]:
            # MathJax replaces each formula by a frame with an id MathJax-Element-<k>-Frame.
            typeset = len(set(re.findall(r'id="MathJax-Element-(\d+)-Frame"', dom)))
            if typeset < math[page] or "Math Processing Error" in dom:
                failed.append(f"{name}: {typeset} of {math[page]} formula(s) typeset")
    if failed:
        sys.exit("render:\n  " + "\n  ".join(failed))
    typeset = sum(1 for n in math.values() if n)
    print(f"render: {len(pages())} pages load in Chromium; formulas typeset on {typeset} page(s)")


def main() -> None:
    copy_mathjax()
    build()
    math = check_links()
    check_render(math)


if __name__ == "__main__":
    main()
