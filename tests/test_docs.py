"""The documentation as a reader follows it: every relative link and anchor in README.md, CHANGELOG.md,
docs/ and the READMEs of benchmarks/ and experiments/ resolves, every docs/ anchor a code comment cites exists, and the text speaks of the project itself."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "benchmarks" / "README.md", ROOT / "experiments" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """Explicit `<a id>` anchors and GitHub's heading slugs (lowercase, punctuation dropped, spaces to -)."""
    text = page.read_text()
    found = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for heading in re.findall(r"^#{1,6} (.+)$", prose(text), flags=re.M):
        plain = re.sub(r"<[^>]+>", "", heading).strip().lower()
        found.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", plain)))
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    assert broken_links(page) == []


def test_the_link_check_catches_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## <a id=\"kept\"></a>Kept\n\n[ok](#top) [ok](a.md#kept) "
                                   "[bad](missing.md) [bad](a.md#gone) `[code](not-a-link)`\n")
    assert broken_links(tmp_path / "a.md") == ["missing.md", "a.md#gone"]


def test_every_docs_anchor_a_code_comment_cites_exists():
    cited = set()
    for source in [*(ROOT / "src").rglob("*.py"), *(ROOT / "src").rglob("*.yaml")]:
        cited |= set(re.findall(r"docs/(\w+\.md)#([\w-]+)", source.read_text()))
    assert cited, "the presets cite docs/experiments.md"
    assert sorted(f"{page}#{anchor}" for page, anchor in cited
                  if anchor not in anchors(ROOT / "docs" / page)) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_text_speaks_of_the_project_not_of_its_sessions(page):
    assert re.findall(r"\b(?:sessions?|today'?s?)\b", page.read_text(), flags=re.I) == []


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 350
