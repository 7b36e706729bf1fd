"""The report's figure, drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend switch):
latency vs fidelity per model with the Pareto front marked, artifact size, and seconds per pass."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from optpipe.sweep.errors import INSTALL_HINT, MissingExtraError

MB = 1e6


@dataclass(frozen=True)
class Point:
    """One timed, validated artifact on its model's latency/fidelity plane."""

    job: str
    label: str  # target and grid point: what tells the points of one model apart
    latency_ms: float
    fidelity: float
    on_front: bool


def pareto_front(pairs: list[tuple[float, float]]) -> set[int]:
    """Indices of the (latency, fidelity) pairs no other pair beats: lower or equal latency with higher fidelity,
    or lower latency with equal fidelity."""
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], -pairs[i][1]))
    front, best = set(), -math.inf
    for i in order:
        if pairs[i][1] > best:
            front.add(i)
            best = pairs[i][1]
    return front


def _require_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(f"optpipe report draws with matplotlib, which is not installed: "
                                f"{INSTALL_HINT}") from None
    return Figure


def _pareto_panel(ax, model: str, metric: str, points: list[Point], note: str) -> None:
    front = sorted((p for p in points if p.on_front), key=lambda p: p.latency_ms)
    if len(front) > 1:
        ax.plot([p.latency_ms for p in front], [p.fidelity for p in front], "-", color="#d62728", lw=1.2,
                alpha=0.7, zorder=1)
    for i, p in enumerate(sorted(points, key=lambda p: p.latency_ms)):
        style = ({"marker": "D", "color": "#d62728", "markersize": 8} if p.on_front
                 else {"marker": "o", "color": "#7f7f7f", "markersize": 6})
        ax.plot([p.latency_ms], [p.fidelity], linestyle="none", zorder=2, gid=f"point-{p.job}", **style)
        # labels alternate above and below, so neighbours with equal fidelity do not print over each other
        ax.annotate(p.label, (p.latency_ms, p.fidelity), textcoords="offset points",
                    xytext=(5, 5 if i % 2 == 0 else -11), fontsize=7)
    ax.set_title(model + (f"\n{note}" if note else ""), fontsize=9)
    ax.set_xlabel("p50 latency (ms)", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    ax.ticklabel_format(useOffset=False, style="plain")  # 0.99997, not 1e-5 + 9.9999e-1
    ax.plot([], [], "D", color="#d62728", label="on the Pareto front")
    ax.plot([], [], "o", color="#7f7f7f", label="dominated")
    ax.legend(fontsize=6, loc="best")


def _size_panel(ax, rows: list[dict[str, Any]]) -> None:
    names = [r["job"] for r in rows]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r.get("size", {}).get("source_bytes", 0) / MB for r in rows], height=0.4,
            color="#c7c7c7", label="PyTorch weights")
    ax.barh([y - 0.2 for y in ys], [r.get("size", {}).get("onnx_bytes", 0) / MB for r in rows], height=0.4,
            color="#1f77b4", label="ONNX artifact")
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MB", fontsize=8)
    ax.set_title("size", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)


def _passes_panel(ax, rows: list[dict[str, Any]]) -> None:
    pass_names = list(dict.fromkeys(s["name"] for r in rows for s in r.get("passes", [])))
    colors = {name: f"C{i % 10}" for i, name in enumerate(pass_names)}
    left = [0.0] * len(rows)
    for name in pass_names:
        widths = [sum(s.get("seconds") or 0 for s in r.get("passes", []) if s["name"] == name) for r in rows]
        ax.barh(range(len(rows)), widths, left=left, color=colors[name], label=name, height=0.6)
        left = [a + b for a, b in zip(left, widths)]
    ax.tick_params(axis="y", labelleft=False)  # the size panel beside it names the jobs
    ax.set_xlabel("seconds (a cached pass: those of its first run)", fontsize=8)
    ax.set_title("seconds per pass", fontsize=9)
    ax.tick_params(labelsize=7)
    if pass_names:
        ax.legend(fontsize=6)


def draw(panels: list[tuple[str, str, list[Point], str]], rows: list[dict[str, Any]]):
    """panels: (model, fidelity metric, points, note) per model; rows: ok records for size and pass seconds."""
    Figure = _require_matplotlib()
    cols = max(1, min(3, len(panels)))
    pareto_rows = math.ceil(len(panels) / cols) if panels else 0
    bars_height = max(2.5, 0.32 * len(rows) + 1.2)
    fig = Figure(figsize=(5.2 * max(cols, 2), 3.6 * pareto_rows + bars_height), layout="constrained")
    grid = fig.add_gridspec(pareto_rows + 1, cols * 2, height_ratios=[3.6] * pareto_rows + [bars_height])
    for i, (model, metric, points, note) in enumerate(panels):
        r, c = divmod(i, cols)
        _pareto_panel(fig.add_subplot(grid[r, 2 * c: 2 * c + 2]), model, metric, points, note)
    if rows:
        size_ax = fig.add_subplot(grid[pareto_rows, :cols])
        _size_panel(size_ax, rows)
        _passes_panel(fig.add_subplot(grid[pareto_rows, cols:], sharey=size_ax), rows)
    else:
        ax = fig.add_subplot(grid[pareto_rows, :])
        ax.axis("off")
        ax.text(0.5, 0.5, "no successful job to draw", ha="center", va="center")
    return fig


def to_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def to_svg(fig) -> str:
    """Inline SVG (text kept as text, so the page is searchable and small), without the XML prolog."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    FigureCanvasSVG(fig)
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "optpipe"}):
        fig.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]
