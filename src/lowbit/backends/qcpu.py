"""lowbit's own CPU kernels for weight-only linears: int4 / int8 weights x int8 activations.

==================  ===================================================  ================================
backend             layers it runs                                       what differs from reference
==================  ===================================================  ================================
``lowbit-q4-cpu``   weight-only 4-bit integer weights, groups of         activations quantized to int8
                    32/64/128/256 along K (zero points or symmetric)     per block of 64 (32 for groups
                                                                         of 32), absmax / 127
``lowbit-q8-cpu``   weight-only symmetric int8 per-channel weights,      the same activation rounding
                    in_features a multiple of 32
==================  ===================================================  ================================

The C++ source (``csrc/lowbit_qcpu.cpp``) is compiled once per machine at first use with
``torch.utils.cpp_extension`` into ``<lowbit cache>/ext/``, under a file lock; it picks AVX512-VNNI,
AVX2 or plain C++ at run time. Where it cannot build (no compiler, a failed build) both backends
say so through ``unavailable`` and the layer keeps another kernel or the reference path.

The weight is repacked once per layer (``prepare``): per row, per block of A values along K,
A / 2 bytes (byte j = code j | code j + A/2 << 4), codes shifted to 0..15 (``q - qmin``), plus one
float32 scale and one uint8 zero point per group; rows are stored in block-interleaved
quads (``interleave_rows``), so the decode path (1-4 activation rows, AVX512-VNNI) reads four
output rows as one sequential stream. Both kernels run on torch's intra-op threads. The zero
point is folded per group: ``sum (q - z) s x = s sum(q x) - s z sum(x)``; the second sum comes
from the int8 activations.

>>> import torch, lowbit
>>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(128, 32)), "int4-weight-only", progress=False)
>>> layer = q[0]
>>> Q4_CPU.unsupported(layer) is None
True
>>> if Q4_CPU.unavailable(None) is None:  # the extension built here
...     x = torch.randn(3, 128); ref = layer.reference_forward(x) - layer.bias
...     err = float((Q4_CPU.prepare(layer)(x) - ref).norm() / ref.norm())
...     assert err < Q4_CPU.tolerance, err
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lowbit import granularity as gran
from lowbit.backends.base import Backend, Kernel
from lowbit.backends.linear import (
    _flat,
    _group_size,
    _per_channel_scale,
    _symmetric_int_per_channel,
    _weight_only,
)

SOURCE = Path(__file__).parent / "csrc" / "lowbit_qcpu.cpp"
Q4_GROUPS = (32, 64, 128, 256)
# -fopenmp: at::parallel_for is a header-only OpenMP loop, so without it every kernel ran on one
# thread whatever torch.get_num_threads() said.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
BUILD_SECONDS = 45  # what the first build took on a 2-core machine (the note users see says ~this)


def _ext_dir() -> Path:
    from lowbit.zoo.cache import cache_dir

    return cache_dir() / "ext"


def _ext_name() -> str:
    """One name per (source, flags, torch, python): any change rebuilds, never reuses."""
    flags = " ".join(CFLAGS + LDFLAGS).encode()
    versions = torch.__version__.encode() + sys.version.encode()
    key = hashlib.sha256(SOURCE.read_bytes() + flags + versions).hexdigest()
    return f"lowbit_qcpu_{key[:12]}"


@cache
def _build() -> tuple[ModuleType | None, str | None]:
    """The compiled extension, or why it is not here (one line). Built at most once per process."""
    if os.environ.get("LOWBIT_NO_EXT"):
        return None, "disabled by LOWBIT_NO_EXT"
    try:
        from filelock import FileLock
        from torch.utils import cpp_extension
    except ImportError as err:  # pragma: no cover - both ship with lowbit's dependencies
        return None, f"cannot build C++ extensions here ({err})"
    name = _ext_name()
    build_dir = _ext_dir() / name
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(build_dir) + ".lock"):
            # torch's own build baton: a build killed midway leaves it, and every later build then
            # waits for it forever. Holding our lock (released by the OS when its holder dies), no
            # other lowbit build is running, so a baton found now is such a leftover.
            baton = build_dir / "lock"
            if baton.exists():
                print(
                    f"lowbit: removing a stale build lock left by an interrupted build ({baton})",
                    file=sys.stderr,
                )
                baton.unlink()
            built = any(build_dir.glob(f"{name}*.so"))
            if not built:
                note = f"lowbit: building the int4/int8 CPU kernel (once, ~{BUILD_SECONDS} s)"
                print(note, file=sys.stderr)
            start = time.perf_counter()
            module = cpp_extension.load(
                name,
                [str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(build_dir),
                verbose=False,
            )
            if not built:
                print(f"lowbit: built in {time.perf_counter() - start:.0f} s ({build_dir})", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - any build failure makes the backend unavailable, not a crash
        lines = [line for line in str(err).splitlines() if line.strip()]
        last = lines[-1][:160] if lines else ""
        return None, f"the C++ kernel did not build ({type(err).__name__}: {last})"
    return module, None


def extension() -> ModuleType:
    """The compiled kernels (builds them on first use); ``RuntimeError`` says why when they cannot be.

    >>> extension().isa() in ("avx512-vnni", "avx2", "scalar") if available() else True
    True
    """
    module, why = _build()
    if module is None:
        raise RuntimeError(f"lowbit's CPU kernel is unavailable: {why}")
    return module


def available() -> bool:
    """Whether the kernels built (or were already built) on this machine."""
    return _build()[0] is not None


def _unavailable(cpu: Any) -> str | None:
    if cpu is not None and getattr(cpu, "arch", "x86_64") not in ("x86_64", "amd64"):
        return f"x86-64 only for now (this CPU is {cpu.arch}: the plain C++ path would be slow)"
    return _build()[1]


def _cpu_only(layer: Any) -> str | None:
    return None if layer.qweight.packed.device.type == "cpu" else "CPU only"


def _run(x: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``kernel`` on ``x`` flattened to contiguous float32 rows, reshaped and cast back. At batch 1
    a call is a few microseconds of kernel, so conversions that would copy nothing are skipped."""
    flat, lead = _flat(x)
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        flat = flat.float().contiguous()
    y = kernel(flat).view(*lead, -1)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


# --- int4 ---------------------------------------------------------------------------------------


def block_size(group: int) -> int:
    """Activation block (values per int8 scale) the int4 kernel uses with weight groups of ``group``.

    >>> block_size(64), block_size(32), block_size(128)
    (64, 32, 64)
    """
    return 64 if group % 64 == 0 else 32


ROW_TILE = 4  # rows per block-interleaved quad (kRowTile in the C++ source)


def interleave_rows(rows: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """The kernels' row order: ``[N, B]`` bytes per row -> ``[N rounded up to 4, B]`` where quad q,
    block b holds its four rows' ``block_bytes`` side by side (padding rows are zeros). The decode
    path reads four rows at once as one sequential stream.

    >>> interleave_rows(torch.arange(8, dtype=torch.uint8).reshape(2, 4), 2).tolist()
    [[0, 1, 4, 5], [0, 0, 0, 0], [2, 3, 6, 7], [0, 0, 0, 0]]
    """
    n, width = rows.shape
    padded = -(-n // ROW_TILE) * ROW_TILE
    if padded != n:
        rows = torch.cat([rows, rows.new_zeros(padded - n, width)])
    quads = rows.reshape(padded // ROW_TILE, ROW_TILE, width // block_bytes, block_bytes)
    return quads.transpose(1, 2).reshape(padded, width).contiguous()


def pack_q4(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Nibble layout the kernel reads: ``codes`` ``[N, K]`` in 0..15 -> ``[N rounded up to 4, K // 2]``
    uint8; per block of ``block`` values byte j = code j | code (j + block / 2) << 4, rows in
    ``interleave_rows`` order.

    >>> pack_q4(torch.arange(4).reshape(1, 4) % 16, 4)[0].tolist()
    [32, 49]
    """
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // block, 2, block // 2)
    return interleave_rows((c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2), block // 2)


def q4_params(layer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(codes shifted to 0..15 ``[N, K]``, scale ``[N, K/G]``, shifted zero ``[N, K/G]`` uint8, G):
    ``weight = (codes - zero) * scale`` exactly as the layer dequantizes."""
    qw = layer.qweight
    n, k = qw.shape
    group = _group_size(qw)
    qmin = int(qw.fmt.qmin)
    codes = qw.codes().reshape(n, k).to(torch.int32) - qmin
    scale = qw.scale_values().reshape(n, k // group)
    zp = getattr(qw, "zero_point", None)
    zero = torch.zeros_like(scale) if zp is None else zp.to(torch.float32).reshape(n, k // group)
    return codes, scale, (zero - qmin).to(torch.uint8).contiguous(), group


class Q4Kernel(Kernel):
    """int4 weights (packed once) x int8 activations quantized per block in the kernel."""

    name = "lowbit-q4-cpu"

    def __init__(self, layer: Any) -> None:
        super().__init__(layer.qweight.packed.device)
        codes, self.scale, self.zero, self.group = q4_params(layer)
        self.block = block_size(self.group)
        self.packed = pack_q4(codes, self.block)
        extension()  # built (or refused) now, not at the first call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The module is looked up per call, not kept: kernels are deep-copied with their model.
        return _run(
            x,
            lambda flat: extension().q4_linear(
                flat, self.packed, self.scale, self.zero, self.group, self.block
            ),
        )


def _q4_unsupported(layer: Any) -> str | None:
    reason = _weight_only(layer)
    if reason:
        return reason
    qw = layer.qweight
    if qw.fmt.family != "int" or qw.fmt.bits != 4:
        return f"needs 4-bit integer weights (has {qw.fmt.name})"
    if len(qw.shape) != 2:
        return "needs a 2-D weight"
    n, k = qw.shape
    group = _group_size(qw) if isinstance(qw.granularity, gran.PerGroup) else 0
    if group not in Q4_GROUPS:
        return f"needs groups of {'/'.join(map(str, Q4_GROUPS))} along K (has {qw.granularity})"
    if k % group:
        return f"needs in_features divisible by the group {group} (has {k})"
    zp = getattr(qw, "zero_point", None)
    if zp is not None and zp.is_floating_point():
        return "needs integer zero points (has float ones)"
    return _cpu_only(layer)


Q4_CPU = Backend(
    "lowbit-q4-cpu",
    "linear",
    "lowbit's C++ int4 x int8 kernel (AVX512-VNNI / AVX2 / plain C++), weight repacked once",
    "activations rounded to int8 per block of 64 (32 for groups of 32) along K, absmax / 127",
    _unavailable,
    _q4_unsupported,
    Q4Kernel,
    tolerance=0.03,
)


# --- int8 ---------------------------------------------------------------------------------------


class Q8Kernel(Kernel):
    """Symmetric int8 per-channel weights x int8 activations quantized per block in the kernel."""

    name = "lowbit-q8-cpu"

    def __init__(self, layer: Any) -> None:
        qw = layer.qweight
        super().__init__(qw.packed.device)
        self.scale = _per_channel_scale(qw)
        self.block = 64 if qw.shape[1] % 64 == 0 else 32
        self.codes = interleave_rows(qw.codes().reshape(qw.shape).to(torch.int8), self.block)
        extension()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _run(x, lambda flat: extension().q8_linear(flat, self.codes, self.scale, self.block))


def _q8_unsupported(layer: Any) -> str | None:
    reason = _weight_only(layer) or _symmetric_int_per_channel(layer)
    if reason:
        return reason
    if layer.qweight.shape[1] % 32:
        return f"needs in_features divisible by 32 (has {layer.qweight.shape[1]})"
    return _cpu_only(layer)


Q8_CPU = Backend(
    "lowbit-q8-cpu",
    "linear",
    "lowbit's C++ int8 x int8 kernel (AVX512-VNNI / AVX2 / plain C++), per-block activation scales",
    "activations rounded to int8 per block of 64 (32 when in_features is not a multiple of 64)",
    _unavailable,
    _q8_unsupported,
    Q8Kernel,
    tolerance=0.02,
)

QCPU_BACKENDS = (Q4_CPU, Q8_CPU)
