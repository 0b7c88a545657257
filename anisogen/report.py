"""Plain-text and Markdown tables for reports printed by the pipelines."""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def format_cell(value: Any, digits: int = 4, *, adaptive: bool = False) -> str:
    """One table cell: ``—`` for None, ints and bools as is, floats with ``digits`` decimals.

    ``adaptive=True`` switches to scientific notation for tiny non-zero values (|v| < 0.01) and to
    ``digits`` significant digits for large ones (|v| >= 1000), so that no value prints as ``0.0000``.
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number:  # NaN
        return "nan"
    if adaptive and number != 0 and abs(number) < 0.01:
        return f"{number:.2e}"
    if adaptive and abs(number) >= 1000:
        return f"{number:.{digits}g}"
    return f"{number:.{digits}f}"


def markdown_table(rows: Iterable[dict], columns: Sequence[str], *, first: str = "name", digits: int = 4,
                   headers: dict[str, str] | None = None) -> str:
    """A Markdown table: one row per dict, the ``first`` key then ``columns``; floats with ``digits``."""
    headers = headers or {}
    names = [first, *columns]
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in names) + " |",
        "|" + "|".join("---" for _ in names) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c), digits) for c in names) + " |")
    return "\n".join(lines)
