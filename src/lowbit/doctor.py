"""``lowbit doctor``: what this machine can run fast, and what a model / recipe / artifact will get.

>>> feats = cpu_features()
>>> isinstance(feats.avx2, bool) and isinstance(feats.vnni, bool)
True
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CpuFeatures:
    """Instruction-set features that decide which integer kernels are fast here."""

    arch: str
    model: str
    cores: int
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # AVX512-VNNI or AVX-VNNI: u8 x s8 dot products accumulate in 32 bits
    amx: bool = False
    bf16: bool = False  # native bfloat16 dot products (AVX512-BF16, AMX-BF16, Arm BF16)
    neon: bool = False
    dotprod: bool = False  # Arm SDOT/UDOT

    @property
    def int8_saturates(self) -> bool:
        """x86 with AVX2 but no VNNI: u8 x s8 goes through ``vpmaddubsw``, whose 16-bit pair sums
        saturate for large weights; lowbit then exports int8 weights as u8 + 128 (u8u8 kernel)."""
        return self.arch in ("x86_64", "amd64") and self.avx2 and not self.vnni

    @property
    def int8_speedup_expected(self) -> bool:
        """Whether int8 GEMMs are meaningfully faster than fp32 here (VNNI, AMX or Arm dot products)."""
        return self.vnni or self.amx or self.dotprod


@cache
def cpu_features() -> CpuFeatures:
    """Read CPU features from ``/proc/cpuinfo`` (Linux); other systems report what ``platform`` knows.

    >>> cpu_features().cores >= 1
    True
    """
    arch = platform.machine().lower()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    flags: set[str] = set()
    model = platform.processor() or arch
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "model name" and model in ("", arch):
            model = value.strip()
    return CpuFeatures(
        arch=arch,
        model=model,
        cores=cores,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni=bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags),
        amx=bool({"amx_int8", "amx_tile"} & flags),
        bf16=bool({"avx512_bf16", "amx_bf16", "bf16"} & flags),
        neon=arch in ("aarch64", "arm64") or "asimd" in flags or "neon" in flags,
        dotprod="asimddp" in flags,
    )


# --- per-layer kernels ------------------------------------------------------------------------------


@dataclass
class LayerAdvice:
    """The runtime kernel one layer gets (``lowbit.export.onnx_lower.choose_kernel``)."""

    name: str
    kind: str
    kernel: str
    precision: str
    note: str = ""


@dataclass
class DoctorReport:
    """What ``doctor`` found; ``to_text()`` for humans, ``to_dict()`` for JSON."""

    cpu: CpuFeatures
    runtimes: dict[str, str]
    target: str | None = None
    recipe: str | None = None
    layers: list[LayerAdvice] = field(default_factory=list)
    artifact: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    backends: list[dict[str, str]] = field(default_factory=list)  # PyTorch kernels here (backend_table)
    torch_kernels: dict[str, int] = field(default_factory=dict)  # target's layers per PyTorch backend

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu": asdict(self.cpu) | {"int8_saturates": self.cpu.int8_saturates},
            "runtimes": dict(self.runtimes),
            "backends": list(self.backends),
            "torch_kernels": dict(self.torch_kernels),
            "target": self.target,
            "recipe": self.recipe,
            "layers": [asdict(x) for x in self.layers],
            "artifact": self.artifact,
            "warnings": list(self.warnings),
        }

    def to_text(self) -> str:
        c = self.cpu
        feats = [n for n in ("avx2", "avx512", "vnni", "bf16", "amx", "neon", "dotprod") if getattr(c, n)]
        lines = [
            f"CPU: {c.model} ({c.arch}), {c.cores} usable cores; features: {', '.join(feats) or 'none'}",
            "int8 GEMM: " + (
                "fast (32-bit dot-product instructions)" if c.int8_speedup_expected
                else "u8 x s8 may saturate (AVX2 without VNNI): int8 weights export as u8u8"
                if c.int8_saturates else "no integer dot-product instructions: expect little int8 speed-up"
            ),
            "runtimes: " + ", ".join(f"{k} {v}" for k, v in self.runtimes.items()),
        ]  # fmt: skip
        if self.backends:
            lines.append("PyTorch kernels on this machine (lowbit.backends; the reference path otherwise):")
            width = max(len(b["name"]) for b in self.backends)
            for b in self.backends:
                state = "available" if b["available"] == "yes" else f"unavailable: {b['available']}"
                lines.append(f"  {b['name']:<{width}}  {b['kind']:<6}  {state}; {b['numerics']}")
        if self.target:
            lines.append(f"target: {self.target}" + (f" with recipe {self.recipe}" if self.recipe else ""))
        if self.layers:
            counts: dict[str, int] = {}
            for layer in self.layers:
                key = f"{layer.kernel} ({layer.precision})"
                counts[key] = counts.get(key, 0) + 1
            lines.append("kernels per layer:")
            lines += [f"  {n:4d} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
            lines += [f"  float: {x.name}: {x.note}" for x in self.layers if x.precision == "float"][:20]
        if self.torch_kernels:
            lines.append("PyTorch kernels per layer (measured on this machine):")
            lines += [f"  {n:4d} x {k}" for k, n in sorted(self.torch_kernels.items(), key=lambda kv: -kv[1])]
        art = self.artifact or {}
        if "manifest" in art:
            m = art["manifest"]
            stored, bpp = m.get("stored_bytes", 0) / 1e6, m.get("bits_per_param", 0)
            lines.append(f"artifact: {stored:.2f} MB stored, {bpp:.2f} bits/param")
        if "onnx" in art:
            o = art["onnx"]
            bpp = f", {o['bits_per_param']:.2f} bits/param" if "bits_per_param" in o else ""
            lines.append(f"ONNX: {o['file']} {o['stored_bytes'] / 1e6:.2f} MB of weights{bpp}")
            lines.append(f"ONNX Runtime integer ops: {o['integer_ops'] or 'none'}")
            lines.append(f"ONNX Runtime float compute ops: {o['float_ops'] or 'none'}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _runtimes() -> dict[str, str]:
    out = {}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = "missing (pip install onnxruntime)"
    import torch

    out["torch"] = torch.__version__
    out["torch quantized engines"] = "/".join(torch.backends.quantized.supported_engines)
    return out


def _advise(layers: list[LayerAdvice], cpu: CpuFeatures) -> list[str]:
    """Warnings for layers or recipes that will not be faster here."""
    out = []
    floats = [x for x in layers if x.precision == "float"]
    if floats:
        out.append(
            f"{len(floats)} of {len(layers)} quantized layer(s) run in float in ONNX Runtime (smaller "
            "file, no speed-up): "
            + ", ".join(x.name for x in floats[:8])
            + ("..." if len(floats) > 8 else "")
        )
    int8_compute = [x for x in layers if x.kernel in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QDQ")]
    if int8_compute and not cpu.int8_speedup_expected:
        out.append(
            "this CPU has no VNNI / AMX / Arm dot product: int8 GEMMs gain ~1.3x at best over fp32 on "
            "compute-bound batches; weight-only int4/int8 helps most at batch 1"
        )
    if any(x.kernel == "fp16-storage" for x in layers):
        out.append("fp16 weights halve the file but compute in fp32: not faster on CPU")
    nbits = [x for x in layers if x.kernel == "MatMulNBits"]
    if nbits:
        out.append(
            "MatMulNBits (weight-only) is memory-bound-friendly: expect gains at small batches; at large "
            "batches it is close to fp32 speed"
        )
    return out


def layer_kernels(qmodel: Any) -> list[LayerAdvice]:
    """Kernel of every quantized layer of a quantized model.

    >>> import torch, lowbit
    >>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "int8-dynamic", progress=False)
    >>> [(x.kernel, x.precision) for x in layer_kernels(q)]
    [('MatMulIntegerToFloat', 'int8')]
    """
    from lowbit.export.onnx_lower import choose_kernel
    from lowbit.nn.base import QuantizedModule
    from lowbit.nn.layers import QuantizedRNN

    out = []
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantizedRNN):
            out.append(LayerAdvice(name, m.kind, m.config["mode"], "float", "ONNX float recurrent op"))
        elif isinstance(m, QuantizedModule):
            k = choose_kernel(m)
            out.append(LayerAdvice(name, m.kind, k.name, k.precision, k.note))
    return out


def _kernels_from_manifest(manifest: dict[str, Any]) -> list[LayerAdvice]:
    """Predict kernels from an artifact's manifest alone (stub layers, zero-filled storage)."""
    from lowbit.nn.layers import QuantizedConv, QuantizedEmbedding, QuantizedLinear
    from lowbit.nn.qweight import QuantizedWeight
    from lowbit.recipes import ActivationSpec

    out = []
    for name, entry in manifest["layers"].items():
        kind, config = entry["kind"], entry.get("config", {})
        if kind == "rnn":
            out.append(LayerAdvice(name, kind, config.get("mode", "RNN"), "float", "ONNX float recurrent op"))
            continue
        qw = QuantizedWeight.empty(entry["weights"]["qweight"], "meta")
        if kind == "linear":
            layer: Any = QuantizedLinear(config["in_features"], config["out_features"], qw, None)
        elif kind == "conv":
            layer = QuantizedConv(config, qw, None)
        else:
            layer = QuantizedEmbedding(config["num_embeddings"], config["embedding_dim"], None, qw)
        act = entry.get("activation")
        if act:
            keys = ("mode", "format", "granularity", "symmetric", "observer")
            layer.set_activation(ActivationSpec(**{k: act[k] for k in keys if k in act}), name)
        from lowbit.export.onnx_lower import choose_kernel

        k = choose_kernel(layer)
        out.append(LayerAdvice(name, kind, k.name, k.precision, k.note))
    return out


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Bits per parameter stored in an exported model, and the ops ONNX Runtime actually runs
    (after its graph optimisations) split into integer and float compute.

    >>> import torch, lowbit, tempfile, os
    >>> from lowbit.export.onnx import export_onnx
    >>> q = lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "int8-dynamic", progress=False)
    >>> p = os.path.join(tempfile.mkdtemp(), "m.onnx"); _ = export_onnx(q, p, torch.randn(1, 64))
    >>> inspect_onnx(p)["integer_ops"]
    {'MatMulIntegerToFloat': 1}
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    from lowbit.export.onnx import FLOAT_COMPUTE_OPS, INTEGER_OPS

    path = Path(path)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    stored = sum(len(t.raw_data) or 0 for t in model.graph.initializer)
    params = int(meta.get("lowbit.params", 0))
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    ops: dict[str, int] = {}
    for node in optimized.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    out: dict[str, Any] = {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "stored_bytes": stored,
        "integer_ops": {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS},
        "float_ops": {k: v for k, v in sorted(ops.items()) if k in FLOAT_COMPUTE_OPS},
    }
    if params:
        out["parameters"] = params
        out["bits_per_param"] = stored * 8 / params
    return out


def doctor(target: str | None = None, recipe: str | Any = "int8-dynamic") -> DoctorReport:
    """Check this machine, and what ``target`` gets with ``recipe``.

    ``target``: ``None`` (machine only), a model (zoo name, Hugging Face directory,
    ``package.module:factory``: kernels per layer for ``recipe``, before quantizing), an artifact
    directory from ``lowbit.save`` (kernels from its manifest, bits/param stored) or an exported
    ``.onnx`` file / a directory holding ``model.onnx`` (ops that run integer vs float).

    >>> report = doctor()
    >>> "CPU:" in report.to_text()
    True
    >>> doctor("digits-mlp", "nf4").warnings[0].startswith("2 of 2")  # doctest: +SKIP
    True
    """
    from lowbit.backends.choose import backend_table

    cpu = cpu_features()
    report = DoctorReport(cpu=cpu, runtimes=_runtimes(), target=target, backends=backend_table(cpu))
    if target is None:
        return report
    path = Path(target).expanduser()
    onnx_file = path if path.suffix == ".onnx" else path / "model.onnx"
    if path.is_dir() and ((path / "lowbit.json").is_file() or (path / "lowbit.json.xz").is_file()):
        from lowbit.export.artifact import read_manifest

        manifest = read_manifest(path)
        report.layers = _kernels_from_manifest(manifest)
        report.artifact = {"manifest": dict(manifest.get("totals", {}))}
        report.recipe = (manifest.get("recipe") or {}).get("name")
    elif path.suffix == ".onnx" and not path.is_file():
        raise ValueError(f"{path} does not exist; export a model first (lowbit export)")
    if onnx_file.is_file():
        report.artifact = (report.artifact or {}) | {"onnx": inspect_onnx(onnx_file)}
        if not report.layers:
            import onnx

            meta = {
                p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props
            }
            import json

            report.layers = [
                LayerAdvice(x["name"], x["kind"], x["kernel"], x["precision"], x.get("note", ""))
                for x in json.loads(meta.get("lowbit.layers", "[]"))
            ]
        integer_ops = report.artifact["onnx"]["integer_ops"]
        if not integer_ops:
            report.warnings.append("no integer op runs in this ONNX model: it will not be faster than float")
        qdq = sum(1 for x in report.layers if x.kernel == "QDQ")
        fused = sum(n for op, n in integer_ops.items() if op in ("QLinearConv", "QGemm", "QLinearMatMul"))
        fused += integer_ops.get("MatMulIntegerToFloat", 0)
        if qdq and fused < qdq:
            report.warnings.append(
                f"ONNX Runtime fused {fused} of {qdq} Q/DQ layers into integer ops; the others run in "
                "float (typically a layer with no quantized consumer, such as the last classifier)"
            )
    elif not report.layers:
        report.recipe, report.layers, report.torch_kernels = _plan_kernels(target, recipe)
    report.warnings += _advise(report.layers, cpu)
    return report


def _plan_kernels(target: str, recipe: Any) -> tuple[str, list[LayerAdvice], dict[str, int]]:
    """Kernels a model would get with ``recipe``, without calibrating (RTN weights, no data): ONNX
    Runtime's per layer, and PyTorch's per layer when the recipe needs no calibration."""
    import dataclasses

    import lowbit
    from lowbit.recipes import resolve
    from lowbit.zoo import load_model

    r = resolve(recipe)
    zm = load_model(target)
    fast = dataclasses.replace(
        r,
        weight=None if r.weight is None else dataclasses.replace(r.weight, algorithm="rtn"),
        smoothquant_alpha=None,
        bias_correction=False,
        overrides=tuple(
            dataclasses.replace(o, weight=dataclasses.replace(o.weight, algorithm="rtn")) if o.weight else o
            for o in r.overrides
        ),
    )
    prepared = lowbit.prepare(zm.model, fast)  # observers only: no calibration needed to read kernels
    torch_kernels: dict[str, int] = {}
    if not fast.needs_calibration and fast.embeddings_and_head == "recipe":
        quantized = lowbit.quantize(zm.model, fast, progress=False)
        for choice in quantized.lowbit_kernels:
            torch_kernels[choice.backend] = torch_kernels.get(choice.backend, 0) + 1
    return r.name, layer_kernels(prepared), torch_kernels


__all__ = [
    "CpuFeatures",
    "DoctorReport",
    "LayerAdvice",
    "cpu_features",
    "doctor",
    "inspect_onnx",
    "layer_kernels",
]
