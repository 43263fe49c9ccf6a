"""The codec registry: a format family defined here, in this file only, works everywhere.

``SqrtCodec`` is a toy family no lowbit file knows about (square-root companding: fine steps near
zero, coarse ones near the block's largest magnitude). Registering it once (``lowbit.codecs.register``
and ``lowbit.formats.register``) must be enough for the primitives, the straight-through gradient,
``QuantizedWeight`` storage, ``lowbit.quantize`` with a recipe naming the format, size accounting
and an artifact round trip.
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
import lowbit.codecs
import lowbit.codecs.base as codec_base
import lowbit.formats as F
from lowbit import packing
from lowbit.codecs import BlockCodec, QParams, codec_for, families, register
from lowbit.granularity import PerGroup, expand_params, to_blocks
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import choose_qparams, dequantize, fake_quantize, quantize
from lowbit.recipes import Recipe, WeightSpec


class SqrtCodec(BlockCodec):
    """``x = scale * sign * (m / M)**2``: a sign bit and ``M = 2**(bits-1) - 1`` magnitudes."""

    family = "sqrt"
    takes_range = True

    def choose_blocks(self, x, xb, fmt, block, symmetric, clip_ratio):  # type: ignore[no-untyped-def]
        return self.range_qparams(x, xb, fmt, block, symmetric, clip_ratio)

    def from_range(self, min_val, max_val, fmt, block, symmetric):  # type: ignore[no-untyped-def]
        amax = torch.maximum(min_val.float().abs(), max_val.float().abs())
        return QParams(amax.clamp(min=1e-12), None, block)

    def encode_blocks(self, xb, fmt, qparams, ndim):  # type: ignore[no-untyped-def]
        top = (1 << (fmt.bits - 1)) - 1
        y = (xb / expand_params(qparams.scale, ndim)).clamp(-1, 1)
        magnitude = torch.round(y.abs().sqrt() * top)
        return torch.where(y < 0, magnitude + (1 << (fmt.bits - 1)), magnitude)

    def decode_blocks(self, cb, fmt, qparams, ndim):  # type: ignore[no-untyped-def]
        half = 1 << (fmt.bits - 1)
        sign = torch.where(cb >= half, -1.0, 1.0)
        magnitude = (cb % half).float() / (half - 1)
        return sign * magnitude.square() * expand_params(qparams.scale, ndim)


@pytest.fixture
def sqrt4():
    """The toy family and its 4-bit format, registered for one test and removed afterwards."""
    register(SqrtCodec())
    fmt = F.register(F.Format("sqrt4", "sqrt", 4))
    yield fmt
    codec_base._REGISTRY.pop("sqrt")
    F._REGISTERED.pop("sqrt4")
    F.get.cache_clear()


def _reference(x: torch.Tensor, group: int, bits: int = 4) -> torch.Tensor:
    """The toy quantizer written out directly, per group of the last dimension."""
    top = (1 << (bits - 1)) - 1
    groups = x.reshape(x.shape[0], -1, group)
    scale = groups.abs().amax(dim=2, keepdim=True)
    levels = torch.round((groups / scale).abs().sqrt() * top)
    return (torch.sign(groups) * (levels / top).square() * scale).reshape(x.shape)


def test_the_toy_family_is_not_built_in_and_unknown_families_are_refused() -> None:
    assert "sqrt" not in F.FAMILIES and "sqrt" not in families()
    with pytest.raises(ValueError, match="family must be one of"):
        F.Format("sqrt4", "sqrt", 4)
    with pytest.raises(ValueError, match="no codec for format family 'sqrt'"):
        codec_for("sqrt")


def test_registering_twice_is_refused(sqrt4: F.Format) -> None:
    with pytest.raises(ValueError, match="already has a codec"):
        register(SqrtCodec())
    with pytest.raises(ValueError, match="is taken"):
        F.register(F.Format("sqrt4", "sqrt", 4))
    with pytest.raises(ValueError, match="already has a codec"):
        register(codec_for("int"))


def test_primitives_use_the_registered_codec(sqrt4: F.Format) -> None:
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    qp = choose_qparams(x, sqrt4, PerGroup(8))
    assert qp.scale.shape == (6, 4)
    codes = quantize(x, sqrt4, qp)
    assert codes.dtype == torch.uint8 == sqrt4.code_dtype and sqrt4.packable
    assert int(codes.max()) < 16
    values = dequantize(codes, sqrt4, qp)
    torch.testing.assert_close(values, _reference(x, 8), rtol=0, atol=1e-6)
    assert F.storage_bits(sqrt4) == 4
    assert sqrt4 is F.get("sqrt4") and "sqrt4" in F.names()


def test_fake_quantize_passes_the_gradient_straight_through(sqrt4: F.Format) -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    qp = choose_qparams(x.detach(), sqrt4, PerGroup(16))
    y = fake_quantize(x, sqrt4, qp)
    torch.testing.assert_close(y.detach(), _reference(x.detach(), 16), rtol=0, atol=1e-6)
    (y * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(16.0).expand(4, 16))


def test_quantized_weight_stores_and_reads_the_toy_codes(sqrt4: F.Format) -> None:
    w = torch.randn(10, 24, generator=torch.Generator().manual_seed(2))
    qw = QuantizedWeight.from_float(w, sqrt4, "group:8")
    assert set(qw.state_dict()) == {"packed", "scale"}
    assert qw.stored_bytes == packing.packed_nbytes(240, 4) + 10 * 3 * 4
    torch.testing.assert_close(qw.dequantize(), _reference(w, 8), rtol=0, atol=1e-6)
    index = torch.tensor([[7, 0], [3, 3]])
    assert torch.equal(qw.dequantize_rows(index), qw.dequantize()[index])
    back = QuantizedWeight.empty(qw.manifest())
    back.load_state_dict(qw.state_dict())
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_a_model_quantized_to_the_toy_format_is_sized_saved_and_loaded(sqrt4: F.Format, tmp_path) -> None:
    def build() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    recipe = Recipe(name="sqrt4-g16", weight=WeightSpec(format="sqrt4", granularity="group:16"))
    q = lowbit.quantize(build(), recipe, progress=False)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        (qw,) = q[0].quantized_weights().values()
        torch.testing.assert_close(qw.dequantize(), _reference(build()[0].weight, 16), rtol=0, atol=1e-6)
        y = q(x)
    report = lowbit.size_report(q)
    weight_bytes = {0: 32 * 16 // 2 + 16 * 2 * 4, 2: 16 * 4 // 2 + 4 * 1 * 4}
    for name, nbytes in weight_bytes.items():
        row = next(r for r in report.layers if r.name == str(name))
        bias = q[name].bias.numel() * 4
        assert row.format == "sqrt4" and row.stored_bytes == nbytes + bias
    lowbit.save(q, tmp_path / "artifact")
    loaded = lowbit.load(tmp_path / "artifact", build())
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert math.isclose(lowbit.size_report(loaded).bits_per_param, report.bits_per_param)


def test_codec_blocks_reach_partial_groups(sqrt4: F.Format) -> None:
    # A group cut short at the end of a row is padded with zeros inside the block view only.
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    qp = choose_qparams(x, sqrt4, PerGroup(4))
    assert qp.scale.shape == (3, 3)
    assert torch.equal(qp.scale, to_blocks(x.abs(), (1, 4)).amax(dim=(1, 3)))
    assert quantize(x, sqrt4, qp).shape == x.shape


def test_primitives_and_storage_never_branch_on_the_family() -> None:
    import lowbit.nn.qweight
    import lowbit.primitives

    for module in (lowbit.primitives, lowbit.nn.qweight):
        assert ".family" not in inspect.getsource(module), module.__name__


def test_codecs_import_only_leaves() -> None:
    # granularity / packing / other codec modules only: never formats, primitives or algorithms
    # (format fields are read through the object passed in; the Format type is a TYPE_CHECKING import).
    allowed = {"lowbit.granularity", "lowbit.packing"}
    for path in sorted(Path(lowbit.codecs.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: the TYPE_CHECKING block is an `if`
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "lowbit":
                names = [f"lowbit.{a.name}" for a in node.names]  # from lowbit import packing
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("lowbit"):
                    assert name in allowed or name.startswith("lowbit.codecs"), f"{path.name} imports {name}"
