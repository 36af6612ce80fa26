"""Markdown tables for the reports people read: stage 2's fertility.md, stage 5's long_context.md, stage
8's report.md and stage 9's model card.

One writer, so every table escapes the same way: a ``|`` inside a cell is written ``\\|`` and a newline
becomes a space, or a generated sample or a prompt containing either would split the row and shift every
later column. Cells are turned into text by ``cell`` (``format_cell`` by default: 4 significant digits
for floats, empty for None); a report with its own number style passes its formatter.

Example::

    lines = markdown_table(["model", "bits/byte"], [["dante", 0.91234], ["baseline", None]])
    # ['| model | bits/byte |', '|---|---|', '| dante | 0.9123 |', '| baseline |  |']
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


def format_cell(x: Any, digits: int = 4) -> str:
    """Floats to ``digits`` significant digits, None to an empty cell, anything else via str()."""
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return "" if x is None else str(x)


def escape_cell(text: str) -> str:
    """A cell's text that cannot break the row: ``|`` escaped, newlines as spaces."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   cell: Callable[[Any], str] = format_cell) -> list[str]:
    """The lines of a GitHub-flavoured Markdown table (header, separator, one line per row)."""
    out = ["| " + " | ".join(escape_cell(str(h)) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(escape_cell(cell(c)) for c in row) + " |" for row in rows]


__all__ = ["format_cell", "escape_cell", "markdown_table"]
