"""Write result tables as Markdown, CSV and HTML.

The CSV holds one row per cell with numeric mean, std, n and best, for further
analysis; Markdown and HTML hold the printed table with the best cells marked.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from granularity.report.tables import ResultTable

MISSING_CELL = "—"


def format_cell(mean: float, std: float, n: int, decimals: int) -> str:
    """Return ``mean ± std (n=k)``; the deviation of a single run is undefined and printed as a dash."""
    if n == 0 or mean is None or math.isnan(mean):
        return MISSING_CELL
    spread = MISSING_CELL if std is None or math.isnan(std) else f"{std:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {spread} (n={n})"


def _key_text(values) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return " ".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values)


def wide_table(table: ResultTable, marker: tuple[str, str]) -> pd.DataFrame:
    """Pivot the cells into the printed layout; rows and columns keep the order of first appearance.

    ``marker`` is the (opening, closing) text put around the best cells.
    """
    cells = table.cells
    row_index = list(dict.fromkeys(cells[table.row_keys].itertuples(index=False, name=None)))
    column_index = list(dict.fromkeys(cells[table.column_keys].itertuples(index=False, name=None)))
    grid = {column: {row: MISSING_CELL for row in row_index} for column in column_index}

    for record in cells.to_dict("records"):
        row = tuple(record[key] for key in table.row_keys)
        column = tuple(record[key] for key in table.column_keys)
        if table.show_spread:
            text = format_cell(record["mean"], record["std"], int(record["n"]), table.decimals)
        else:
            text = MISSING_CELL if pd.isna(record["mean"]) else f"{record['mean']:.{table.decimals}f}"
        if table.mark_best and record.get("best") and text != MISSING_CELL:
            text = f"{marker[0]}{text}{marker[1]}"
        grid[column][row] = text

    frame = pd.DataFrame({_key_text(column): [grid[column][row] for row in row_index] for column in column_index})
    for position, key in enumerate(table.row_keys):
        frame.insert(position, key.replace("_", " "), [_key_text(row[position]) for row in row_index])
    return frame


def to_markdown(frame: pd.DataFrame) -> str:
    """Render a frame of strings as a GitHub Markdown table (no third-party renderer needed)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


BEST_OPEN, BEST_CLOSE = "\x00", "\x01"


def render_markdown(title: str, frame: pd.DataFrame | None, note: str = "") -> str:
    """Render a titled table of strings as Markdown; text between the best-cell markers turns bold."""
    if frame is None or frame.empty:
        body = "No compared runs for this table."
    else:
        body = to_markdown(frame).replace(BEST_OPEN, "**").replace(BEST_CLOSE, "**")
    note = f"\n\n{note}" if note else ""
    return f"### {title}\n\n{body}{note}\n"


def render_html(title: str, frame: pd.DataFrame | None, note: str = "") -> str:
    """Render a titled table of strings as a standalone HTML page; best cells turn bold."""
    if frame is None or frame.empty:
        body = "<p>No compared runs for this table.</p>"
    else:
        # Cell texts are escaped first, so the best-cell markers can become markup afterwards.
        escaped = frame.map(lambda value: html.escape(str(value)))
        body = escaped.to_html(index=False, escape=False).replace(BEST_OPEN, "<strong>").replace(BEST_CLOSE, "</strong>")
    note = f"<p>{html.escape(note)}</p>" if note else ""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px;text-align:right}</style>"
        f"</head><body><h3>{html.escape(title)}</h3>{body}{note}</body></html>\n"
    )


def write_frames(name: str, title: str, printed: pd.DataFrame | None, data: pd.DataFrame, note: str, out_dir: Path) -> list[Path]:
    """Write ``<name>.md`` and ``<name>.html`` from the printed frame and ``<name>.csv`` from ``data``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.{suffix}" for suffix in ("md", "csv", "html")]
    paths[0].write_text(render_markdown(title, printed, note), encoding="utf-8")
    data.to_csv(paths[1], index=False)
    paths[2].write_text(render_html(title, printed, note), encoding="utf-8")
    return paths


def write_table(table: ResultTable, out_dir: Path) -> list[Path]:
    """Write a result table as ``<name>.md``, ``<name>.csv`` and ``<name>.html`` into ``out_dir``."""
    printed = None if table.cells.empty else wide_table(table, (BEST_OPEN, BEST_CLOSE))
    note = table.note + (" Best cells are in bold." if table.mark_best else "")
    return write_frames(table.name, table.title, printed, table.cells, note.strip(), out_dir)
