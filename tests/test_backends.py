"""Execution backends: every kernel against the reference path, the chooser, the cache, fallbacks."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends import BACKENDS, by_name, use_kernels
from lowbit.backends import choose as chooser
from lowbit.doctor import CpuFeatures, cpu_features
from lowbit.recipes import ActivationSpec, Recipe, WeightSpec


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)


def _mlp(in_features: int = 64, hidden: int = 96, out: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out)).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


_DYN = ActivationSpec(mode="dynamic", format="uint8", granularity="token", symmetric=False)
_DYN_TENSOR = dataclasses.replace(_DYN, granularity="tensor")
_STATIC = ActivationSpec(mode="static", format="uint8", granularity="tensor", symmetric=False)
CASES = [
    ("torch-int-mm", Recipe(weight=WeightSpec(format="int8"), activation=_DYN)),
    ("torch-int-mm", Recipe(weight=WeightSpec(format="int8"), activation=_DYN_TENSOR)),
    ("torch-int-mm", Recipe(weight=WeightSpec(format="int8"), activation=_STATIC)),
    ("fbgemm-dynamic", Recipe(weight=WeightSpec(format="int8"), activation=_DYN_TENSOR)),
    ("torch-int8pack-bf16", Recipe(weight=WeightSpec(format="int8"))),
    ("torch-int8pack-bf16", Recipe(weight=WeightSpec(format="int4", granularity="channel"))),
    ("torch-int4pack-bf16", Recipe(weight=WeightSpec(format="uint4", granularity="group:32", symmetric=False))),  # noqa: E501
    ("torch-int4pack-bf16", Recipe(weight=WeightSpec(format="int4", granularity="group:64"))),
    ("torch-int4pack-bf16", Recipe(weight=WeightSpec(format="uint4", granularity="group:128", symmetric=False))),  # noqa: E501
]


@pytest.mark.parametrize(("backend", "recipe"), CASES, ids=[f"{b}-{i}" for i, (b, _) in enumerate(CASES)])
def test_each_backend_matches_the_reference_path(backend, recipe):
    reason = by_name(backend).unavailable(cpu_features())
    if reason:
        pytest.skip(reason)
    model = _mlp(128, 128, 64)
    calib = [torch.randn(16, 128) for _ in range(4)]
    q = lowbit.quantize(model, recipe, calibration=calib, progress=False, kernels="reference")
    x = torch.randn(3, 5, 128)  # a leading batch dimension: kernels flatten and restore it
    with torch.no_grad():
        ref = q(x)
        choices = use_kernels(q, backend)
        assert [c.backend for c in choices] == [backend, backend], [c.reason for c in choices]
        assert {m.backend for m in (q[0], q[2])} == {backend}
        fast = q(x)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    with torch.no_grad():  # export and evaluate deep-copy models: kernels must survive that
        assert torch.equal(copy.deepcopy(q)(x), fast)
    error = _rel(fast, ref)
    assert error <= by_name(backend).tolerance, error
    if backend == "torch-int-mm":
        assert error < 1e-5  # integer sums are exact: only the float rescale rounds differently


def test_int_mm_is_exact_at_batch_one_and_with_smoothing():
    model = _mlp(64, 64, 64)
    calib = [torch.randn(8, 64) * torch.linspace(0.1, 5, 64) for _ in range(4)]
    recipe = Recipe(weight=WeightSpec(format="int8"), activation=_DYN, smoothquant_alpha=0.5)
    q = lowbit.quantize(model, recipe, calibration=calib, progress=False, kernels="reference")
    assert getattr(q[0], "input_smooth", None) is not None
    x = torch.randn(1, 64) * torch.linspace(0.1, 5, 64)
    with torch.no_grad():
        ref = q(x)
        use_kernels(q, "torch-int-mm")
        assert _rel(q(x), ref) < 1e-5


def test_shapes_a_kernel_cannot_run_keep_the_reference_path():
    # in_features 40: int8pack reads K in blocks of 16; out_features 24: int4pack wants N % 16 == 0.
    q8 = lowbit.quantize(_mlp(40, 32, 16), "int8-weight-only", progress=False, kernels="reference")
    choices = use_kernels(q8, "torch-int8pack-bf16")
    assert choices[0].backend == "reference" and "divisible by 16" in choices[0].reason
    assert choices[1].backend == "torch-int8pack-bf16"
    q4 = lowbit.quantize(_mlp(64, 24, 16), "int4-weight-only", progress=False, kernels="reference")
    choices = use_kernels(q4, "torch-int4pack-bf16")
    assert choices[0].backend == "reference" and "out_features by 16" in choices[0].reason


def test_kernels_run_inference_only_and_follow_the_device():
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False, kernels="torch-int-mm")
    layer = q[0]
    assert layer.backend == "torch-int-mm"
    x = torch.randn(4, 64, requires_grad=True)
    assert layer.run_kernel(x) is None  # autograd recording: the differentiable reference path runs
    y = q(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.run_kernel(torch.randn(4, 64, dtype=torch.float64).to("meta")) is None  # other device


def test_new_weights_drop_a_stale_kernel():
    q = lowbit.quantize(_mlp(), "int8-weight-only", progress=False, kernels="torch-int8pack-bf16")
    assert q[0].backend == "torch-int8pack-bf16"
    q.load_state_dict(q.state_dict())
    assert q[0].backend == "reference"


def test_auto_measures_once_then_reads_the_cache(monkeypatch):
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False)  # kernels="auto"
    chosen = [c.backend for c in q.lowbit_kernels]
    path = chooser._cache_path()
    entries = json.loads(path.read_text())["entries"]
    assert entries and all(set(e) >= {"ms", "reference_ms", "error"} for e in entries.values())
    for c in q.lowbit_kernels:  # the winner is the fastest accurate candidate, and beats the reference
        if c.backend != "reference":
            best = min(c.timings_ms, key=lambda b: chooser._geomean(c.timings_ms[b]))
            assert best == c.backend
    monkeypatch.setattr(chooser, "measure", lambda *a: pytest.fail("measured again despite the cache"))
    again = use_kernels(q)
    assert [c.backend for c in again] == chosen


def test_a_corrupt_cache_is_ignored_and_rewritten():
    path = chooser._cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False)
    assert q.lowbit_kernels and json.loads(path.read_text())["version"] == chooser.CACHE_VERSION


AVX2_ONLY = CpuFeatures(arch="x86_64", model="mock AVX2 CPU", cores=2, avx2=True)


def test_an_avx2_only_cpu_gets_what_is_fastest_there(monkeypatch):
    """With the probe mocked to AVX2 without VNNI / BF16: bf16 kernels are refused, and the measured
    timings decide between the integer kernels and the reference path."""
    monkeypatch.setattr(chooser, "cpu_features", lambda: AVX2_ONLY)
    table = {row["name"]: row["available"] for row in chooser.backend_table(AVX2_ONLY)}
    assert "bfloat16" in table["torch-int8pack-bf16"] and "bfloat16" in table["torch-int4pack-bf16"]
    assert table["torch-int-mm"] == "yes"

    # AVX2 timings as measured on such a machine: u8 x s8 GEMMs slower than the float path for int-mm,
    # fbgemm's AVX2 kernel faster.
    def fake(backend, layer):
        slow = {"torch-int-mm": [3.0, 9.0], "fbgemm-dynamic": [0.1, 0.3]}.get(backend.name, [5.0, 9.0])
        return {"ms": slow, "reference_ms": [1.0, 2.0], "error": 0.0}

    monkeypatch.setattr(chooser, "measure", fake)
    per_tensor = Recipe(weight=WeightSpec(format="int8"), activation=_DYN_TENSOR)
    q = lowbit.quantize(_mlp(), per_tensor, progress=False)
    assert [c.backend for c in q.lowbit_kernels] == ["fbgemm-dynamic"] * 2
    q = lowbit.quantize(_mlp(), Recipe(weight=WeightSpec(format="int8"), activation=_DYN), progress=False)
    assert [c.backend for c in q.lowbit_kernels] == ["reference"] * 2  # int-mm only, and slower there
    assert "not faster" in q.lowbit_kernels[0].reason
    q = lowbit.quantize(_mlp(), "int8-weight-only", progress=False)
    assert [c.backend for c in q.lowbit_kernels] == ["reference"] * 2  # lowbit-q8-cpu slower there
    reason = q.lowbit_kernels[0].reason  # bf16 kernels refused; lowbit's own (if built) measured slower
    assert "bfloat16" in reason or "not faster" in reason


def test_an_inaccurate_kernel_is_refused(monkeypatch):
    def fake(backend, layer):
        return {"ms": [0.01, 0.01], "reference_ms": [1.0, 1.0], "error": 0.5}

    monkeypatch.setattr(chooser, "measure", fake)
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False)
    assert q[0].backend == "reference" and "tolerance" in q.lowbit_kernels[0].reason


def test_reference_policy_and_environment_switch(monkeypatch):
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False, kernels="reference")
    assert {c.backend for c in q.lowbit_kernels} == {"reference"}
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    q = lowbit.quantize(_mlp(), "int8-dynamic", progress=False)
    assert q[0].backend == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        use_kernels(q, "no-such-kernel")


def test_loaded_artifact_gets_kernels_and_matches(tmp_path):
    model = _mlp(128, 128, 64)
    q = lowbit.quantize(model, "int4-weight-only", progress=False, kernels="reference")
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = q(x)
    lowbit.save(q, tmp_path / "art")
    from lowbit.export.artifact import read_manifest

    layers = read_manifest(tmp_path / "art")["layers"].values()
    assert all(e.get("backend", "reference") == "reference" for e in layers)  # machine-independent
    loaded = lowbit.load(tmp_path / "art", _mlp(128, 128, 64))
    backends = {c.backend for c in loaded.lowbit_kernels}
    with torch.no_grad():
        out = loaded(x)
    tolerance = max([by_name(b).tolerance for b in backends if b != "reference"], default=0.0)
    assert _rel(out, ref) <= max(tolerance, 1e-6)


def test_doctor_lists_every_backend():
    from lowbit.doctor import doctor

    report = doctor()
    assert [b["name"] for b in report.backends] == [b.name for b in BACKENDS]
    text = report.to_text()
    assert all(b.name in text for b in BACKENDS)
