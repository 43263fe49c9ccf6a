"""Scales as runtimes store them: 16-bit floats, OCP MX's e8m0 powers of two, NVFP4's e4m3.

A format's ``scale_dtype`` says in which type its per-block scales are stored:

- ``None``: float32 (lowbit's default).
- ``torch.float16`` / ``torch.bfloat16``: the scale rounded to that type (GGUF's blocks,
  compressed-tensors' fp16 checkpoints), stored as that type.
- ``torch.float8_e8m0fnu``: a bare power of two ``2**e``, ``e`` in -127..127 (the OCP
  Microscaling formats MXFP4 / MXFP6 / MXFP8), stored as the byte ``e + 127``.
- ``torch.float8_e4m3fn``: an fp8 e4m3 value times one float32 power of two per tensor (NVFP4).
  NVIDIA's recipe takes the tensor scale as ``amax / (6 * 448)``; a power of two is as precise
  (e4m3 has the same relative spacing in every normal binade), is exact in float32 products,
  and lets the stored e4m3 byte be recovered from the float32 scale bit for bit.

Codecs compute codes against ``round_scale(scale, fmt)`` (the value a runtime will use), and store
it with ``scale_buffers`` / read it back with ``scale_from_buffers``; round trips are exact.

>>> import torch, lowbit.formats as F
>>> round_scale(torch.tensor([3.0, 0.2]), F.get("mxfp4")).tolist()  # e8m0: powers of two
[4.0, 0.25]
>>> s = torch.tensor([0.3, 0.001])
>>> torch.equal(scale_from_buffers(scale_buffers(round_scale(s, F.get("nvfp4")), F.get("nvfp4")),
...     F.get("nvfp4")), round_scale(s, F.get("nvfp4")))
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Mapping

    from lowbit.formats import Format

E8M0 = torch.float8_e8m0fnu
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_TINY = 2.0**-9  # smallest positive e4m3 (subnormal): all-zero blocks get it, never a zero scale
E8M0_EXPONENTS = (-127, 127)  # 2**-127 .. 2**127; the byte 255 is NaN
# Lowest tensor exponent: e4m3 * 2**k stays exact in float32 down to its subnormals (2**-149).
_MIN_TENSOR_EXPONENT = -140

# The dtype each scale type is stored as (e8m0 and e4m3 as their raw bytes: artifacts keep to the
# dtypes every safetensors reader knows).
STORAGE = {
    None: torch.float32,
    torch.float16: torch.float16,
    torch.bfloat16: torch.bfloat16,
    E8M0: torch.uint8,
    E4M3: torch.uint8,
}


def has_tensor_scale(fmt: Format) -> bool:
    """Whether ``fmt``'s block scales share one float32 power of two per tensor (e4m3 scales)."""
    return fmt.scale_dtype == E4M3


def pow2_floor(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """OCP MX shared scale: ``2**(floor(log2(amax)) - emax)``, the exponent clamped to e8m0's range.

    ``emax`` is the element format's largest exponent (2 for fp4 e2m1, 8 for fp8 e4m3). The block's
    largest value then lands in ``[2**emax, 2**(emax+1))`` and saturates to the element's largest
    value beyond it, as the specification says. An all-zero block gets the smallest scale.

    >>> pow2_floor(torch.tensor([6.0, 7.9, 0.0]), 2).tolist()
    [1.0, 1.0, 5.877471754111438e-39]
    """
    amax = amax.float()
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent with m in [0.5, 1): floor(log2) = exponent - 1
    shared = (exponent - 1 - emax).clamp(*E8M0_EXPONENTS)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, E8M0_EXPONENTS[0]))
    return torch.ldexp(torch.ones_like(amax), shared)


def tensor_exponent(largest: torch.Tensor) -> int:
    """Smallest ``k`` with ``largest <= 448 * 2**k`` (exact, from the float's exponent)."""
    value = float(largest)
    if not value > 0:
        return 0
    mantissa, exponent = torch.frexp(torch.tensor(value, dtype=torch.float32))
    k = int(exponent) - 9 if float(mantissa) <= E4M3_MAX / 512 else int(exponent) - 8
    return max(k, _MIN_TENSOR_EXPONENT)


def round_scale(scale: torch.Tensor, fmt: Format, largest: torch.Tensor | None = None) -> torch.Tensor:
    """``scale`` as ``fmt.scale_dtype`` stores it (kept float32); unchanged when that is ``None``.

    16-bit types: the magnitude is clamped into the type's range first (its smallest subnormal up to
    its largest value), so a tiny block never gets a zero scale; the sign is kept
    (``signed_absmax`` scales can be negative). e8m0: the nearest power of two in -127..127. e4m3:
    the tensor's power of two ``2**k`` is chosen so that ``largest`` (default: the largest scale;
    callers pass the unclipped tensor's, so that clip-search candidates share ``k``) maps inside
    e4m3's range, then each ``scale / 2**k`` is rounded to e4m3 (at least its smallest subnormal)
    and multiplied back.
    """
    if fmt.scale_dtype is None:
        return scale
    scale = scale.float()
    if fmt.scale_dtype == E8M0:
        low, high = (2.0**e for e in E8M0_EXPONENTS)
        return scale.abs().clamp(min=low, max=high).to(E8M0).float()
    if fmt.scale_dtype == E4M3:
        largest = scale.abs().max() if largest is None else largest
        k = tensor_exponent(largest) if scale.numel() else 0
        fp8 = torch.ldexp(scale.abs(), torch.tensor(-k)).clamp(min=E4M3_TINY, max=E4M3_MAX).to(E4M3)
        return torch.ldexp(fp8.float(), torch.tensor(k))
    info = torch.finfo(fmt.scale_dtype)
    smallest = info.smallest_normal * info.eps  # the smallest positive subnormal
    magnitude = scale.abs().clamp(min=smallest, max=info.max)
    return torch.where(scale < 0, -magnitude, magnitude).to(fmt.scale_dtype).float()


def scale_buffers(scale: torch.Tensor, fmt: Format) -> dict[str, torch.Tensor]:
    """The stored buffers of float32 ``scale`` (already ``round_scale``-d): ``scale`` in the storage
    dtype, plus ``tensor_scale`` (float32, 0-d) for e4m3 scales.

    Raises ``ValueError`` when a scale is not exactly representable (codes were computed against a
    value the file cannot hold).
    """
    scale = scale.float().contiguous()
    out: dict[str, torch.Tensor]
    if fmt.scale_dtype is None:
        return {"scale": scale}
    if fmt.scale_dtype == E8M0:
        _, exponent = torch.frexp(scale)
        out = {"scale": (exponent - 1 + 127).clamp(0, 254).to(torch.uint8)}
    elif fmt.scale_dtype == E4M3:
        k = tensor_exponent(scale.abs().max()) if scale.numel() else 0
        tensor = torch.ldexp(torch.ones((), device=scale.device), torch.tensor(k, device=scale.device))
        out = {"scale": (scale / tensor).to(E4M3).view(torch.uint8), "tensor_scale": tensor}
    else:
        out = {"scale": scale.to(fmt.scale_dtype)}
    if not torch.equal(scale_from_buffers(out, fmt), scale):
        raise ValueError(
            f"format {fmt.name}: a scale is not representable in its {fmt.scale_dtype} storage; choose "
            "scales with lowbit.codecs.round_scale (the format's own rule) before storing codes"
        )
    return out


def scale_from_buffers(buffers: Mapping[str, torch.Tensor], fmt: Format) -> torch.Tensor:
    """Float32 scales from stored buffers (inverse of ``scale_buffers``)."""
    stored = buffers["scale"]
    if fmt.scale_dtype == E8M0:
        return torch.ldexp(torch.ones(stored.shape, device=stored.device), stored.to(torch.int32) - 127)
    if fmt.scale_dtype == E4M3:
        return stored.view(E4M3).float() * buffers["tensor_scale"].float()
    return stored.float()


def stored_scale_params(
    fmt: Format, bshape: tuple[int, ...]
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the scale buffers of a weight with ``bshape`` blocks."""
    out = {"scale": (bshape, STORAGE[fmt.scale_dtype])}
    if has_tensor_scale(fmt):
        out["tensor_scale"] = ((), torch.float32)
    return out
