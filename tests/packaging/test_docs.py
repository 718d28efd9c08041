"""The README and docs/: links that resolve, images kept in docs/, user's wording."""
import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")
# wording of a working log rather than of a user's document
LOG_WORDS = re.compile(r"this round|previous round|the issue|criterion \d|this session", re.I)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = [target for _, target in LINK.findall(text)
              if not re.match(r"[a-z]+:", target) and not target.startswith("#")
              and not (page.parent / target.split("#")[0]).exists()]
    assert not broken, f"{page.name}: links to missing files {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_working_log_wording(page):
    hits = LOG_WORDS.findall(page.read_text(encoding="utf-8"))
    assert not hits, f"{page.name}: {hits}"


def test_readme_images():
    """PyPI renders the README without the repository's files: at most one image
    there; the others live in docs/ beside the pages that show them."""
    images = [t for bang, t in LINK.findall((REPO / "README.md").read_text()) if bang]
    assert len(images) <= 1
    for page in PAGES[1:]:
        for bang, target in LINK.findall(page.read_text(encoding="utf-8")):
            if bang:
                assert "/" not in target, f"{page.name}: image {target} outside docs/"


def test_quick_start_comes_first():
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("## Quick start")
    assert start < 15 and any("import deelm" in line for line in lines[start:start + 30])
