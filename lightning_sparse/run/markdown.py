"""Sections of a markdown file that a script owns, between its own HTML-comment markers."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_marked_block"]


def write_marked_block(
    path: Path, begin: str, end: str, markdown: str, title: str = "# Benchmarks\n"
) -> None:
    """Put ``markdown`` between ``begin`` and ``end`` in ``path``; keep everything else in it.

    The block already there is replaced in place; a new one is appended; a missing file is made,
    starting with ``title``. This is how each benchmark script rewrites only its own section of
    docs/benchmarks.md.
    """
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else title
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
