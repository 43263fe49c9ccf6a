"""The ``Observer`` base class: accumulate calibration statistics, merge them, turn them into qparams.

Every observer keeps a fixed-size summary of what it has seen (running ranges or a histogram), so
memory does not grow with the number of calibration batches. Two observers of the same kind and
settings can be merged, which lets calibration run in shards (several processes, several devices)
and be combined afterwards.

>>> import torch, lowbit.formats as F
>>> from lowbit.observers import MinMaxObserver
>>> obs = MinMaxObserver()
>>> obs.observe(torch.tensor([-1.0, 2.0]))
>>> obs.count, round(float(obs.qparams(F.get("int8")).scale) * 127, 6)
(2, 2.0)
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from lowbit import formats
from lowbit.codecs import codec_for
from lowbit.formats import Format
from lowbit.primitives import QParams, check_finite, qparams_from_range


class Observer:
    """Base class of calibration observers.

    Subclasses accumulate a constant-size summary in ``_observe`` (always given a float32 tensor),
    report a value range for a format in ``_range``, and combine two summaries in ``_absorb``.

    - ``observe(x)``: add one calibration batch (empty tensors are ignored; NaN / Inf raise).
    - ``merge(other)``: a new observer equal to one fed both streams (same kind and settings only).
    - ``qparams(fmt, symmetric)``: quantization parameters for an integer or grid format.
    - ``count``: how many values have been observed.

    >>> import torch
    >>> from lowbit.observers import MinMaxObserver
    >>> a, b = MinMaxObserver(), MinMaxObserver()
    >>> a.observe(torch.tensor([1.0])); b.observe(torch.tensor([-3.0]))
    >>> merged = a.merge(b)
    >>> merged.count, float(merged.min_val), float(merged.max_val)
    (2, -3.0, 1.0)
    """

    name: ClassVar[str] = "observer"

    def __init__(self) -> None:
        self.count = 0
        # Block shape the reported QParams apply to: set from the first observed tensor.
        self.block: tuple[int, ...] | None = None

    # --- public interface -------------------------------------------------------------------------

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate statistics of one calibration batch (any float dtype, any device)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name} observer expects a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            return
        check_finite(x, f"calibration batch given to the {self.name} observer")
        with torch.no_grad():
            # Accumulate in float32 whatever the input precision: fp16 / bf16 convert exactly.
            self._observe(x.detach().float())
        self.count += x.numel()

    def merge(self, other: Observer) -> Observer:
        """A new observer equal to one that was fed everything ``self`` and ``other`` saw."""
        if type(other) is not type(self):
            raise ValueError(
                f"cannot merge a {getattr(other, 'name', type(other).__name__)} observer into a "
                f"{self.name} observer; merge observers of the same kind"
            )
        if other.config() != self.config():
            raise ValueError(
                f"cannot merge {self.name} observers with different settings: "
                f"{self.config()} vs {other.config()}; create both with the same arguments"
            )
        if other.count == 0:
            return copy.deepcopy(self)
        if self.count == 0:
            return copy.deepcopy(other)
        merged = copy.deepcopy(self)
        merged._absorb(other)
        merged.count += other.count
        return merged

    def qparams(self, fmt: Format | str, symmetric: bool = True) -> QParams:
        """Quantization parameters for ``fmt`` from everything observed so far."""
        fmt = formats.get(fmt) if isinstance(fmt, str) else fmt
        if self.count == 0 or self.block is None:
            raise ValueError("observer saw no data; pass at least one calibration batch")
        if not codec_for(fmt).takes_range or fmt.scale_rule != "absmax":
            raise ValueError(
                f"observers calibrate integer and absmax-scaled grid formats (int8, uint8, fp8_e4m3, ...); "
                f"{fmt.name} takes its parameters from the data itself, use lowbit.primitives.choose_qparams"
            )
        lo, hi = self._range(fmt, symmetric)
        return qparams_from_range(lo, hi, fmt, self.block, symmetric)

    def config(self) -> dict[str, Any]:
        """The constructor settings; observers merge only when these are equal."""
        return {}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({settings})"

    # --- for subclasses ---------------------------------------------------------------------------

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _absorb(self, other: Observer) -> None:
        raise NotImplementedError
