"""The code examples of the how-to guides run as written.

Every ```python block preceded by a `<!-- tested -->` line in the guides below is executed on its
own, in a fresh namespace: the examples are self-contained (they build the toy models of
`tokenprune.testing.models`) and must leave nothing registered or attached behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenprune.registry import ADAPTERS, STRATEGIES

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = [
    "writing-a-strategy.md",
    "writing-an-adapter.md",
    "merging.md",
    *sorted(f"adapters/{p.name}" for p in (DOCS / "adapters").glob("*.md")),
]
MARKER = "<!-- tested -->"


def marked_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number of the first code line, code) of each marked python block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        start = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), len(lines))
        if start == len(lines) or lines[start].strip() != "```python":
            raise AssertionError(f"{path.name}:{i + 1}: {MARKER} must be followed by a ```python block")
        end = next((j for j in range(start + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path.name}:{start + 1}: unclosed code block")
        blocks.append((start + 2, "\n".join(lines[start + 1 : end]) + "\n"))
    return blocks


EXAMPLES = [
    pytest.param(name, line, code, id=f"{name}:{line}")
    for name in GUIDES
    for line, code in marked_blocks(DOCS / name)
]


@pytest.mark.parametrize("guide", GUIDES)
def test_every_guide_has_tested_examples(guide: str) -> None:
    assert marked_blocks(DOCS / guide), f"{guide} has no {MARKER} python block"


@pytest.mark.parametrize(("guide", "line", "code"), EXAMPLES)
def test_example_runs_and_cleans_up(guide: str, line: int, code: str) -> None:
    before = (STRATEGIES.names(), ADAPTERS.names())
    # Blank lines in front keep the line numbers of tracebacks those of the Markdown file; the
    # example gets no `from __future__` flag of this file (`dont_inherit`), as when run as a script.
    example = compile("\n" * (line - 1) + code, str(DOCS / guide), "exec", dont_inherit=True)
    exec(example, {"__name__": "docs_example"})
    assert (STRATEGIES.names(), ADAPTERS.names()) == before, "the example left a name registered"
