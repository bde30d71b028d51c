"""The front door holds: the README stays short, its test command is the one CI runs, and no
relative link in the README or the docs site points to a file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(markdown: str) -> list[str]:
    """Link targets of ``markdown`` outside code that are neither URLs nor bare anchors."""
    text = _INLINE_CODE.sub("", _FENCE.sub("", markdown))
    targets = [m.group(1) for m in _LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.IGNORECASE)]


def readme_test_command(markdown: str) -> str:
    """The first command of the first code block in the README's ``## Tests`` section."""
    section = re.search(r"^## Tests\n(.*?)(?=^## )", markdown, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Tests' section"
    block = re.search(r"^```\w*\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    assert block, "the README's Tests section has no code block"
    return block.group(1).strip().splitlines()[0].strip()


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; the front door keeps to 250"


def test_readme_test_command_is_what_ci_runs() -> None:
    command = readme_test_command(README.read_text(encoding="utf-8"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"README's test command {command!r} is not a line of .ci/run"


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_link_finder_sees_links_and_skips_code() -> None:
    text = (
        "[a](docs/a.md) ![img](pic.png) [web](https://x.org) [here](#top)\n"
        "`[not](code.md)`\n```\n[nor](block.md)\n```\n[b](b.md#part)"
    )
    assert relative_links(text) == ["docs/a.md", "pic.png", "b.md#part"]
