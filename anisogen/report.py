"""Plain-text and Markdown tables for reports printed by the pipelines."""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def _cell(value: Any, digits: int) -> str:
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
        lines.append("| " + " | ".join(_cell(row.get(c), digits) for c in names) + " |")
    return "\n".join(lines)
