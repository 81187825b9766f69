"""HTML building blocks of the report page: escaping, number formatting, tables."""

from __future__ import annotations

import math
from pathlib import Path

from markupsafe import escape


def esc(value) -> str:
    """Escaped for HTML text and attributes, as the templates escape (templates.py): one rule."""
    return str(escape("" if value is None else str(value)))


def finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def fmt(v, digits: int = 3) -> str:
    return "–" if not finite(v) else f"{v:.{digits}f}"


def short_path(path: str, base: Path | None = None, keep: int = 3) -> str:
    """A path relative to ``base`` when under it, else its last ``keep`` parts after an ellipsis."""
    if base is not None:
        try:
            return str(Path(path).resolve().relative_to(base.resolve()))
        except (ValueError, OSError):
            pass
    parts = Path(path).parts
    return path if len(parts) <= keep + 1 else "…/" + "/".join(parts[-keep:])


def table(head: list[str] | None, rows: list[list[tuple[str, str]]], cls: str = "") -> str:
    """``rows``: cells as (html, css class) pairs; html is already escaped. ``head`` None: a
    key-value table whose first cell of each row is its header."""

    def td(v: str, c: str) -> str:
        return f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>"

    out = [f'<table class="{cls}">' if cls else "<table>"]
    if head is not None:
        out.append("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = row if head is not None else row[1:]
        first = "" if head is not None else f"<th>{row[0][0]}</th>"
        out.append("<tr>" + first + "".join(td(v, c) for v, c in cells) + "</tr>")
    out.append("</table>")
    return "".join(out)
