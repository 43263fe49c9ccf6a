"""Number formats as data: which values a quantized number can take.

A format is a small frozen dataclass, never a class hierarchy. Each ``family`` has one codec
(``lowbit.codecs``) that does its arithmetic and storage; five are built in and share one interface
(`lowbit.primitives.quantize` / `dequantize`):

- ``int``: affine integers ``intN`` / ``uintN`` (``qmin..qmax``, scale and zero point).
- ``float``: ``fp16`` / ``bf16``, a plain cast (no scale).
- ``grid``: a fixed, sorted table of values times a per-block scale: ``fp8_e4m3``, ``fp8_e5m2``,
  ``fp4_e2m1``, ``nf4``, ``log2_<bits>``, ``binary``, ``ternary``; the microscaling formats
  ``mxfp4`` / ``mxfp6_*`` / ``mxfp8`` (e8m0 power-of-two scales) and ``nvfp4`` (e4m3 scales).
  Sign-magnitude grids round ties to the even magnitude code, which is exactly IEEE
  round-to-nearest-even for the minifloats.
- ``codebook``: a grid learned from the data per block: ``kmeans_<bits>``, ``quantile_<bits>``.
- ``vector``: product quantization ``pq`` / ``pq_<bits>x<dim>`` (a codebook of sub-vectors).

>>> import lowbit.formats as F
>>> F.get("int4").qmin, F.get("int4").qmax
(-8, 7)
>>> F.get("fp4_e2m1").grid[-3:]
(3.0, 4.0, 6.0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache

import torch

from lowbit.codecs import codec_for, families

# The built-in families (each registered by its module in lowbit.codecs); more can be registered.
FAMILIES = ("int", "float", "grid", "codebook", "vector")


@dataclass(frozen=True)
class Format:
    """One number format. Everything else (ranges, storage width) derives from these fields.

    Attributes:
        name: registry name, e.g. ``"int4"``.
        family: a registered codec family (``FAMILIES`` are built in).
        bits: stored bits per code (per sub-vector for ``vector``).
        signed: integer formats only: whether codes are signed.
        qmin, qmax: integer formats only: the code range.
        grid: ``grid`` family: sorted magnitudes (``sign_magnitude``) or sorted values.
        sign_magnitude: grid codes are ``sign << (bits-1) | magnitude_index``.
        scale_rule: how a block's scale is chosen: ``absmax`` (largest |x| maps to the largest
            grid value), ``mean_abs`` (binary, optimal L2 for sign), ``twn`` (ternary weight networks),
            ``signed_absmax`` (integers: the value of largest magnitude maps exactly onto ``qmin``,
            the scale taking the sign that puts it there, so all ``2**bits`` codes are steps of
            ``amax / |qmin|``: llama.cpp's ``Q4_0`` / ``Q5_0`` rule), ``pow2_floor`` (OCP MX: the
            power of two ``2**(floor(log2 amax) - emax)``, ``emax`` the grid's largest exponent;
            values above the grid saturate).
        torch_dtype: ``float`` family: the torch dtype to cast to.
        learner: ``codebook`` / ``vector``: ``kmeans`` or ``quantile``.
        vector_dim: ``vector`` family: sub-vector length.
        scale_dtype: ``None`` (scales kept in float32), or ``torch.float16`` / ``torch.bfloat16``:
            every scale is rounded to that type when chosen, so the codes are computed against the
            scale a runtime that stores 16-bit scales will use (GGUF's blocks, compressed-tensors'
            fp16 checkpoints). Named ``<base>@fp16`` / ``<base>@bf16``, e.g. ``int4@fp16``.
            ``torch.float8_e8m0fnu`` (MX: powers of two, one byte) and ``torch.float8_e4m3fn``
            (NVFP4: e4m3 times one float32 power of two per tensor) are the microscaling formats'
            (``lowbit.codecs.scales``). Scales are stored in this type.
    """

    name: str
    family: str
    bits: int
    signed: bool = True
    qmin: int = 0
    qmax: int = 0
    grid: tuple[float, ...] = ()
    sign_magnitude: bool = False
    scale_rule: str = "absmax"
    torch_dtype: torch.dtype | None = None
    learner: str | None = None
    vector_dim: int = 1
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.family not in families():
            raise ValueError(f"format {self.name!r}: family must be one of {families()}, got {self.family!r}")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"format {self.name!r}: bits must be in 1..16, got {self.bits}")

    @property
    def levels(self) -> int:
        """Number of distinct codes."""
        return 1 << self.bits

    @property
    def grid_values(self) -> tuple[float, ...]:
        """All representable values of a ``grid`` format (before scaling), ascending."""
        if not self.sign_magnitude:
            return self.grid
        return tuple(-v for v in reversed(self.grid[1:])) + self.grid

    @property
    def grid_max(self) -> float:
        """Largest magnitude of the (unscaled) grid."""
        return max(abs(v) for v in self.grid_values)

    @property
    def code_dtype(self) -> torch.dtype:
        """Smallest torch dtype that holds unpacked codes of this format."""
        return codec_for(self).code_dtype(self)

    @property
    def packable(self) -> bool:
        """Whether codes can be bit-packed (everything except the float casts)."""
        return codec_for(self).packable(self)


# --- builders -----------------------------------------------------------------------------------


def int_format(bits: int, signed: bool = True) -> Format:
    """Affine integer format ``intN`` (two's complement range) or ``uintN``.

    >>> int_format(8).qmin, int_format(8, signed=False).qmax
    (-128, 255)
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"integer formats have 1..8 bits, got {bits}")
    if signed:
        return Format(f"int{bits}", "int", bits, True, -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return Format(f"uint{bits}", "int", bits, False, 0, (1 << bits) - 1)


def minifloat_magnitudes(exp_bits: int, man_bits: int, bias: int, max_value: float) -> tuple[float, ...]:
    """Every non-negative finite value of a minifloat, in code order (which is ascending).

    Subnormals (exponent field 0) are included; codes above ``max_value`` (inf / NaN) are not.

    >>> minifloat_magnitudes(2, 1, 1, 6.0)
    (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    """
    values = []
    for code in range(1 << (exp_bits + man_bits)):
        e, m = code >> man_bits, code & ((1 << man_bits) - 1)
        if e == 0:
            v = m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        if v > max_value:
            break
        values.append(v)
    return tuple(values)


def nf4_values() -> tuple[float, ...]:
    """The 16 NormalFloat-4 values (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], exact zero.

    Built like the paper: 8 positive quantiles and 7 negative ones of a standard normal, offset so
    the extreme quantiles are finite, then divided by the largest.
    """
    offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 as in the QLoRA reference construction
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    vals = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    vals = (vals / vals.abs().max()).sort().values
    return tuple(float(v) for v in vals.float())


def log2_format(bits: int) -> Format:
    """Signed powers of two: a sign bit and ``2**(bits-1)`` magnitudes ``{0, 2^-(m-2), ..., 1}``.

    >>> log2_format(3).grid
    (0.0, 0.25, 0.5, 1.0)
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"log2 formats have 2..8 bits, got {bits}")
    count = 1 << (bits - 1)
    mags = (0.0,) + tuple(2.0 ** -(count - 1 - i) for i in range(1, count))
    return Format(f"log2_{bits}", "grid", bits, grid=mags, sign_magnitude=True)


def codebook_format(bits: int, learner: str = "kmeans") -> Format:
    """A grid of ``2**bits`` values learned per block from the data (k-means or quantiles)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"{learner} codebooks have 1..8 bits, got {bits}")
    return Format(f"{learner}_{bits}", "codebook", bits, learner=learner)


def pq_format(bits: int = 8, dim: int = 4) -> Format:
    """Product quantization: sub-vectors of ``dim`` values, ``2**bits`` codewords per sub-space."""
    if not 1 <= bits <= 8 or dim < 1:
        raise ValueError(f"pq needs 1..8 bits and dim >= 1, got bits={bits} dim={dim}")
    return Format(f"pq_{bits}x{dim}", "vector", bits, learner="kmeans", vector_dim=dim)


_E2M1 = minifloat_magnitudes(2, 1, 1, 6.0)
_E4M3 = minifloat_magnitudes(4, 3, 7, 448.0)  # e4m3 "fn": no infinities, the all-ones code is NaN
_E5M2 = minifloat_magnitudes(5, 2, 15, 57344.0)


def _mx(name: str, bits: int, magnitudes: tuple[float, ...]) -> Format:
    return Format(
        name,
        "grid",
        bits,
        grid=magnitudes,
        sign_magnitude=True,
        scale_rule="pow2_floor",
        scale_dtype=torch.float8_e8m0fnu,
    )


_FIXED: dict[str, Format] = {
    "fp16": Format("fp16", "float", 16, torch_dtype=torch.float16),
    "bf16": Format("bf16", "float", 16, torch_dtype=torch.bfloat16),
    "fp8_e4m3": Format("fp8_e4m3", "grid", 8, grid=_E4M3, sign_magnitude=True),
    "fp8_e5m2": Format("fp8_e5m2", "grid", 8, grid=_E5M2, sign_magnitude=True),
    "fp4_e2m1": Format("fp4_e2m1", "grid", 4, grid=_E2M1, sign_magnitude=True),
    "nf4": Format("nf4", "grid", 4, grid=nf4_values()),
    "binary": Format("binary", "grid", 1, grid=(-1.0, 1.0), scale_rule="mean_abs"),
    "ternary": Format("ternary", "grid", 2, grid=(-1.0, 0.0, 1.0), scale_rule="twn"),
    "pq": pq_format(8, 4),
    # OCP Microscaling (MX v1.0): minifloat elements, one e8m0 power of two per block of 32 (the
    # block is the recipe's granularity, group:32); NVFP4: e2m1 elements, an e4m3 scale per 16.
    "mxfp4": _mx("mxfp4", 4, _E2M1),
    "mxfp6_e2m3": _mx("mxfp6_e2m3", 6, minifloat_magnitudes(2, 3, 1, 7.5)),
    "mxfp6_e3m2": _mx("mxfp6_e3m2", 6, minifloat_magnitudes(3, 2, 3, 28.0)),
    "mxfp8": _mx("mxfp8", 8, _E4M3),
    "mxfp8_e5m2": _mx("mxfp8_e5m2", 8, _E5M2),
    "nvfp4": Format("nvfp4", "grid", 4, grid=_E2M1, sign_magnitude=True, scale_dtype=torch.float8_e4m3fn),
    # llama.cpp's Q4_0 / Q5_0 grids: signed codes, the largest magnitude on qmin, fp16 scales.
    "gguf_q4_0": Format(
        "gguf_q4_0", "int", 4, True, -8, 7, scale_rule="signed_absmax", scale_dtype=torch.float16
    ),
    "gguf_q5_0": Format(
        "gguf_q5_0", "int", 5, True, -16, 15, scale_rule="signed_absmax", scale_dtype=torch.float16
    ),
}

_PATTERNS: list[tuple[str, object]] = [
    (r"int([1-8])", lambda m: int_format(int(m[1]), True)),
    (r"uint([1-8])", lambda m: int_format(int(m[1]), False)),
    (r"log2_([2-8])", lambda m: log2_format(int(m[1]))),
    (r"kmeans_([1-8])", lambda m: codebook_format(int(m[1]), "kmeans")),
    (r"quantile_([1-8])", lambda m: codebook_format(int(m[1]), "quantile")),
    (r"pq_([1-8])x([0-9]+)", lambda m: pq_format(int(m[1]), int(m[2]))),
]


# ``<base>@<dtype>``: the base format with its scales rounded to a 16-bit float (see Format.scale_dtype).
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def with_scale_dtype(fmt: Format, scale_dtype: str) -> Format:
    """``fmt`` with 16-bit scales (``"fp16"`` or ``"bf16"``), named ``<name>@<scale_dtype>``.

    >>> with_scale_dtype(get("int4"), "fp16").name
    'int4@fp16'
    """
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
    if fmt.family not in ("int", "grid") or fmt.scale_dtype is not None:
        raise ValueError(
            f"format {fmt.name!r} has no float32 per-block scale to round; 16-bit scales apply to the "
            "integer and fixed-grid formats (int4@fp16, nf4@bf16, ...)"
        )
    return replace(fmt, name=f"{fmt.name}@{scale_dtype}", scale_dtype=SCALE_DTYPES[scale_dtype])


@cache
def get(name: str) -> Format:
    """Look a format up by name.

    >>> get("uint4").qmax
    15
    >>> get("int4@fp16").scale_dtype
    torch.float16
    """
    if not isinstance(name, str):
        raise TypeError(f"format name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if "@" in key:
        base, _, scale_dtype = key.partition("@")
        return with_scale_dtype(get(base), scale_dtype)
    if key in _FIXED:
        return _FIXED[key]
    if key in _REGISTERED:
        return _REGISTERED[key]
    for pattern, build in _PATTERNS:
        m = re.fullmatch(pattern, key)
        if m:
            return build(m)  # type: ignore[operator]
    raise ValueError(f"unknown format {name!r}; known formats: {', '.join(names())}")


def names() -> list[str]:
    """Every format name ``get`` accepts (parametrised families listed at their common sizes).

    >>> "nf4" in names() and "int3" in names()
    True
    """
    out = [f"int{b}" for b in range(1, 9)] + [f"uint{b}" for b in range(1, 9)]
    out += ["binary", "ternary", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4"]
    out += [f"log2_{b}" for b in range(2, 9)]
    out += [f"kmeans_{b}" for b in range(1, 9)] + [f"quantile_{b}" for b in range(1, 9)]
    out += ["pq", "gguf_q4_0", "gguf_q5_0"]
    out += ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8", "mxfp8_e5m2", "nvfp4"]
    return out + list(_REGISTERED)


# Formats added at run time by ``register`` (a codec family defined outside this package).
_REGISTERED: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Make ``get(fmt.name)`` return ``fmt`` (recipes, artifacts and the CLI find formats by name).

    The name must be new and lower case; the family must have a codec (``lowbit.codecs.register``).

    >>> register(get("int4"))
    Traceback (most recent call last):
    ...
    ValueError: format name 'int4' is taken; pick another name
    """
    name = fmt.name
    if name != name.strip().lower() or not name:
        raise ValueError(f"format names are non-empty lower case without spaces, got {name!r}")
    try:
        get(name)
    except ValueError:
        _REGISTERED[name] = fmt
        return fmt
    raise ValueError(f"format name {name!r} is taken; pick another name")


def storage_bits(fmt: Format) -> float:
    """Stored bits per parameter for the codes alone (scales and codebooks not included)."""
    return codec_for(fmt).storage_bits(fmt)
