"""Calibration statistics of layer inputs, gathered by module hooks while a stage runs.

``InputStats`` accumulates, over every row of a layer's input, what the modifiers need: ``X^T X``
(GPTQ's Hessian, AWQ's output-error metric), the per-column mean of ``|x|`` (AWQ), the maximum
``|x|`` (SmoothQuant) and the mean ``x`` (bias correction). Sums run in float64 in calibration
batch order, so the result does not depend on thread count or on how many batches there are.

``StageObserver`` puts hooks on the layers of one stage. Layers that read the *very same input
tensor object* in one call of the stage (attention's q / k / v projections, an MLP's gate and up
projections) form one group with one set of statistics. The input objects are held, and
compared with ``is``, only while that call is alive: tensor addresses (``data_ptr``) are never
used, because the allocator hands a freed block to the next tensor of the same size.

>>> import torch
>>> st = InputStats(2, hessian=True, where="layer demo")
>>> st.update(torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
>>> st.count, st.gram().tolist(), st.mean().tolist()
(2, [[5.0, -5.0], [-5.0, 10.0]], [2.0, -1.0])
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.ptq.matrices import input_rows
from lowbit.ptq.plan import LayerPlan


class InputStats:
    """Streaming statistics of the rows ``[n, cols]`` that multiply one weight matrix."""

    def __init__(
        self,
        cols: int,
        hessian: bool,
        where: str,
        device: torch.device | None = None,
        moments: bool = True,
    ) -> None:
        self.cols, self.where = cols, where
        self.xtx = torch.zeros(cols, cols, dtype=torch.float64, device=device) if hessian else None
        # Per-column moments: AWQ, SmoothQuant and bias correction read them, GPTQ alone does not
        # (at 2048 inputs they cost as much time as X^T X itself).
        self.abs_sum = torch.zeros(cols, dtype=torch.float64, device=device) if moments else None
        self.sum = torch.zeros(cols, dtype=torch.float64, device=device) if moments else None
        self.abs_max = torch.zeros(cols, dtype=torch.float32, device=device) if moments else None
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        """Add rows ``[n, cols]``; NaN or Inf is an error naming the layer."""
        rows = rows.detach().reshape(-1, self.cols).float()
        # NaN / Inf in a column reaches that column's sum of squares (X^T X's diagonal) and its
        # sum of |x|, so checking those (cols values) replaces a pass over every row.
        product = rows.T @ rows if self.xtx is not None else None
        abs_sum = rows.abs().sum(0, dtype=torch.float64) if self.abs_sum is not None else None
        probe = product.diagonal() if product is not None else abs_sum
        if probe is None or not bool(torch.isfinite(probe).all()):
            self._not_finite(rows)
        if product is not None:
            # One float32 product per batch (its reduction order does not depend on threads),
            # summed over batches in float64 (add_ promotes without a float64 copy).
            self.xtx.add_(product)  # type: ignore[union-attr]
        if abs_sum is not None:
            self.abs_sum.add_(abs_sum)  # type: ignore[union-attr]
            self.sum.add_(rows.sum(0, dtype=torch.float64))  # type: ignore[union-attr]
            self.abs_max = torch.maximum(self.abs_max, rows.abs().amax(0))  # type: ignore[arg-type]
        self.count += rows.shape[0]

    def _not_finite(self, rows: torch.Tensor) -> None:
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(
                f"{self.where} received NaN or Inf inputs on the calibration data; the float model "
                "already overflows there: check the model and the calibration batches"
            )
        if self.xtx is not None or self.abs_sum is not None:
            raise ValueError(
                f"{self.where} received inputs up to |x| = {float(rows.abs().max()):.3g}, whose "
                "squares overflow float32 statistics: check the model and the calibration batches"
            )

    def gram(self) -> torch.Tensor:
        """``X^T X / n`` (float64); GPTQ's Hessian is twice this."""
        if self.xtx is None:
            raise RuntimeError(f"{self.where}: X^T X was not collected")
        return self.xtx / max(self.count, 1)

    def _moment(self, total: torch.Tensor | None) -> torch.Tensor:
        if total is None:
            raise RuntimeError(f"{self.where}: per-column moments were not collected")
        return (total / max(self.count, 1)).float()

    def mean(self) -> torch.Tensor:
        return self._moment(self.sum)

    def abs_mean(self) -> torch.Tensor:
        return self._moment(self.abs_sum)

    @property
    def nbytes(self) -> int:
        tensors = [self.abs_sum, self.sum, self.abs_max, self.xtx]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Group:
    """Layers of one stage that read the same input, and the statistics of that input by source."""

    layers: list[LayerPlan]
    sequence: tuple[str, ...]
    stats: dict[str, InputStats] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


class StageObserver:
    """Hooks that group ``layers`` by shared input and accumulate their statistics.

    ``sequences`` gives each layer's modifier sequence: only linear layers with the same sequence
    share a group (one SmoothQuant / AWQ divisor, one Hessian). Call ``end_call()`` after every
    call of the stage so that input objects are compared within one call only.
    """

    def __init__(self, layers: list[LayerPlan], sequences: dict[str, tuple[str, ...]]) -> None:
        self.layers = layers
        self.sequences = sequences
        self.groups: list[Group] = []
        self._group_of: dict[str, Group] = {}
        self._leader: dict[str, bool] = {}
        self._seen: list[tuple[torch.Tensor, Group]] = []  # this call's inputs: identity, not address
        self.calls = 0
        self.seconds = 0.0  # spent accumulating statistics (the rest of a pass is the stage itself)

    def _needs_hessian(self, layer: LayerPlan) -> bool:
        return any(step in ("gptq", "awq") for step in self.sequences[layer.name])

    def _needs_moments(self, layer: LayerPlan) -> bool:
        return any(step in ("awq", "smoothquant", "bias_correction") for step in self.sequences[layer.name])

    def _hook(self, layer: LayerPlan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        sequence = self.sequences[layer.name]
        shared = None
        if layer.kind == "linear" and isinstance(x, torch.Tensor):
            shared = next((g for t, g in self._seen if t is x and g.sequence == sequence), None)
        known = self._group_of.get(layer.name)
        if known is None:
            if shared is not None:
                shared.layers.append(layer)
                self._group_of[layer.name], self._leader[layer.name] = shared, False
                return
            known = Group([layer], sequence)
            self.groups.append(known)
            self._group_of[layer.name], self._leader[layer.name] = known, True
        elif shared is not None and shared is not known:
            raise ValueError(
                f"layer {layer.name} shares its input with {shared.names[0]} in one calibration "
                f"batch but with {known.names[0]} in another; data-aware algorithms need a fixed "
                "data flow: exclude one of them or give it algorithm rtn"
            )
        if shared is known and not self._leader[layer.name]:
            return  # the group's statistics came from the first layer that read this input
        if not self._leader[layer.name]:
            raise ValueError(
                f"layer {layer.name} reads the input of {known.names[0]} in one call and another "
                "input in the next; exclude it or give it algorithm rtn"
            )
        if layer.kind == "linear" and isinstance(x, torch.Tensor):
            self._seen.append((x, known))
        started = time.perf_counter()
        for source, rows in input_rows(layer, args, kwargs).items():
            stats = known.stats.get(source)
            if stats is None:
                where = f"layer {layer.name}" + (f" ({source})" if source != "x" else "")
                hessian, moments = self._needs_hessian(layer), self._needs_moments(layer)
                stats = InputStats(rows.shape[-1], hessian, where, rows.device, moments)
                known.stats[source] = stats
            stats.update(rows)
        self.seconds += time.perf_counter() - started

    def end_call(self) -> None:
        """Forget this call's input objects (the next call's tensors are new ones)."""
        self._seen.clear()
        self.calls += 1

    @contextmanager
    def hooks(self) -> Iterator[StageObserver]:
        """Register the hooks for the ``with`` block."""
        handles = [
            layer.module.register_forward_pre_hook(
                lambda _m, args, kwargs, layer=layer: self._hook(layer, args, kwargs), with_kwargs=True
            )
            for layer in self.layers
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._seen.clear()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for g in self.groups for s in g.stats.values())
