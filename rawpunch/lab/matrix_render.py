"""The matrix as a Markdown table and a PNG heatmap, both regenerated from ``results.jsonl``.

The Markdown table's rows are NAT pairs (``a``'s profile x ``b``'s profile), its columns strategies; a cell
shows the success rate with its count and the median time to connect of the successful punches. The
heatmap has one panel per strategy with a's NAT as rows and b's NAT as columns (a 9 x 9 grid reads better
than 81 rows), colours the success rate (red 0 % .. green 100 %) and prints the median in the cell.
matplotlib runs with the Agg backend: no display, and the picture's size depends only on the table's
shape (no tight bounding box).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawpunch.lab.matrix import TIMES, CellStats, Conditions, Table

#: Figure geometry in inches (at ``DPI``): margins for labels and titles, and a fixed size per cell.
DPI = 100
TITLE_H, LABEL_W, HEAD_H, CELL_W, CELL_H, GAP = 0.8, 1.7, 1.3, 0.95, 0.42, 0.2
PANELS_PER_ROW = 3
MIN_W = 8.0  # room for the title over a small matrix


@dataclass(frozen=True)
class Meta:
    """What the Markdown header states besides the table."""

    date: str
    kernel: str
    conditions: Conditions
    reps: int
    note: str = ""


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f} s" if value >= 10_000 else f"{value:.0f} ms"


def cell_text(stats: CellStats) -> str:
    if stats.rate is None:
        return "not run"
    text = f"{stats.rate:.0%} ({stats.successes}/{stats.punches}), {_ms(stats.median_ms)}"
    if stats.first_attempt is not None:
        text += f", 1st try {stats.first_attempt}/{stats.punches}"
    return text


def pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]} {TIMES} {pair[1]}"


def markdown(table: Table, meta: Meta) -> str:
    commits = ", ".join(f"{c} ({n} punches)" for c, n in table.commits) or "none yet"
    lines = [
        f"# NAT {TIMES} NAT {TIMES} strategy matrix",
        "",
        f"- Generated: {meta.date}",
        f"- Kernel: {meta.kernel}",
        f"- Commit: {commits}",
        f"- Conditions: {meta.conditions.describe()}",
        f"- Repetitions per cell: {meta.reps}",
    ]
    if meta.note:
        lines.append(f"- Note: {meta.note}")
    lines += [
        "",
        "Cells: success rate (successes/punches), median time to connect of the successful punches (from the "
        "moment the rendezvous matched the peers until both hold the socket), and first-attempt successes "
        f"when the peers report attempts. Rows: host a's NAT {TIMES} host b's NAT.",
        "",
        f"| NAT a {TIMES} NAT b | " + " | ".join(table.strategies) + " |",
        "|---|" + "---|" * len(table.strategies),
    ]
    for pair in table.pairs:
        cells = (cell_text(table.get(pair, s)) for s in table.strategies)
        lines.append(f"| {pair_label(pair)} | " + " | ".join(cells) + " |")
    lines.append("| **all pairs** | " + " | ".join(_overall(table, s) for s in table.strategies) + " |")
    lines += _failures(table)
    return "\n".join(lines) + "\n"


def _overall(table: Table, strategy: str) -> str:
    cells = [table.get(pair, strategy) for pair in table.pairs]
    punches, wins = sum(c.punches for c in cells), sum(c.successes for c in cells)
    return f"{wins / punches:.0%} ({wins}/{punches})" if punches else "not run"


def _failures(table: Table) -> list[str]:
    rows = []
    for pair in table.pairs:
        for strategy in table.strategies:
            for reason, count in table.get(pair, strategy).reasons[:3]:
                reason_md = reason.replace("|", "\\|")
                rows.append(f"| {pair_label(pair)} | {strategy} | {count} | {reason_md} |")
    if not rows:
        return []
    return ["", "## Failures (most frequent reasons per cell)", "", "| pair | strategy | n | reason |",
            "|---|---|---|---|", *rows]  # fmt: skip


def grid_axes(table: Table) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The profiles of a (rows) and of b (columns) that occur in the table's pairs, in order."""
    return tuple(dict.fromkeys(a for a, _ in table.pairs)), tuple(dict.fromkeys(b for _, b in table.pairs))


def _panel_inches(rows: int, columns: int) -> tuple[float, float]:
    return LABEL_W + CELL_W * max(columns, 1) + GAP, HEAD_H + CELL_H * max(rows, 1) + GAP


def figure_size(rows: int, columns: int, panels: int) -> tuple[int, int]:
    """The PNG's size in pixels: ``panels`` (one per strategy) of ``rows`` x ``columns`` cells, 3 abreast."""
    width, height = _panel_inches(rows, columns)
    across = min(max(panels, 1), PANELS_PER_ROW)
    down = -(-max(panels, 1) // PANELS_PER_ROW)
    return round(max(MIN_W, width * across) * DPI), round((TITLE_H + height * down) * DPI)


def heatmap(table: Table, meta: Meta, path: Path) -> None:
    """Write the PNG: per strategy a panel of a's NAT (rows) x b's NAT (columns); colour is the success rate
    (red 0 % .. green 100 %, blank where not run), text the rate and the median time to connect."""
    import matplotlib  # noqa: PLC0415 - heavy, and only the end of a run needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    rows, columns = grid_axes(table)
    width_px, height_px = figure_size(len(rows), len(columns), len(table.strategies))
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    try:
        panel_w, panel_h = _panel_inches(len(rows), len(columns))
        for k, strategy in enumerate(table.strategies):
            x0 = (k % PANELS_PER_ROW) * panel_w + LABEL_W
            y0 = TITLE_H + (k // PANELS_PER_ROW) * panel_h + HEAD_H  # from the top, in inches
            box = (x0 * DPI / width_px, 1 - (y0 + CELL_H * len(rows)) * DPI / height_px,
                   CELL_W * len(columns) * DPI / width_px, CELL_H * len(rows) * DPI / height_px)  # fmt: skip
            _panel(fig.add_axes(box), table, strategy, rows, columns, matplotlib.colormaps["RdYlGn"])
        fig.suptitle(
            f"Success rate and median time to connect, {_count(meta.reps, 'punch')} per cell "
            f"(rows: host a's NAT, columns: host b's NAT)\n{meta.conditions.describe()}\n"
            f"kernel {meta.kernel}, {meta.date}",
            fontsize=9,
            y=1 - 0.1 * DPI / height_px,
            va="top",
        )
        fig.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(fig)


def _panel(
    ax: Any, table: Table, strategy: str, rows: tuple[str, ...], columns: tuple[str, ...], cmap: Any
) -> None:
    stats = [[table.cells.get(((a, b), strategy)) for b in columns] for a in rows]
    ax.imshow([[_rate(c) for c in row] for row in stats], cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
              interpolation="nearest")  # fmt: skip
    for i, row in enumerate(stats):
        for j, cell in enumerate(row):
            if cell is None or cell.rate is None:
                continue
            label = f"{cell.rate:.0%}" + (f"\n{_ms(cell.median_ms)}" if cell.median_ms is not None else "")
            ax.text(j, i, label, ha="center", va="center", fontsize=7, color=_ink(cmap(cell.rate)))
    ax.set_title(strategy, fontsize=10, pad=6)  # placed above the tick labels
    ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=45, ha="left", rotation_mode="anchor")
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), rows, fontsize=7)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es"


def _ink(rgba: tuple[float, float, float, float]) -> str:
    """Black text on light cells, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b, _ = rgba
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _rate(stats: CellStats | None) -> float:
    # A cell never run is drawn as NaN (blank), not as 0 %: no data is not a failure.
    return float("nan") if stats is None or stats.rate is None else stats.rate
