"""PNG charts for sensitivity reports and search results (matplotlib, headless).

Each function returns PNG bytes, which the HTML report embeds as a base64 ``<img>`` and the CLI
writes to a file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # never open a window: reports are built on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def bar_chart_png(names: Sequence[str], drops: Sequence[float], sqnrs: Sequence[float], title: str) -> bytes:
    """Horizontal bars of the metric drop per layer (most sensitive on top), SQNR as labels."""
    height = max(2.5, 0.28 * len(names) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    ys = list(range(len(names)))[::-1]
    colors = ["#c0392b" if d > 0 else "#7f8c8d" for d in drops]
    ax.barh(ys, drops, color=colors)
    ax.set_yticks(ys, labels=list(names), fontsize=8)
    for y, d, s in zip(ys, drops, sqnrs, strict=True):
        label = "inf" if math.isinf(s) else f"{s:.0f} dB"
        ax.annotate(label, (d, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("metric drop when only this layer is quantized (points)")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def frontier_png(
    points: Sequence[tuple[str, float, float]],
    highlight: dict[str, str],
    metric: str,
    title: str,
) -> bytes:
    """Scatter of (size % of float, metric) points, the Pareto frontier as a step line, and the
    labelled points in ``highlight`` (label -> color) drawn on top."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    ax.scatter(xs, ys, s=14, color="#95a5a6", label="explored", zorder=2)
    front = pareto([(x, y) for x, y in zip(xs, ys, strict=True)])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#2980b9", zorder=1)
    marked = []
    for label, color in highlight.items():
        for name, x, y in points:
            if name == label:
                ax.scatter([x], [y], s=60, color=color, zorder=3, edgecolors="black")
                ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
                marked.append(y)
                break
    if marked and ys:
        # Zoom on the labelled points: a few very lossy configurations would squash them flat.
        span = max(max(ys) - min(marked), 1e-6)
        bottom = min(marked) - span
        if bottom > min(ys):
            ax.set_ylim(bottom, max(ys) + 0.05 * span)
            title += " (lower points clipped)"
    ax.set_xlabel("stored size (% of float32)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size (smaller) and metric (larger), by size.

    >>> pareto([(10, 0.9), (20, 0.95), (15, 0.8), (30, 0.94)])
    [(10, 0.9), (20, 0.95)]
    """
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out
