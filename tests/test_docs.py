"""The documentation: README.md and docs/*.md link only to files and headings that exist, the README stays short,
and nothing in the repository cites a file outside it. Pure Python, no torch."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
# Built by concatenation so that this file does not contain the strings it forbids.
FORBIDDEN = ("../" + "shared", "DESIGN" + ".md")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, ...


def doc_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_anchor(heading):
    """GitHub's anchor for a heading: rendered text, lowercase, punctuation other than '-' and '_' removed,
    spaces to '-'."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text):
    """Every anchor a markdown text's headings produce, with GitHub's -1, -2 suffixes for repeated headings."""
    seen, result = {}, set()
    for _, line in _prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = github_anchor(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text):
    """(line number, target) of every markdown link outside code."""
    for number, line in _prose_lines(text):
        prose = INLINE_CODE.sub("", line)
        for match in LINK.finditer(prose):
            yield number, match.group(2)


def broken_links(path, root=ROOT):
    """One message per link in the markdown file `path` whose file or #anchor does not exist."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    problems = []
    for number, target in links(text):
        if not target or EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        if file_part:
            resolved = (path.parent / file_part).resolve()
            if not resolved.exists():
                problems.append(f"{path}:{number}: {target}: no such file")
                continue
            try:
                resolved.relative_to(Path(root).resolve())
            except ValueError:
                problems.append(f"{path}:{number}: {target}: outside the repository")
                continue
        else:
            resolved = path
        if anchor:
            if resolved.suffix.lower() != ".md" or resolved.is_dir():
                problems.append(f"{path}:{number}: {target}: anchor into a file that is not markdown")
            elif anchor not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{path}:{number}: {target}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "docs" / "design.md").is_file()


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


def test_design_doc_has_the_cited_sections():
    """Docstrings cite docs/design.md "Objective" and "Reference decoder"."""
    found = anchors((ROOT / "docs" / "design.md").read_text(encoding="utf-8"))
    assert {"objective", "reference-decoder"} <= found


def test_nothing_cites_outside_the_repository():
    files = [*doc_files(), *sorted((ROOT / "ar2diff").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    hits = [f"{path.relative_to(ROOT)}: {needle}" for path in files
            for needle in FORBIDDEN if needle in path.read_text(encoding="utf-8")]
    assert hits == []


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section: with `code`\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "# Page",
        "## Local heading",
        "[ok file](other.md) [ok anchor](other.md#a-section-with-code) [ok local](#local-heading)",
        "[missing file](nosuch.md)",
        "[missing anchor](other.md#no-such-section)",
        "[missing local](#nowhere)",
        "[web](https://example.com/x.md) [mail](mailto:a@b.c) `[in code](nosuch2.md)`",
        "```",
        "[in a fence](nosuch3.md)",
        "# not a heading",
        "```",
        "[fenced heading is not an anchor](#not-a-heading)",
    ]) + "\n", encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 4, problems
    assert any("nosuch.md" in p and "no such file" in p for p in problems)
    assert any("#no-such-section" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
    assert any("#not-a-heading" in p for p in problems)


def test_github_anchor_rules():
    assert github_anchor("Phase-end measurement (what eval.json holds)") == "phase-end-measurement-what-evaljson-holds"
    assert github_anchor("Drafter-verifier alignment (ablation): `objective.diff_target`") == \
        "drafter-verifier-alignment-ablation-objectivediff_target"
    assert anchors("# A\n## A\n") == {"a", "a-1"}
