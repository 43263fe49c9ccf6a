"""lowbit's own C++ int4 / int8 CPU kernels: every instruction-set path against an exact torch
reference of the same arithmetic, and against the layer's reference path within the tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends import qcpu, use_kernels
from lowbit.recipes import Recipe, WeightSpec

pytestmark = pytest.mark.skipif(
    not qcpu.available(), reason=f"lowbit's C++ kernel is not built here: {qcpu._build()[1]}"
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))


def _quantized_x(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block symmetric int8 activations, as the kernel computes them: (codes, scale per block)."""
    m, k = x.shape
    xb = x.reshape(m, k // block, block)
    d = xb.abs().amax(-1) / 127
    q = torch.where(d[..., None] == 0, torch.zeros_like(xb), torch.round(xb / d[..., None]))
    return q, d


def _exact_q8(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    qw = layer.qweight
    n, k = qw.shape
    block = 64 if k % 64 == 0 else 32
    q, d = _quantized_x(x, block)
    w = qw.codes().reshape(n, k).double().reshape(n, k // block, block)
    dots = torch.einsum("mbj,nbj->mnb", q.double(), w)  # exact integer sums
    return (dots * d.double()[:, None, :]).sum(-1) * qw.scale.double().reshape(-1)


def _exact_q4(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    codes, scale, _, group = qcpu.q4_params(layer)
    n, k = codes.shape
    block = qcpu.block_size(group)
    q, d = _quantized_x(x, block)
    zp = layer.qweight.zero_point.double().reshape(n, k // group) - layer.qweight.fmt.qmin
    wq = codes.double().reshape(n, k // group, group) - zp[..., None]  # (code - zero) exact
    w = wq.reshape(n, k // block, block)
    dots = torch.einsum("mbj,nbj->mnb", q.double(), w) * d.double()[:, None, :]
    per_group = dots.reshape(x.shape[0], n, k // group, group // block).sum(-1)
    return (per_group * scale.double()[None]).sum(-1)


def _layer(recipe: str | Recipe, n: int, k: int) -> nn.Module:
    torch.manual_seed(n * 7 + k)
    q = lowbit.quantize(nn.Sequential(nn.Linear(k, n)), recipe, progress=False, kernels="reference")
    return q[0]


ISAS = {"scalar": 0, "avx2": 1, "avx512-vnni": 2}
# (out, in, rows): decode rows (1-4, the VNNI decode path) and tiles, out not a multiple of the
# four-row quads the kernel stores, in_features in blocks of 64 and of 32
SHAPES = [(1, 64, 1), (24, 128, 3), (7, 256, 17), (64, 192, 8), (6, 320, 1), (13, 96, 2), (9, 128, 4)]


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize(("n", "k", "m"), SHAPES)
def test_q8_is_exact_on_every_path(isa, n, k, m):
    ext = qcpu.extension()
    if ISAS[isa] > ISAS.get(ext.isa(), 0) and isa != ext.isa():
        pytest.skip(f"this CPU runs {ext.isa()}")
    layer = _layer("int8-weight-only", n, k)
    kernel = qcpu.Q8_CPU.prepare(layer)
    x = torch.randn(m, k) * torch.linspace(0.1, 3, k)
    ext.force_isa(ISAS[isa])
    try:
        got = kernel(x).double()
    finally:
        ext.force_isa(-1)
    exact = _exact_q8(layer, x)
    assert float((got - exact).abs().max()) <= 1e-4 * float(exact.abs().max())
    ref = layer.reference_forward(x) - layer.bias
    assert float((got.float() - ref).norm() / ref.norm()) < qcpu.Q8_CPU.tolerance


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize(
    ("fmt", "group", "symmetric"), [("uint4", 64, False), ("uint4", 32, False), ("int4", 128, True)]
)
def test_q4_is_exact_on_every_path(isa, fmt, group, symmetric):
    ext = qcpu.extension()
    if ISAS[isa] > ISAS.get(ext.isa(), 0) and isa != ext.isa():
        pytest.skip(f"this CPU runs {ext.isa()}")
    recipe = Recipe(weight=WeightSpec(format=fmt, granularity=f"group:{group}", symmetric=symmetric))
    for n, k, m in [(5, 256, 1), (33, 512, 9), (10, 384, 2), (7, 256, 4), (3, 128, 3)]:
        layer = _layer(recipe, n, k)
        if not symmetric:
            kernel = qcpu.Q4_CPU.prepare(layer)
            x = torch.randn(m, k)
            ext.force_isa(ISAS[isa])
            try:
                got = kernel(x).double()
            finally:
                ext.force_isa(-1)
            exact = _exact_q4(layer, x)
            assert float((got - exact).abs().max()) <= 1e-4 * float(exact.abs().max())
        x = torch.randn(m, k)
        ref = layer.reference_forward(x) - layer.bias
        got = qcpu.Q4_CPU.prepare(layer)(x)
        assert float((got - ref).norm() / ref.norm()) < qcpu.Q4_CPU.tolerance


def test_shapes_it_cannot_run_are_refused():
    assert "divisible by 32" in qcpu.Q8_CPU.unsupported(_layer("int8-weight-only", 8, 40))
    assert "groups" in qcpu.Q4_CPU.unsupported(_layer(Recipe(weight=WeightSpec(format="int4")), 8, 64))
    assert "weight-only" in qcpu.Q8_CPU.unsupported(_layer("int8-dynamic", 8, 64))


def test_forced_through_use_kernels_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128)).eval()
    q = lowbit.quantize(model, "int4-weight-only", progress=False, kernels="reference")
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        ref = q(x)
        assert {c.backend for c in use_kernels(q, "lowbit-q4-cpu")} == {"lowbit-q4-cpu"}
        got = q(x)
    assert got.shape == ref.shape and float((got - ref).norm() / ref.norm()) < 0.03
    with torch.no_grad():  # deep copies (export, evaluate) keep working kernels
        assert torch.equal(copy.deepcopy(q)(x), got)


def test_a_build_lock_left_by_an_interrupted_build_is_removed(tmp_path, monkeypatch, capsys) -> None:
    """torch's build baton outlives a killed build; left there, every later build waits forever."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(qcpu, "_ext_dir", lambda: tmp_path)
    baton = tmp_path / qcpu._ext_name() / "lock"
    baton.parent.mkdir(parents=True)
    baton.touch()
    seen = []

    def fake_load(name, sources, **kwargs):
        seen.append(baton.exists())
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    module, why = qcpu._build.__wrapped__()
    assert (module, why, seen) == ("module", None, [False])
    assert "stale build lock" in capsys.readouterr().err
