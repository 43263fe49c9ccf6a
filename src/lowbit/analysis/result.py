"""``SearchResult``: the searched recipe, the frontier it explored, and why each layer got its format."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lowbit.analysis.common import human_bytes
from lowbit.analysis.plots import frontier_png, pareto
from lowbit.recipes.spec import Recipe


@dataclass
class FrontierPoint:
    """One evaluated configuration: its size and its metric on the search split."""

    label: str  # "float", "int8 (uniform)", "int4 (uniform)", "step 12", "searched"
    stored_bytes: int
    size_percent: float  # of the float model's stored bytes
    value: float
    drop: float


@dataclass
class LayerChoice:
    """The format chosen for one layer and the reason, in words."""

    name: str
    kind: str
    parameters: int
    format: str
    stored_bytes: int
    drop_alone: float  # metric loss (``Score.risk``) with only this layer at ``format``, search split
    reason: str


@dataclass
class SearchResult:
    """What ``lowbit.analysis.search`` found.

    ``recipe`` (per-layer overrides; ``recipe.save("searched.yaml")``) reproduces ``model`` with
    ``lowbit.quantize(float_model, recipe)``. ``value`` / ``drop`` are on the search split,
    ``holdout_value`` / ``holdout_drop`` on held-out data the search never chose by (unless
    ``holdout_backoff`` says it had to back off, see ``notes``).
    """

    recipe: Recipe
    model: nn.Module
    metric: str
    constraint: str
    met: bool
    float_value: float
    value: float
    drop: float
    holdout_float_value: float
    holdout_value: float
    holdout_drop: float
    stored_bytes: int
    float_bytes: int
    parameters: int
    layers: list[LayerChoice] = field(default_factory=list)
    frontier: list[FrontierPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    holdout_backoff: bool = False
    budget_exhausted: bool = False
    seconds: float = 0.0
    evaluations: int = 0

    @property
    def size_percent(self) -> float:
        return 100.0 * self.stored_bytes / max(self.float_bytes, 1)

    @property
    def bits_per_param(self) -> float:
        return self.stored_bytes * 8 / max(self.parameters, 1)

    def explanations(self) -> list[str]:
        """One sentence per layer ("layer X kept at int8: int4 cost 0.80 points ...")."""
        return [c.reason for c in self.layers]

    def point(self, label: str) -> FrontierPoint | None:
        """The frontier point called ``label`` (``"int8 (uniform)"``, ``"searched"``, ...)."""
        return next((p for p in self.frontier if p.label == label), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the model itself is left out; the recipe is a plain dict)."""
        return {
            "metric": self.metric,
            "constraint": self.constraint,
            "met": self.met,
            "float_value": self.float_value,
            "value": self.value,
            "drop": self.drop,
            "holdout_float_value": self.holdout_float_value,
            "holdout_value": self.holdout_value,
            "holdout_drop": self.holdout_drop,
            "holdout_backoff": self.holdout_backoff,
            "stored_bytes": self.stored_bytes,
            "float_bytes": self.float_bytes,
            "size_percent": self.size_percent,
            "bits_per_param": self.bits_per_param,
            "budget_exhausted": self.budget_exhausted,
            "seconds": self.seconds,
            "evaluations": self.evaluations,
            "recipe": self.recipe.to_dict(),
            "layers": [asdict(c) for c in self.layers],
            "frontier": [asdict(p) for p in self.frontier],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        """Summary, the frontier's key points, one row per layer with its reason, and notes."""
        status = "met" if self.met else "NOT met"
        lines = [
            f"Search for `{self.metric}` under {self.constraint}: {status}. "
            f"{self.evaluations} model evaluations in {self.seconds:.1f} s"
            + (" (time budget reached)." if self.budget_exhausted else "."),
            "",
            "| model | size | % of float | bits/param | metric (search split) | drop |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label in ("float", "int8 (uniform)", "int4 (uniform)", "searched"):
            p = self.point(label)
            if p is not None:
                lines.append(
                    f"| {label} | {human_bytes(p.stored_bytes)} | {p.size_percent:.1f}% "
                    f"| {p.stored_bytes * 8 / max(self.parameters, 1):.2f} | {p.value:.4f} | {p.drop:+.2f} |"
                )
        lines += [
            "",
            f"Held-out check: float {self.holdout_float_value:.4f}, searched {self.holdout_value:.4f}, "
            f"drop {self.holdout_drop:+.2f} points"
            + (
                " (the search backed off after a held-out failure; see notes)."
                if self.holdout_backoff
                else "."
            ),
            "",
            "| layer | kind | params | format | size | cost alone | why |",
            "|---|---|---:|---|---:|---:|---|",
        ]
        for c in self.layers:
            lines.append(
                f"| {c.name} | {c.kind} | {c.parameters:,} | {c.format} | {human_bytes(c.stored_bytes)} "
                f"| {c.drop_alone:+.2f} | {c.reason} |"
            )
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)

    def frontier_markdown(self) -> str:
        """Every explored point, smallest first, Pareto-optimal ones marked."""
        front = set(pareto([(p.size_percent, p.value) for p in self.frontier]))
        lines = ["| point | size | % of float | metric | drop | Pareto |", "|---|---:|---:|---:|---:|:-:|"]
        for p in sorted(self.frontier, key=lambda q: q.stored_bytes):
            mark = "yes" if (p.size_percent, p.value) in front else ""
            lines.append(
                f"| {p.label} | {human_bytes(p.stored_bytes)} | {p.size_percent:.1f}% | {p.value:.4f} "
                f"| {p.drop:+.2f} | {mark} |"
            )
        return "\n".join(lines)

    def plot_png(self) -> bytes:
        """The explored size / metric points with the Pareto frontier and the key points (PNG)."""
        points = [(p.label, p.size_percent, p.value) for p in self.frontier if math.isfinite(p.value)]
        highlight = {
            "float": "#2c3e50",
            "int8 (uniform)": "#27ae60",
            "int4 (uniform)": "#f39c12",
            "searched": "#c0392b",
        }
        return frontier_png(points, highlight, self.metric, f"search: {self.constraint}")
