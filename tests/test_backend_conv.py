"""The static int8 conv backend (oneDNN) against the reference path, and BatchNorm folding.

Every conv shape here was first run in a subprocess (an unsupported shape could crash the
process rather than raise); the backend refuses what is not covered.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.backends import use_kernels
from lowbit.backends.choose import measure
from lowbit.backends.conv import ONEDNN_QCONV
from lowbit.doctor import cpu_features
from lowbit.ptq.fold import find_conv_batchnorm, fold_batchnorm

UNAVAILABLE = ONEDNN_QCONV.unavailable(cpu_features())
needs_onednn = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def _static(model: nn.Module, shape: tuple[int, ...], gen: torch.Generator, **kw) -> nn.Module:
    calib = [torch.randn(shape, generator=gen).relu() - 0.2 for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration samples: warned about, irrelevant here
        return lowbit.quantize(model.eval(), "int8-static", calib, progress=False, kernels="reference", **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


CONVS = {
    "3x3 odd channels": (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 9, 9)),
    "stride 2 no bias": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), (1, 8, 11, 11)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 9, 9)),
    "groups + dilation": (lambda: nn.Conv2d(16, 32, 3, stride=2, dilation=2, groups=4), (1, 16, 13, 13)),
    "non-square": (lambda: nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=2), (1, 4, 9, 7)),
    "1x1 odd": (lambda: nn.Conv2d(7, 9, 1), (3, 7, 5, 5)),
    "padding same": (lambda: nn.Conv2d(4, 4, 5, padding="same"), (1, 4, 8, 8)),
    "padding valid": (lambda: nn.Conv2d(4, 6, 2, padding="valid"), (1, 4, 8, 8)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 20)),
    "conv1d strided grouped": (lambda: nn.Conv1d(6, 9, 5, stride=3, padding=2, groups=3), (1, 6, 31)),
}


@needs_onednn
@pytest.mark.parametrize("case", sorted(CONVS))
def test_forced_backend_matches_reference(case: str, gen: torch.Generator) -> None:
    build, shape = CONVS[case]
    torch.manual_seed(0)
    q = _static(nn.Sequential(build()), shape, gen)
    x = torch.randn(shape, generator=gen).relu() - 0.2
    with torch.inference_mode():
        ref = q(x)
        [choice] = use_kernels(q, "onednn-qconv")
        assert choice.backend == "onednn-qconv", choice.reason
        assert q[0].backend == "onednn-qconv"
        fast = q(x)
    assert fast.shape == ref.shape
    assert _rel(fast, ref) < ONEDNN_QCONV.tolerance
    # The next layer may read it as NCHW: values, not only the layout, must match.
    assert torch.allclose(fast.contiguous(), ref, atol=1e-4, rtol=1e-4)


@needs_onednn
def test_measure_times_a_conv_at_its_calibrated_size(gen: torch.Generator) -> None:
    q = _static(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), (2, 3, 12, 10), gen)
    assert q[0].last_input_size == (12, 10)
    entry = measure(ONEDNN_QCONV, q[0])
    assert entry["error"] < ONEDNN_QCONV.tolerance
    assert len(entry["ms"]) == len(entry["reference_ms"]) == 2


def test_refuses_what_it_does_not_compute_exactly(gen: torch.Generator) -> None:
    conv = nn.Sequential(nn.Conv2d(4, 4, 4, padding="same"))  # even kernel: PyTorch pads asymmetrically
    q = _static(conv, (1, 4, 8, 8), gen)
    assert "padding" in ONEDNN_QCONV.unsupported(q[0])
    plain = nn.Sequential(nn.Conv2d(4, 4, 3))
    calib = [torch.randn(1, 4, 8, 8, generator=gen)]
    dynamic = lowbit.quantize(plain, "int8-dynamic", calib, progress=False, kernels="reference")
    assert "static" in ONEDNN_QCONV.unsupported(dynamic[0])
    weight_only = lowbit.quantize(plain, "int8-weight-only", progress=False, kernels="reference")
    assert "weight-only" in ONEDNN_QCONV.unsupported(weight_only[0])
    int4 = lowbit.quantize(plain, "int4-weight-only", progress=False, kernels="reference")
    assert ONEDNN_QCONV.unsupported(int4[0]) is not None
    # Forcing it on a layer it refuses leaves that layer on the reference path, with the reason.
    [choice] = use_kernels(q, "onednn-qconv")
    assert choice.backend == "reference" and "padding" in choice.reason


def test_unavailable_says_why_on_a_cpu_without_vnni() -> None:
    from dataclasses import replace

    avx2_only = replace(cpu_features(), arch="x86_64", avx2=True, avx512=False, vnni=False, amx=False)
    reason = ONEDNN_QCONV.unavailable(avx2_only)
    assert reason is not None and ("VNNI" in reason or "oneDNN" in reason or "onednn" in reason)
    arm = replace(cpu_features(), arch="aarch64")
    assert ONEDNN_QCONV.unavailable(arm) is not None


# --- BatchNorm folding ------------------------------------------------------------------------------


class HeldOut(nn.Module):
    """Not the benchmark's ResNet: a conv -> bn -> relu chain, a conv whose output also feeds a
    residual (must not fold), a 1-D branch, a grouped conv, BatchNorm after a pool (not a conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.a_norm = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b_norm = nn.BatchNorm2d(8)
        self.pool_norm = nn.BatchNorm2d(8)
        self.line = nn.Conv1d(8, 4, 3)
        self.line_norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a_norm(self.a(x)))
        z = self.b(y)
        y = self.b_norm(z) + z  # b's output has two users
        y = self.pool_norm(F.max_pool2d(y, 2))
        return self.line_norm(self.line(y.mean(dim=2)))


def _trained_stats(model: nn.Module, shape: tuple[int, ...], gen: torch.Generator) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape, generator=gen) * 2 + 0.5)
    return model.eval()


def test_fold_is_derived_from_structure(gen: torch.Generator) -> None:
    model = _trained_stats(HeldOut(), (4, 3, 8, 8), gen)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    assert find_conv_batchnorm(model) == {"a_norm": "a", "line_norm": "line"}
    folded, pairs = fold_batchnorm(model, x)
    assert pairs == {"a_norm": "a", "line_norm": "line"}
    assert isinstance(folded.a_norm, nn.Identity) and isinstance(model.a_norm, nn.BatchNorm2d)
    assert folded.a.bias is not None and model.a.bias is None  # the original is untouched
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-4)


class Untraceable(nn.Module):
    """Data-dependent control flow: ``torch.fx`` cannot trace it, forward hooks can follow it."""

    def __init__(self, reuse: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.norm = nn.BatchNorm2d(6)
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if float(x.sum()) > -1e9:  # always true, but a traced proxy has no value
            out = self.norm(y)
        return out + y if self.reuse else out


def test_fold_falls_back_to_hooks_and_checks_the_result(gen: torch.Generator) -> None:
    x = torch.randn(2, 3, 8, 8, generator=gen)
    model = _trained_stats(Untraceable(), (4, 3, 8, 8), gen)
    assert find_conv_batchnorm(model) == {}  # no trace, no example: nothing found
    folded, pairs = fold_batchnorm(model, x)
    assert pairs == {"norm": "conv"}
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-4)
    # Hooks cannot see the conv output's second user; the output check refuses the fold.
    reused = _trained_stats(Untraceable(reuse=True), (4, 3, 8, 8), gen)
    with pytest.warns(UserWarning, match="left unfolded"):
        same, pairs = fold_batchnorm(reused, x)
    assert pairs == {} and same is reused and isinstance(reused.norm, nn.BatchNorm2d)


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def test_static_quantize_folds_and_the_artifact_remembers(gen: torch.Generator, tmp_path) -> None:
    model = _trained_stats(_block(), (4, 3, 12, 12), gen)
    q = _static(model, (2, 3, 12, 12), gen)
    assert q.lowbit_folded == {"1": "0", "4": "3"}
    assert isinstance(model[1], nn.BatchNorm2d)  # the caller's model is not folded
    assert not q.lowbit_fidelity.findings()  # layers compared with the folded float convs
    unfolded = _static(model, (2, 3, 12, 12), gen, fold_bn=False)
    assert not hasattr(unfolded, "lowbit_folded") and isinstance(unfolded[1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 12, 12, generator=gen)
    lowbit.save(q, tmp_path / "art")
    loaded = lowbit.load(tmp_path / "art", _block(), kernels="reference")
    assert isinstance(loaded[1], nn.Identity) and loaded.lowbit_folded == q.lowbit_folded
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    wrong = nn.Sequential(*[nn.ReLU() if i == 1 else m for i, m in enumerate(_block())])
    with pytest.raises(ValueError, match="folded BatchNorm '1'"):
        lowbit.load(tmp_path / "art", wrong)


def test_onnx_export_of_a_folded_static_cnn_runs_qlinearconv(gen: torch.Generator, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lowbit.export.onnx import export_onnx

    model = _trained_stats(_block(), (4, 3, 12, 12), gen)

    def qlinearconvs(q: nn.Module, name: str) -> int:
        path = tmp_path / f"{name}.onnx"
        export_onnx(q, path, torch.randn(1, 3, 12, 12, generator=gen))
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "QLinearConv" for n in onnx.load(opts.optimized_model_filepath).graph.node)

    # ORT fuses DQ -> Conv -> (Relu) -> Q: the first conv, whose output feeds the second's
    # quantized input; the second feeds a float pool, so it stays a float Conv on int8 weights.
    assert qlinearconvs(_static(model, (2, 3, 12, 12), gen), "folded") == 1
    assert qlinearconvs(_static(model, (2, 3, 12, 12), gen, fold_bn=False), "unfolded") == 0
