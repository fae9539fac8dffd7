"""README.md is a user's front door: short, its links alive, its test command the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def anchors(page: Path) -> set[str]:
    """The ids MkDocs and GitHub give a page's headings."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_every_link_in_the_readme_leads_somewhere():
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.is_file(), link
        if anchor:
            assert anchor in anchors(target), link


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^python3 -m venv .*$", README, re.M)
    assert len(commands) == 2  # the main job and the tests
    assert commands[1] in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
