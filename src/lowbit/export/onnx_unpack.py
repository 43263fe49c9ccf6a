"""Weights ONNX Runtime has no kernel for, stored as lowbit's codes and unpacked inside the graph.

A weight-only int4 conv, an nf4 / fp4 / ternary linear: ORT computes them in float. Writing the
dequantized float weight would make the ``.onnx`` file 4-8x larger than the artifact. Instead the
graph stores the codes bit-packed (``bits`` = 1, 2, 4: 8 / 4 / 2 codes per byte; other widths one
byte per code) and the block scales / zero points, and rebuilds the float weight with a few
constant nodes (``BitShift``, ``Sub``, ``Cast``, ``Gather`` for grid formats, ``Mul``). Their inputs
are all initializers, so ORT folds them once when it loads the model: the file is as small as
the codes, the run time that of the float op, and the report says so.

Built from the weight's own codes and parameters, then checked: the graph's arithmetic is
replayed in numpy and must reproduce ``QuantizedWeight.dequantize()`` (else the float weight is
written, and the note says why).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import grid_table

PACKED_BITS = (1, 2, 4)  # widths that tile a byte; others take one byte per code


def _table(qw: QuantizedWeight) -> np.ndarray | None:
    """Grid formats: the value of each code at scale 1 (``None`` for affine integers)."""
    if qw.fmt.family != "grid":
        return None
    return grid_table(qw.fmt).detach().cpu().numpy().astype(np.float32)


def _offset(qw: QuantizedWeight) -> int:
    """What is added to a code to make it a non-negative index (signed ints start at qmin)."""
    return -qw.fmt.qmin if qw.fmt.family == "int" else 0


def supported(qw: QuantizedWeight) -> bool:
    """Affine integer and fixed-grid weights of at most 8 bits, 2-D, with 2-D block parameters."""
    if qw.fmt.family not in ("int", "grid") or qw.fmt.bits > 8 or len(qw.shape) != 2:
        return False
    qp = qw.qparams()
    return qp.codebook is None and len(qp.block) == 2


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[rows, cols]`` (0 .. 2^bits - 1) into bytes, code ``j*per + k`` at bit ``k*bits``."""
    per = 8 // bits
    rows, cols = u.shape
    padded = np.zeros((rows, math.ceil(cols / per) * per), dtype=np.uint8)
    padded[:, :cols] = u
    parts = padded.reshape(rows, -1, per).astype(np.uint16)
    packed = np.zeros(parts.shape[:2], dtype=np.uint16)
    for k in range(per):
        packed |= parts[:, :, k] << (k * bits)
    return packed.astype(np.uint8)


def _params(qw: QuantizedWeight) -> tuple[tuple[int, int], np.ndarray, np.ndarray | None]:
    qp = qw.qparams()
    bo, bi = (int(v) for v in qp.block)
    rows, cols = qw.shape
    nbo, nbi = math.ceil(rows / bo), math.ceil(cols / bi)
    scale = qp.scale.detach().float().cpu().numpy().reshape(-1)  # one value, or one per block
    scale = np.broadcast_to(scale, (nbo * nbi,)).reshape(nbo, nbi)
    zp = None
    if qp.zero_point is not None:
        zp = qp.zero_point.detach().cpu().numpy().astype(np.float32).reshape(nbo, nbi)
    return (bo, bi), scale.astype(np.float32), zp


def _replay(u: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    """The graph's arithmetic in numpy (float32, same order of operations)."""
    (bo, bi), scale, zp = _params(qw)
    rows, cols = qw.shape
    nbo, nbi = scale.shape
    table = _table(qw)
    if table is not None:
        v = table[u]
    else:
        v = u.astype(np.float32) - np.float32(_offset(qw))
    full = np.zeros((nbo * bo, nbi * bi), dtype=np.float32)
    full[:rows, :cols] = v
    blocks = full.reshape(nbo, bo, nbi, bi)
    if zp is not None:
        blocks = blocks - zp[:, None, :, None]
    blocks = blocks * scale[:, None, :, None]
    return blocks.reshape(nbo * bo, nbi * bi)[:rows, :cols]


def unpacked_weight(b: Any, qw: QuantizedWeight, prefix: str) -> str | None:
    """Nodes rebuilding the float ``[out, in]`` matrix of ``qw`` from packed codes (their output's
    name); ``None`` when the format or its parameters cannot be rebuilt exactly this way."""
    if not supported(qw):
        return None
    codes = qw.codes().detach().cpu().to(torch.int64).numpy()
    u = (codes + _offset(qw)).astype(np.uint8)
    expected = qw.dequantize(torch.float32).detach().cpu().numpy()
    if not np.array_equal(_replay(u, qw), expected):
        return None
    bits = qw.fmt.bits
    rows, cols = qw.shape
    (bo, bi), scale, zp = _params(qw)
    nbo, nbi = scale.shape
    if bits in PACKED_BITS:
        per = 8 // bits
        packed = b.const(prefix, f"codes_u{bits}x{per}", _pack(u, bits))
        parts = []
        mask_shift = b.const(prefix, "shift", np.array(8 - bits, dtype=np.uint8))
        for k in range(per):
            # (byte << (8 - bits - k*bits)) >> (8 - bits): bits k*bits .. k*bits+bits-1 of the byte
            left = b.const(prefix, "lshift", np.array(8 - bits - k * bits, dtype=np.uint8))
            high = b.node("BitShift", [packed, left], prefix, direction="LEFT")
            part = b.node("BitShift", [high, mask_shift], prefix, direction="RIGHT")
            parts.append(b.node("Unsqueeze", [part, b.const(prefix, "axis", np.array([-1]))], prefix))
        stacked = b.node("Concat", parts, prefix, axis=-1)
        flat = b.node("Reshape", [stacked, b.const(prefix, "shape", np.array([rows, -1]))], prefix)
        u_name = b.node(
            "Slice",
            [flat, b.const(prefix, "s0", np.array([0])), b.const(prefix, "s1", np.array([cols])),
             b.const(prefix, "ax", np.array([1]))],
            prefix,
        )  # fmt: skip
    else:
        u_name = b.const(prefix, "codes_u8", u)
    table = _table(qw)
    if table is not None:
        idx = b.node("Cast", [u_name], prefix, to=TensorProto.INT64)
        values = b.node("Gather", [b.const(prefix, "grid", table), idx], prefix, axis=0)
    else:
        values = b.node("Cast", [u_name], prefix, to=TensorProto.FLOAT)
        if _offset(qw):
            offset = b.const(prefix, "offset", np.array(_offset(qw), np.float32))
            values = b.node("Sub", [values, offset], prefix)
    pad_r, pad_c = nbo * bo - rows, nbi * bi - cols
    if pad_r or pad_c:
        values = b.node("Pad", [values, b.const(prefix, "pads", np.array([0, 0, pad_r, pad_c]))], prefix)
    blocks = b.node("Reshape", [values, b.const(prefix, "blocks", np.array([nbo, bo, nbi, bi]))], prefix)
    if zp is not None:
        blocks = b.node("Sub", [blocks, b.const(prefix, "zp", zp.reshape(nbo, 1, nbi, 1))], prefix)
    blocks = b.node("Mul", [blocks, b.const(prefix, "scale", scale.reshape(nbo, 1, nbi, 1))], prefix)
    out = b.node("Reshape", [blocks, b.const(prefix, "matrix", np.array([nbo * bo, nbi * bi]))], prefix)
    if pad_r or pad_c:
        out = b.node(
            "Slice",
            [out, b.const(prefix, "m0", np.array([0, 0])), b.const(prefix, "m1", np.array([rows, cols])),
             b.const(prefix, "max", np.array([0, 1]))],
            prefix,
        )  # fmt: skip
    return out
