"""Tables for a terminal and for Markdown: the sweep summary and ``xp compare``."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence

CELL_CHARS = 24
"""In the fitted view a value is cut to this many characters (``...`` at the end)."""


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table, columns aligned, numbers right-aligned."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(rows) and all(_is_number(row[i]) or not row[i] for row in rows)
        for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def fit_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int,
    priority: Sequence[str],
    limits: Mapping[str, int] | None = None,
) -> tuple[list[str], list[list[str]], list[str]]:
    """The columns of a table that fit in ``width`` characters, chosen in ``priority`` order.

    The first two columns are always kept, then those named in ``priority``, then the
    rest, each where it still fits; the columns keep the order of ``header``. Values are
    cut to ``limits[column]`` characters (default :data:`CELL_CHARS`), ending in ``...``.

    Returns:
        (header, rows, the names of the columns left out, most telling first)
    """
    limit = [(limits or {}).get(name, CELL_CHARS) for name in header]
    cut = [[_cut(cell, limit[i]) for i, cell in enumerate(row)] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cut)]) for i, h in enumerate(header)]
    order = [0, 1, *[header.index(n) for n in priority if n in header[2:]]]
    order += [i for i in range(len(header)) if i not in order]
    chosen: list[int] = []
    used = -2
    for i in order:
        if len(chosen) >= 2 and used + 2 + widths[i] > width:
            continue
        chosen.append(i)
        used += 2 + widths[i]
    kept = sorted(chosen)
    left = [header[i] for i in order if i not in chosen]
    return [header[i] for i in kept], [[row[i] for i in kept] for row in cut], left


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def terminal_width() -> int:
    """``$COLUMNS``, else the terminal's width, else 80 (output to a file or a pipe)."""
    return shutil.get_terminal_size((80, 24)).columns
