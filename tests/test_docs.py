"""Every pointer into docs/compatibility.md from the code and the docs names a section that exists there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPATIBILITY = REPO / "docs" / "compatibility.md"
CITATION = re.compile(r"§(\d+)(?:\.(\d+))?(?:-(\d+))?")


def sections(text: str) -> tuple[set[str], set[str]]:
    """(the section numbers "N" and "N.M" of the headings, the numbers of the items in the numbered-bug section)."""
    headings = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", text, re.M))
    last = max(headings, key=lambda s: tuple(map(int, s.split("."))))
    bugs_section = text.split(f"\n## {last.split('.')[0]}. ", 1)[1]
    return headings, set(re.findall(r"^(\d+)\. ", bugs_section, re.M))


def test_section_parsing_on_a_small_document():
    text = "# T\n## 1. One\n### 1.2 Sub\n## 2. Bugs\n1. first\n   more\n2. second\n"
    assert sections(text) == ({"1", "1.2", "2"}, {"1", "2"})


def test_every_citation_resolves():
    headings, bugs = sections(COMPATIBILITY.read_text())
    assert {str(n) for n in range(1, 13)} <= headings
    last = max(int(h) for h in headings if "." not in h)
    assert bugs == {str(n) for n in range(1, len(bugs) + 1)}, "bug items are numbered 1..n without gaps"
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.md", "Makefile"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    broken, cited = [], 0
    for name in files:
        text = (REPO / name).read_text(errors="replace")
        if name != "docs/compatibility.md" and "docs/compatibility.md" not in text:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for major, minor, upto in CITATION.findall(line):
                cited += 1
                if int(major) == last and minor:
                    ok = minor in bugs
                elif minor:
                    ok = f"{major}.{minor}" in headings
                else:
                    ok = major in headings and (not upto or upto in headings)
                if not ok:
                    cite = "§" + major + (f".{minor}" if minor else "") + (f"-{upto}" if upto else "")
                    broken.append(f"{name}:{number}: {cite} in {line.strip()!r}")
    assert cited > 30, f"only {cited} citations found: is the pattern still right?"
    assert not broken, "citations of sections that docs/compatibility.md does not have:\n" + "\n".join(broken)
