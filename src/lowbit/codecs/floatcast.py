"""Float casts ``fp16`` / ``bf16``: the code is the value itself in ``fmt.torch_dtype``, no scale.

Values beyond the dtype's range saturate to its largest finite value instead of becoming inf.
The stored ``packed`` buffer is the cast tensor (nothing to pack); there are no parameter buffers.

>>> import torch, lowbit.formats as F
>>> from lowbit.primitives import choose_qparams, quantize
>>> quantize(torch.tensor([1e6, 0.1]), F.get("fp16"), choose_qparams(torch.ones(2), F.get("fp16")))
tensor([6.5504e+04, 9.9976e-02], dtype=torch.float16)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lowbit.codecs.base import Codec, QParams, register

if TYPE_CHECKING:
    from lowbit.formats import Format


class FloatCastCodec(Codec):
    """The ``float`` family."""

    family = "float"

    def choose(self, x, fmt, block, symmetric, clip_ratio):  # type: ignore[no-untyped-def]
        return QParams(torch.ones((), device=x.device), None, tuple(x.shape))

    def encode(self, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
        fmax = torch.finfo(fmt.torch_dtype).max
        return x.float().clamp(-fmax, fmax).to(fmt.torch_dtype)  # saturate instead of overflowing to inf

    def decode(self, codes: torch.Tensor, fmt: Format, qparams: QParams, dtype: torch.dtype) -> torch.Tensor:
        return codes.to(dtype)

    def code_dtype(self, fmt: Format) -> torch.dtype:
        assert fmt.torch_dtype is not None
        return fmt.torch_dtype

    def packable(self, fmt: Format) -> bool:
        return False

    def store_codes(self, codes: torch.Tensor, fmt: Format) -> torch.Tensor:
        return codes.to(fmt.torch_dtype).contiguous()

    def load_codes(self, packed: torch.Tensor, fmt: Format, shape: tuple[int, ...]) -> torch.Tensor:
        return packed

    def code_buffer(self, fmt: Format, shape: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype]:
        assert fmt.torch_dtype is not None
        return shape, fmt.torch_dtype

    def param_buffers(self, qparams: QParams, fmt: Format, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def expected_params(self, fmt, shape, block, has_zero_point):  # type: ignore[no-untyped-def]
        return {}

    def read_rows(self, qw: Any, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        return qw.packed[index].to(dtype)


register(FloatCastCodec())
