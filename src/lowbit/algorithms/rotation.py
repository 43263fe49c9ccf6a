"""Randomized Hadamard rotations: spread outliers across channels before quantizing (QuaRot).

A linear layer computes ``x W^T``; for any orthogonal ``R`` it equals ``(x R)(W R)^T``. Quantizing
``x R`` and ``W R`` instead of ``x`` and ``W`` changes nothing in float, but a rotation mixes every
channel into every other, so the few large activation channels of a transformer (and the large
weights) are spread thin: per-token 4-bit activations stop being dominated by one outlier.

``R = D (Q kron H)``: ``D`` random signs, ``H`` the normalised Sylvester Hadamard matrix of the
largest power of two ``p`` dividing the width ``n`` (applied as a fast Walsh-Hadamard transform,
``n log p`` operations), ``Q`` a random orthogonal matrix of the odd part ``m = n / p`` (identity
when ``n`` is a power of two). Everything is drawn from ``seed``, and the signs and ``Q`` are
stored, so a loaded artifact applies exactly the rotation its weights were quantized with.

>>> import torch
>>> rot = HadamardRotation.random(12, seed=0)
>>> x = torch.randn(3, 12)
>>> torch.allclose(rot(x), x @ rot.matrix(), atol=1e-6), torch.allclose(rot.matrix() @ rot.matrix().T,
...     torch.eye(12), atol=1e-6)
(True, True)
"""

from __future__ import annotations

import torch
from torch import nn


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(p)`` along the last dimension (``p``, a power of two), Sylvester order.

    >>> walsh_hadamard(torch.tensor([1.0, 0.0, 0.0, 0.0])).tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"a Walsh-Hadamard transform needs a power-of-two width, got {p}")
    lead = x.shape[:-1]
    h = 1
    while h < p:
        pairs = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return x * (p**-0.5)


class HadamardRotation(nn.Module):
    """``x -> x R`` along the last dimension (see the module docstring); buffers ``signs`` ``[n]``
    (+1 / -1) and ``odd`` ``[m, m]`` (orthogonal)."""

    def __init__(self, signs: torch.Tensor, odd: torch.Tensor) -> None:
        super().__init__()
        n, m = signs.numel(), odd.shape[0]
        if odd.shape != (m, m) or n % m or (n // m) & (n // m - 1):
            raise ValueError(
                f"rotation of width {n}: the odd factor {tuple(odd.shape)} must be square, n / m a power of 2"
            )
        self.register_buffer("signs", signs.detach().float().reshape(n).clone())
        self.register_buffer("odd", odd.detach().float().clone())

    @classmethod
    def random(cls, n: int, seed: int = 0) -> HadamardRotation:
        """A rotation of width ``n`` drawn from ``seed`` (the same on every machine)."""
        if n < 1:
            raise ValueError(f"rotation width must be >= 1, got {n}")
        p = n & -n  # largest power of two dividing n
        m = n // p
        g = torch.Generator().manual_seed(int(seed))
        signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        odd = torch.eye(1)
        if m > 1:
            q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
            odd = (q * torch.sign(torch.diagonal(r))).float()  # sign-fixed: a unique Q per draw
        return cls(signs, odd)

    @classmethod
    def empty(cls, n: int, m: int) -> HadamardRotation:
        """Shapes only (buffers filled by ``load_state_dict`` when an artifact is loaded)."""
        return cls(torch.ones(n), torch.eye(m))

    @property
    def size(self) -> int:
        return self.signs.numel()

    @property
    def odd_size(self) -> int:
        return self.odd.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.odd_size
        p = self.size // m
        y = x * self.signs.to(x.dtype)
        y = walsh_hadamard(y.reshape(*x.shape[:-1], m, p))
        if m > 1:
            y = torch.einsum("...jb,ji->...ib", y, self.odd.to(x.dtype))
        return y.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """The dense ``[n, n]`` matrix ``R`` (``forward(x) == x @ R``)."""
        return self(torch.eye(self.size, device=self.signs.device))

    def check(self, what: str) -> None:
        """Raise ``ValueError`` naming ``what`` unless the buffers describe a rotation (signs
        +-1, an orthogonal odd factor): a file's values are checked before they are used."""
        if not torch.all(self.signs.abs() == 1):
            raise ValueError(f"{what}: rotation signs must be +1 or -1")
        eye = torch.eye(self.odd_size, device=self.odd.device)
        if not torch.isfinite(self.odd).all() or (self.odd @ self.odd.T - eye).abs().max() > 1e-4:
            raise ValueError(f"{what}: the rotation's odd factor is not orthogonal")

    def extra_repr(self) -> str:
        return f"size={self.size}, odd={self.odd_size}"
