"""The report's charts as PNG bytes (matplotlib, Agg backend: no display needed).

* ``pareto_png``: task metric against stored size, every technique a point, the Pareto frontier
  (no other technique is both smaller and better) drawn as a line.
* ``layer_error_png``: isolated SQNR of every quantized layer, one bar group per layer and one bar
  per technique, so the layer that loses the most stands out.

>>> rows = [{"name": "float", "metric": "accuracy", "after": 0.97,
...          "size": {"disk_bytes": 1000, "bits_per_param": 32.0}, "layers": []},
...         {"name": "int8", "metric": "accuracy", "after": 0.96,
...          "size": {"disk_bytes": 300, "bits_per_param": 8.0}, "layers": []}]
>>> pareto_png(rows)[:4]
b'\\x89PNG'
>>> pareto_front(rows)
['int8', 'float']
"""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402

from lowbit.report.table import METRIC_LABELS  # noqa: E402


def _score(row: dict[str, Any]) -> float | None:
    """The metric as "higher is better" (perplexity is negated) for the frontier."""
    after = row.get("after")
    if after is None:
        return None
    return -after if row.get("metric") == "perplexity" else after


def pareto_front(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the techniques no other technique beats on both size and metric, smallest first."""
    points = [(r["size"]["disk_bytes"], _score(r), r["name"]) for r in rows if _score(r) is not None]
    front, best = [], float("-inf")
    for _size, score, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append(name)
            best = score
    return front


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pareto_png(rows: list[dict[str, Any]], title: str = "") -> bytes:
    """Metric after quantization vs bytes on disk (log scale), frontier highlighted."""
    pts = [r for r in rows if r.get("after") is not None]
    metric = next((r["metric"] for r in pts), None)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if not pts:
        ax.text(0.5, 0.5, "no task metric for this model", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    front = set(pareto_front(pts))
    scale = 100.0 if metric == "accuracy" else 1.0
    # Techniques often tie (same size and metric): one point, one combined label, tilted so that
    # neighbouring labels on the same accuracy level do not run into each other.
    groups: dict[tuple[float, float], list[str]] = {}
    for r in pts:
        x, y = r["size"]["disk_bytes"] / 1024, r["after"] * scale
        key = (round(math.log10(x), 2), round(y, 2))
        groups.setdefault(key, []).append(r["name"])
        on_front = r["name"] in front
        ax.scatter([x], [y], s=46 if on_front else 30, color="#1f77b4" if on_front else "#999999", zorder=3)
    for (logx, y), names in groups.items():
        ax.annotate(
            ", ".join(names),
            (10**logx, y),
            textcoords="offset points",
            xytext=(3, 4),
            fontsize=7,
            rotation=30,
        )
    line = sorted((r["size"]["disk_bytes"] / 1024, r["after"] * scale) for r in pts if r["name"] in front)
    ax.plot(
        [p[0] for p in line], [p[1] for p in line], color="#1f77b4", lw=1.2, zorder=2, label="Pareto front"
    )
    ys = [r["after"] * scale for r in pts]
    span = (max(ys) - min(ys)) or 1.0
    ax.set_ylim(min(ys) - 0.06 * span, max(ys) + 0.3 * span)  # headroom for the tilted labels
    xs = [r["size"]["disk_bytes"] / 1024 for r in pts]
    ax.set_xlim(min(xs) / 1.3, max(xs) * 2.2)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (KiB, log scale)")
    label = METRIC_LABELS.get(metric or "", "metric")
    ax.set_ylabel(f"{label} (%)" if metric == "accuracy" else label)
    ax.set_title(title or f"{label} vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def layer_error_png(rows: list[dict[str, Any]], max_techniques: int = 12) -> bytes:
    """Grouped horizontal bars: isolated SQNR (dB) per layer and technique; higher is better."""
    techniques = [r for r in rows if r.get("layers")][:max_techniques]
    layers: list[str] = []
    for r in techniques:
        for layer in r["layers"]:
            if layer["name"] not in layers:
                layers.append(layer["name"])
    fig_height = max(2.5, 0.18 * len(layers) * max(len(techniques), 1) ** 0.5 + 1.5)
    fig, ax = plt.subplots(figsize=(7.5, min(fig_height, 40)))
    if not techniques:
        ax.text(0.5, 0.5, "no quantized layers", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    height = 0.8 / len(techniques)
    cmap = plt.get_cmap("tab20")
    index = {name: i for i, name in enumerate(layers)}
    for t, r in enumerate(techniques):
        ys, xs = [], []
        for layer in r["layers"]:
            sqnr = layer["sqnr_db"]
            ys.append(index[layer["name"]] + (t - (len(techniques) - 1) / 2) * height)
            xs.append(100.0 if sqnr is None else sqnr)  # lossless layers drawn at the axis end
        ax.barh(ys, xs, height=height, color=cmap(t % 20), label=r["name"])
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=7 if len(layers) > 20 else 8)
    ax.invert_yaxis()
    ax.set_xlabel("isolated SQNR of the layer output (dB, higher is better)")
    ax.set_title("per-layer error")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)
