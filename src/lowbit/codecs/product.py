"""Product quantization ``pq`` / ``pq_<bits>x<dim>`` (the ``vector`` family): each row is cut into
sub-vectors of ``dim`` columns, and every sub-space (the same columns across all rows) gets its own
codebook of ``2**bits`` codewords learned by k-means. A row is then stored as one codeword index per
sub-space.

Sub-spaces are processed in batches: the nearest codeword of every sub-vector comes from a batched
matmul (``|c|^2 - 2 x.c``, the ``|x|^2`` term does not change the argmin), in blocks small enough to
bound memory (a 4096x4096 weight with dim 4 and 256 codewords would need a 4G-entry distance matrix).

>>> import torch
>>> w = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
>>> codebook = fit_pq(w, bits=4, dim=4)
>>> codebook.shape, encode_pq(w, codebook).shape, decode_pq(encode_pq(w, codebook), codebook, 10).shape
(torch.Size([3, 16, 4]), torch.Size([64, 3]), torch.Size([64, 10]))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lowbit.codecs.base import Codec, QParams, register

if TYPE_CHECKING:
    from lowbit.formats import Format

# Lloyd iterations when fitting: each one is a full nearest-codeword pass, the expensive part.
DEFAULT_ITERS = 10

# Codebooks are fitted on at most this many rows (a fixed random sample); all rows are then encoded.
# With 256 codewords that is 8 sub-vectors per codeword, and it caps the cost for very tall weights.
DEFAULT_MAX_FIT_ROWS = 2048

# Entries of one block of the distance matrix (float32): 4M entries = 16 MB.
_DISTANCE_BLOCK = 1 << 22

_SEED = 0  # fixed so that fitting the same weight twice gives the same codebook


def fit_pq(
    w: torch.Tensor,
    bits: int,
    dim: int,
    iters: int = DEFAULT_ITERS,
    max_fit_rows: int = DEFAULT_MAX_FIT_ROWS,
) -> torch.Tensor:
    """Learn one codebook of ``2**bits`` sub-vectors per sub-space of the ``[rows, cols]`` matrix ``w``.

    The last sub-space is padded with zero columns when ``cols`` is not a multiple of ``dim``.
    Codewords start at randomly chosen rows (fixed seed: deterministic); an empty cluster keeps its
    codeword. With at most ``2**bits`` rows the rows themselves are the codebook (exact).
    Returns float32 ``[ceil(cols / dim), 2**bits, dim]``.

    >>> w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    >>> codebook = fit_pq(w, bits=1, dim=2)
    >>> decode_pq(encode_pq(w, codebook), codebook, 3).tolist()
    [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    """
    if not 1 <= bits <= 16 or dim < 1:
        raise ValueError(f"product quantization needs 1 <= bits <= 16 and dim >= 1, got {bits=} {dim=}")
    if iters < 0 or max_fit_rows < 1:
        raise ValueError(f"need iters >= 0 and max_fit_rows >= 1, got {iters=} {max_fit_rows=}")
    _check_matrix(w, "w")
    n_codewords = 1 << bits
    vectors = _subvectors(w.detach().float(), dim)  # [n_sub, rows, dim]
    n_sub, n_rows, _ = vectors.shape
    if n_rows == 0:
        return torch.zeros(n_sub, n_codewords, dim, device=w.device)
    if n_rows <= n_codewords:
        repeats = math.ceil(n_codewords / n_rows)  # fill the codebook by repeating the rows
        return vectors.repeat(1, repeats, 1)[:, :n_codewords].contiguous()
    generator = torch.Generator().manual_seed(_SEED)
    order = torch.randperm(n_rows, generator=generator).to(w.device)
    fit_vectors = vectors[:, order[: max(max_fit_rows, n_codewords)]]
    codebook = fit_vectors[:, :n_codewords].clone()  # the permutation makes these a random sample
    assignment: torch.Tensor | None = None
    for _ in range(iters):
        new_assignment = _nearest_codewords(fit_vectors, codebook)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break  # same assignment -> same means: converged
        assignment = new_assignment
        codebook = _cluster_means(fit_vectors, assignment, codebook)
    return codebook.contiguous()


def encode_pq(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword for every sub-vector: ``[rows, n_sub]`` (uint8 up to 256 codewords).

    >>> codebook = torch.tensor([[[0.0], [1.0]]])
    >>> encode_pq(torch.tensor([[0.2], [0.9]]), codebook).tolist()
    [[0], [1]]
    """
    _check_matrix(w, "w")
    n_sub, n_codewords, dim = _check_codebook(codebook)
    if math.ceil(w.shape[1] / dim) != n_sub:
        raise ValueError(
            f"w has {w.shape[1]} columns, which make {math.ceil(w.shape[1] / dim)} sub-vectors of {dim}, "
            f"but the codebook has {n_sub} sub-spaces; fit the codebook on a weight of this shape"
        )
    codes = _nearest_codewords(_subvectors(w.detach().float(), dim), codebook.float())
    return codes.t().to(_code_dtype(n_codewords))


def decode_pq(codes: torch.Tensor, codebook: torch.Tensor, cols: int) -> torch.Tensor:
    """Rebuild the ``[rows, cols]`` float32 matrix from codes and codebook (padding columns dropped).

    >>> codebook = torch.tensor([[[0.0, 0.5], [1.0, 1.5]], [[2.0, 9.0], [3.0, 9.0]]])
    >>> decode_pq(torch.tensor([[1, 0]]), codebook, 3).tolist()
    [[1.0, 1.5, 2.0]]
    """
    n_sub, n_codewords, dim = _check_codebook(codebook)
    if codes.dim() != 2 or codes.shape[1] != n_sub:
        raise ValueError(f"codes must be [rows, {n_sub}] for this codebook, got shape {tuple(codes.shape)}")
    if math.ceil(cols / dim) != n_sub:
        raise ValueError(
            f"cols={cols} does not fit a codebook of {n_sub} sub-spaces of {dim} values; pass the "
            "column count of the matrix the codes were made from (a conv weight's flattened in*kh*kw)"
        )
    index = codes.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_codewords):
        raise ValueError(f"codes must lie in 0..{n_codewords - 1}; they do not belong to this codebook")
    sub_index = torch.arange(n_sub, device=codes.device).unsqueeze(0)
    values = codebook.float()[sub_index, index]  # [rows, n_sub, dim]
    return values.reshape(codes.shape[0], n_sub * dim)[:, :cols]


def _check_matrix(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{what} must be a 2-D [rows, cols] matrix, got shape {tuple(w.shape)}")
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what} contains NaN or Inf; clean the tensor before product quantization")


def _check_codebook(codebook: torch.Tensor) -> tuple[int, int, int]:
    if codebook.dim() != 3:
        raise ValueError(f"a codebook is [n_sub, n_codewords, dim], got shape {tuple(codebook.shape)}")
    n_sub, n_codewords, dim = codebook.shape
    return n_sub, n_codewords, dim


def _code_dtype(n_codewords: int) -> torch.dtype:
    if n_codewords <= 256:
        return torch.uint8
    return torch.int16 if n_codewords <= 1 << 15 else torch.int32


def _subvectors(w: torch.Tensor, dim: int) -> torch.Tensor:
    """``[rows, cols]`` -> ``[n_sub, rows, dim]``, zero-padding the columns to a multiple of ``dim``."""
    n_rows, cols = w.shape
    n_sub = math.ceil(cols / dim)
    padded = torch.nn.functional.pad(w, (0, n_sub * dim - cols))
    return padded.reshape(n_rows, n_sub, dim).transpose(0, 1).contiguous()


def _nearest_codewords(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``[n_sub, m, dim]`` and ``[n_sub, K, dim]`` -> ``[n_sub, m]`` index of the nearest codeword.

    Works in blocks of sub-spaces (and of rows when one sub-space alone is too big) so the distance
    block never exceeds ``_DISTANCE_BLOCK`` entries.
    """
    n_sub, n_rows, _ = vectors.shape
    n_codewords = codebook.shape[1]
    out = torch.empty(n_sub, n_rows, dtype=torch.long, device=vectors.device)
    norms = codebook.square().sum(dim=2).unsqueeze(1)  # [n_sub, 1, K]
    transposed = codebook.transpose(1, 2)  # [n_sub, dim, K]
    row_step = max(1, min(n_rows, _DISTANCE_BLOCK // n_codewords))
    sub_step = max(1, _DISTANCE_BLOCK // (row_step * n_codewords))
    for s in range(0, n_sub, sub_step):
        subs = slice(s, s + sub_step)
        for r in range(0, n_rows, row_step):
            rows = slice(r, r + row_step)
            distance = torch.baddbmm(norms[subs], vectors[subs, rows], transposed[subs], alpha=-2)
            out[subs, rows] = distance.argmin(dim=2)
    return out


def _cluster_means(vectors: torch.Tensor, assignment: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of the sub-vectors assigned to each codeword; an empty cluster keeps its codeword."""
    n_sub, n_codewords, dim = previous.shape
    sums = torch.zeros_like(previous).scatter_add_(1, assignment.unsqueeze(2).expand(-1, -1, dim), vectors)
    counts = torch.zeros(n_sub, n_codewords, device=vectors.device)
    counts.scatter_add_(1, assignment, torch.ones_like(assignment, dtype=torch.float32))
    means = sums / counts.clamp(min=1).unsqueeze(2)
    return torch.where(counts.unsqueeze(2) > 0, means, previous)


# --- the codec ------------------------------------------------------------------------------------------


class ProductCodec(Codec):
    """The ``vector`` family: a weight is seen as ``[rows, cols]`` (conv kernels flattened per output
    channel); codes are ``[rows, n_subspaces]``, one codebook ``[n_subspaces, 2**bits, dim]``, no scale.
    ``QParams.block`` is the whole weight's shape (to rebuild the matrix view when decoding)."""

    family = "vector"

    def choose(self, x, fmt, block, symmetric, clip_ratio):  # type: ignore[no-untyped-def]
        codebook = fit_pq(as_matrix(x.float()), fmt.bits, fmt.vector_dim)
        return QParams(torch.ones((), device=x.device), None, tuple(x.shape), codebook)

    def encode(self, x: torch.Tensor, fmt: Format, qparams: QParams) -> torch.Tensor:
        return encode_pq(as_matrix(x.float()), _codebook(qparams, fmt))

    def decode(self, codes: torch.Tensor, fmt: Format, qparams: QParams, dtype: torch.dtype) -> torch.Tensor:
        shape = qparams.block
        cols = as_matrix(torch.empty(shape, device="meta")).shape[1]  # the matrix view encode used
        return decode_pq(codes, _codebook(qparams, fmt), cols).reshape(shape).to(dtype)

    def storage_bits(self, fmt: Format) -> float:
        return fmt.bits / fmt.vector_dim

    def check_weight(self, w: torch.Tensor, fmt: Format, what: str) -> None:
        if w.dim() < 2:
            raise ValueError(
                f"{what}: product quantization needs a 2-D (or conv) weight, got {tuple(w.shape)}"
            )

    def code_count(self, fmt: Format, shape: tuple[int, ...]) -> int:
        rows, cols = matrix_shape(shape)
        return rows * math.ceil(cols / fmt.vector_dim)

    def code_shape(self, fmt: Format, shape: tuple[int, ...]) -> tuple[int, ...]:
        rows, _ = matrix_shape(shape)
        return (rows, -1)

    def param_buffers(self, qparams: QParams, fmt: Format, device: torch.device) -> dict[str, torch.Tensor]:
        out = super().param_buffers(qparams, fmt, device)
        del out["scale"]  # always ones: not stored
        return out

    def expected_params(self, fmt, shape, block, has_zero_point):  # type: ignore[no-untyped-def]
        _, cols = matrix_shape(shape)
        return {"codebook": ((math.ceil(cols / fmt.vector_dim), fmt.levels, fmt.vector_dim), torch.float32)}

    def stored_block(self, fmt: Format, shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def read_rows(self, qw: Any, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        return None  # codebooks are shared by all rows, but codes of a row do not fill whole bytes


def _codebook(qparams: QParams, fmt: Format) -> torch.Tensor:
    if qparams.codebook is None:
        raise ValueError(f"format {fmt.name} needs a codebook in its QParams; call choose_qparams first")
    return qparams.codebook


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """Weights as ``[rows, cols]`` (convolution kernels flattened per output channel).

    >>> as_matrix(torch.zeros(8, 3, 3, 3)).shape
    torch.Size([8, 27])
    """
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(1, -1)
    # Not reshape(rows, -1): with zero rows the column count would be ambiguous.
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of a weight seen as a matrix (``as_matrix``'s shape, without a tensor)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


register(ProductCodec())
