"""GGUF weight blocks: lowbit's grids written as llama.cpp's block types, and the block types
lowbit has no grid for quantized here.

Three GGUF types are exactly lowbit grids, so a weight quantized by lowbit (round to nearest, GPTQ,
AWQ) is written without touching a code:

==========  ==========================================  =========================================
GGUF type   value                                        lowbit grid
==========  ==========================================  =========================================
``Q8_0``    ``d * q``, ``q`` int8, one fp16 ``d`` per 32  ``int8@fp16``, symmetric, ``group:32``
``Q5_0``    ``d * (q - 16)``, ``q`` 0..31                 ``int5@fp16`` or ``gguf_q5_0``, ``group:32``
``Q4_0``    ``d * (q - 8)``, ``q`` 0..15                  ``int4@fp16`` or ``gguf_q4_0``, ``group:32``
==========  ==========================================  =========================================

(symmetric; ``gguf_q4_0`` / ``gguf_q5_0`` choose scales as llama.cpp does: the largest magnitude
on code -8 / -16, the scale possibly negative.)

(groups of 64, 128 ... or one scale per row map too: each 32-block repeats its group's scale.)
The ``gguf`` package's dequantizer multiplies the same float32 numbers lowbit's does, so the
weights read back are bit-identical.

Everything else is a re-quantization of float weights: ``Q4_1`` and ``Q5_0`` through the ``gguf``
package's own quantizer (llama.cpp's reference rounding), ``Q4_K`` and ``Q6_K`` through
``quantize_k`` here (the ``gguf`` package only reads K-quants), which searches each sub-block's
range for the smallest squared error, weighted per input column by an importance matrix when
one is given (llama.cpp's ``imatrix``: the mean squared activation of each input).

>>> import numpy as np
>>> rows = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
>>> blocks = quantize_k(rows, "Q6_K")
>>> blocks.shape, float(np.abs(dequantize(blocks, "Q6_K") - rows).max()) < 0.1
((4, 210), True)
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.errors import ArtifactError

BLOCK = 32  # values per block of the legacy types (Q4_0 .. Q8_0)
SUPER = 256  # values per super-block of the K-quants (gguf's QK_K)

# type -> (signed code range of the lowbit grid, offset added to a code to store it)
EXACT_GRIDS: dict[str, tuple[int, int, int]] = {
    "Q8_0": (-128, 127, 0),
    "Q5_0": (-16, 15, 16),
    "Q4_0": (-8, 7, 8),
}
SUPPORTED = ("F32", "F16", "Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


def qtype_enum(qtype: str):  # type: ignore[no-untyped-def]
    """The ``gguf.GGMLQuantizationType`` named ``qtype`` (``"Q4_0"``...), or a clear error."""
    import gguf

    name = qtype.upper()
    if name not in SUPPORTED:
        raise ValueError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(SUPPORTED)}")
    return gguf.GGMLQuantizationType[name]


def block_size(qtype: str) -> int:
    """Values per block of ``qtype`` (1 for the float types)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[qtype_enum(qtype)][0]


def dequantize(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """Float32 values of GGUF ``blocks`` (uint8 rows), with the ``gguf`` package's dequantizer."""
    import gguf

    return gguf.quants.dequantize(blocks, qtype_enum(qtype))


# --- lowbit grids written exactly ---------------------------------------------------------------------


def exact_reason(qweight, qtype: str) -> str | None:  # type: ignore[no-untyped-def]
    """``None`` when ``qweight`` (a ``lowbit.nn.qweight.QuantizedWeight`` of a 2-D weight) is
    exactly GGUF ``qtype``'s grid; otherwise why not, in words a user can act on."""
    if qtype not in EXACT_GRIDS:
        return f"{qtype} has no lowbit grid (it is written by re-quantizing)"
    lo, hi, _ = EXACT_GRIDS[qtype]
    fmt = qweight.fmt
    if fmt.family != "int" or (fmt.qmin, fmt.qmax) != (lo, hi):
        return f"{fmt.name} weights are not {qtype}'s grid (int{qtype[1]}@fp16, symmetric)"
    if not qweight.symmetric:
        return f"{qtype} has no zero point; these weights are asymmetric"
    if len(qweight.shape) != 2 or qweight.block[0] != 1:
        return f"{qtype} needs one scale per row segment; these scales span {qweight.block[0]} rows"
    cols, group = qweight.shape[1], qweight.block[1]
    if cols % BLOCK or group % BLOCK:
        return f"{qtype} blocks are {BLOCK} inputs; this weight has {cols} inputs in groups of {group}"
    scale = qweight.scale_values()
    if not torch.equal(scale.half().float(), scale):
        return f"{qtype} stores fp16 scales; these are float32 (quantize with {fmt.name}@fp16)"
    return None


def exact_blocks(qweight, qtype: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    """GGUF ``qtype`` blocks (uint8 ``[rows, bytes per row]``) holding ``qweight``'s own codes and
    scales; ``ArtifactError`` when its grid is not ``qtype``'s (see ``exact_reason``)."""
    reason = exact_reason(qweight, qtype)
    if reason is not None:
        raise ArtifactError(f"cannot write these weights as {qtype} exactly: {reason}")
    rows, cols = qweight.shape
    codes = qweight.codes().to(torch.int16).cpu().numpy()  # signed codes, [rows, cols]
    scale = qweight.scale_values().cpu().numpy().reshape(rows, -1)  # one per group
    per_block = np.repeat(scale, qweight.block[1] // BLOCK, axis=1)  # [rows, cols / 32]
    d = per_block.astype(np.float16).reshape(rows, -1, 1).view(np.uint8)  # 2 bytes per block
    stored = (codes + EXACT_GRIDS[qtype][2]).reshape(rows, cols // BLOCK, BLOCK)
    if qtype == "Q8_0":
        payload = stored.astype(np.int8).view(np.uint8)
    elif qtype == "Q4_0":
        u = stored.astype(np.uint8)
        payload = u[..., :16] | (u[..., 16:] << 4)  # low nibbles: values 0..15, high: 16..31
    else:  # Q5_0: low nibbles as Q4_0, the fifth bits packed little-endian into 4 bytes before them
        u = stored.astype(np.uint8)
        high = np.packbits(u >> 4, axis=-1, bitorder="little")
        payload = np.concatenate([high, (u[..., :16] & 0x0F) | ((u[..., 16:] & 0x0F) << 4)], axis=-1)
    return np.concatenate([d, payload], axis=-1).reshape(rows, -1)


# --- re-quantization of float weights -----------------------------------------------------------------


def quantize(rows: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """Float32 ``rows`` ``[n, k]`` as GGUF ``qtype``: uint8 blocks, or the float array for F16/F32.

    The legacy types use the ``gguf`` package's quantizer (llama.cpp's reference rounding; it
    takes no importance); ``Q4_K`` / ``Q6_K`` use ``quantize_k``.
    """
    import gguf

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if qtype in ("Q4_K", "Q6_K"):
        return quantize_k(rows, qtype, importance)
    return gguf.quants.quantize(rows, qtype_enum(qtype))


def quantize_k(rows: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``Q4_K`` or ``Q6_K`` blocks of float32 ``rows`` ``[n, k]`` (``k`` a multiple of 256).

    Each sub-block (32 values for Q4_K, 16 for Q6_K) tries a few clip ratios of its range and
    keeps the one with the least squared error, weighted by ``importance`` (``[k]``, one weight
    per input column) when given. Sub-block scales (and Q4_K's minimums) are then quantized to
    6 / 8 bits against the super-block's fp16 scale, and the values re-rounded to the final scales.
    """
    n, k = rows.shape
    if k % SUPER:
        raise ValueError(f"{qtype} rows must be a multiple of {SUPER} values, got {k}")
    x = rows.reshape(-1, SUPER).astype(np.float32)
    w = np.ones_like(x) if importance is None else np.broadcast_to(_weights(importance, k), (n, k))
    w = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, SUPER)
    packed = _q4_k(x, w) if qtype == "Q4_K" else _q6_k(x, w)
    return packed.reshape(n, -1)


def _weights(importance: np.ndarray, k: int) -> np.ndarray:
    imp = np.asarray(importance, dtype=np.float32).reshape(-1)
    if imp.shape[0] != k or not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise ValueError(f"importance must be {k} finite non-negative values, got shape {imp.shape}")
    return (imp / max(float(imp.mean()), 1e-30) + 1e-6).reshape(1, k)  # relative; never all zero


_RATIOS = np.array([1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.8, 0.75], dtype=np.float32)


def _best_affine(x: np.ndarray, w: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (last axis) ``(scale, offset)`` with ``x ~ scale * q - offset``, ``q`` in
    ``0..levels-1``, ``offset >= 0`` (the range widened to include 0, as Q4_K stores it)."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    best = (np.zeros_like(lo), -lo, np.full(lo.shape, np.inf, dtype=np.float32))
    for r in _RATIOS:
        scale = np.maximum((hi - lo) * r / (levels - 1), 1e-30)
        offset = -lo * r
        q = np.clip(np.rint((x + offset[..., None]) / scale[..., None]), 0, levels - 1)
        err = (w * (scale[..., None] * q - offset[..., None] - x) ** 2).sum(axis=-1)
        take = err < best[2]
        best = (np.where(take, scale, best[0]), np.where(take, offset, best[1]), np.where(take, err, best[2]))
    return best[0], best[1]


def _best_symmetric(x: np.ndarray, w: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per sub-block scale with ``x ~ scale * q``, ``q`` in ``qmin..qmax``, least weighted error."""
    amax = np.abs(x).max(axis=-1)
    best_scale, best_err = np.zeros_like(amax), np.full(amax.shape, np.inf, dtype=np.float32)
    for r in _RATIOS:
        scale = np.maximum(amax * r / qmax, 1e-30)
        q = np.clip(np.rint(x / scale[..., None]), qmin, qmax)
        err = (w * (scale[..., None] * q - x) ** 2).sum(axis=-1)
        take = err < best_err
        best_scale, best_err = np.where(take, scale, best_scale), np.where(take, err, best_err)
    return best_scale


def _super_scale(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """``(d, codes)``: one fp16 ``d`` per super-block (rows) and integer codes ``0..top`` (or
    ``-top..top`` for signed values) with ``values ~ d * codes``; ``d`` as float32 of its fp16."""
    d = (np.abs(values).max(axis=-1) / top).astype(np.float16).astype(np.float32)
    safe = np.where(d > 0, d, 1.0)
    codes = np.clip(np.rint(values / safe[:, None]), -top, top)
    return d, codes.astype(np.int32)


def _q4_k(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs, ws = x.reshape(nb, 8, 32), w.reshape(nb, 8, 32)
    scale, offset = _best_affine(xs, ws, 16)
    d, sc = _super_scale(scale, 63)
    dmin, mn = _super_scale(offset, 63)
    eff_scale = d[:, None] * sc  # the scales the file will hold, as float32 products
    eff_off = dmin[:, None] * mn
    safe = np.where(eff_scale > 0, eff_scale, 1.0)
    q = np.clip(np.rint((xs + eff_off[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    q = np.where(eff_scale[..., None] > 0, q, 0)
    # qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in its low nibbles, 2c+1 in the high ones
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    packed_scales = np.empty((nb, 12), dtype=np.uint8)
    packed_scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    head = np.stack([d, dmin], axis=1).astype(np.float16).view(np.uint8)
    return np.concatenate([head, packed_scales, qs], axis=1)


def _q6_k(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs, ws = x.reshape(nb, 16, 16), w.reshape(nb, 16, 16)
    scale = _best_symmetric(xs, ws, -32, 31)
    d, sc = _super_scale(scale, 127)
    eff = d[:, None] * sc.astype(np.float32)
    safe = np.where(eff != 0, eff, 1.0)
    q = np.clip(np.rint(xs / safe[..., None]), -32, 31).astype(np.int32)
    q = np.where(eff[..., None] != 0, q, 0)
    u = (q + 32).astype(np.uint8).reshape(nb, 2, 128)  # two halves of 128 values
    low, high = u & 0x0F, u >> 4
    ql = low[:, :, :64] | (low[:, :, 64:] << 4)  # [nb, 2, 64]
    qh = high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:128] << 6)
    scales = sc.astype(np.int8).view(np.uint8)
    tail = d.astype(np.float16).reshape(nb, 1).view(np.uint8)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), scales, tail], axis=1)
