"""The documentation: README.md for a newcomer, the reference in docs/ built by MkDocs.

* ``mkdocs build --strict`` succeeds (any warning fails it: a broken link or anchor, a page
  missing from the navigation in mkdocs.yml), built into a temporary folder as CI does;
* the README stays what a newcomer needs (what it is, the quick start, the concepts, a server
  and three sites, links), and links only to pages that exist;
* neither names the project's internal issue numbers, which mean nothing to a user.

The commands the pages show are exercised by tests/test_readme.py (python blocks) and
tests/test_readme_commands.py (shell blocks); the Flower page's by tests/test_flower.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    pages = {p.stem for p in DOCS.glob("*.md")}
    for page in pages - {"index"}:
        assert (site / page / "index.html").is_file(), page
    assert (site / "figures" / "wire_ratio_quick.png").is_file()  # the benchmarks' plots


def test_readme_is_a_newcomer_page_that_links_to_the_docs() -> None:
    text = README.read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert sections == ["Quick start", "Concepts", "Run a server and three sites",
                        "Documentation"]
    assert len(text.splitlines()) < 200, "keep reference material in docs/"
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links, "the README must link to the docs"
    for link in links:
        assert (ROOT / link).is_file(), link
    linked = {Path(link).name for link in links}
    assert linked >= {p.name for p in DOCS.glob("*.md")}, "the README links every page of docs/"


def test_no_internal_issue_numbers_in_user_docs() -> None:
    for page in [README, *DOCS.glob("*.md")]:
        found = re.findall(r"\bissues? #?\d+|\(#\d+\)", page.read_text(encoding="utf-8"),
                           flags=re.IGNORECASE)
        assert not found, f"{page.name}: {found}"
