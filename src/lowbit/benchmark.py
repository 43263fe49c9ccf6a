"""``lowbit bench``: real kernels side by side in one run, on the same inputs, median of repeats.

Rows: float PyTorch, float ONNX Runtime, ORT's own ``quantize_dynamic`` (int8, per channel), the
deprecated ``torch.ao`` dynamic quantization (where present), lowbit's int8 and int4 exports. Each
row is timed in the same interleaved loop (so machine noise hits all rows alike), and reported as
latency, speed-up over float ORT, fidelity (cosine to the float model, or accuracy) and file size.
A kernel table compares one 4096x4096 linear layer in every lowbit kernel against fp32, with the
ratio to what the hardware allows (bytes ratio at 1 row, int8 compute ratio at 64 rows).

>>> report = bench("digits-mlp", batch_sizes=(8,), repeats=3, kernels=False)  # doctest: +SKIP
>>> print(report.to_markdown())  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.eval.latency import backend_of, is_real_kernel
from lowbit.recipes import ActivationSpec, Recipe, WeightSpec
from lowbit.recipes.spec import LayerRule

_TOKEN = ActivationSpec(mode="dynamic", format="int8", granularity="token", symmetric=True)
_TENSOR = ActivationSpec(mode="dynamic", format="uint8", granularity="tensor", symmetric=False)


ENCODER_INT4 = Recipe(
    name="int4-weight-only-linear",
    description="uint4 weights, groups of 64 with zero points; int8 embedding rows",
    weight=WeightSpec(format="uint4", granularity="group:64", symmetric=False, algorithm="mse"),
    modules=("linear", "embedding"),
    overrides=(LayerRule(pattern="*embeddings*", weight=WeightSpec(format="int8")),),
)


BENCH_COLUMNS = ["variant", "batch", "latency", "vs ORT fp32", "vs torch fp32", "fidelity", "size", "backend"]
KERNEL_COLUMNS = ["kernel", "rows", "latency", "vs fp32 ORT", "limit", "of limit"]


@dataclass
class BenchRow:
    """One model variant at one batch size."""

    name: str
    batch: int
    latency_ms: float
    speedup: float | None  # vs float ONNX Runtime in the same run
    fidelity: float | None
    metric: str
    size_mb: float | None
    backend: str
    note: str = ""
    speedup_torch: float | None = None  # vs PyTorch fp32 in the same run


@dataclass
class KernelRow:
    """One 4096x4096 linear kernel at ``rows`` input rows."""

    kernel: str
    rows: int
    latency_ms: float
    speedup: float  # vs fp32 ORT MatMul, same run
    limit: float | None  # what the hardware allows: bytes ratio (1 row) or int8 compute ratio (64 rows)
    note: str = ""

    @property
    def of_limit(self) -> float | None:
        return None if not self.limit else self.speedup / self.limit


@dataclass
class BenchReport:
    """Results of :func:`bench`; ``to_markdown()`` for humans, ``to_dict()`` for JSON."""

    model: str
    threads: int
    repeats: int
    cpu: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    kernels: list[KernelRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "threads": self.threads,
            "repeats": self.repeats,
            "cpu": self.cpu,
            "rows": [asdict(r) for r in self.rows],
            "kernels": [asdict(k) | {"of_limit": k.of_limit} for k in self.kernels],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        from lowbit.report.table import markdown_table

        cpu = self.cpu
        flags = ", ".join(k for k in ("avx2", "avx512", "vnni", "amx", "neon") if cpu.get(k)) or "none"
        rows = [
            [
                r.name + (f" — {r.note}" if r.note else ""),
                str(r.batch),
                f"{r.latency_ms:.2f} ms",
                "" if r.speedup is None else f"{r.speedup:.2f}x",
                "" if r.speedup_torch is None else f"{r.speedup_torch:.2f}x",
                "" if r.fidelity is None else f"{r.fidelity:.4f} ({r.metric})",
                "" if r.size_mb is None else f"{r.size_mb:.1f} MB",
                r.backend,
            ]
            for r in self.rows
        ]
        out = [
            f"## lowbit bench {self.model}",
            "",
            f"CPU: {cpu.get('model')} ({flags}), {self.threads} threads; median of {self.repeats} "
            "interleaved repeats; speed-ups are against float ONNX Runtime and float PyTorch in the same "
            "run (none for the reference path: a simulation, not a kernel).",
            "",
            markdown_table(BENCH_COLUMNS, rows),
        ]
        if self.kernels:
            kernel_rows = [
                [
                    k.kernel + (f" ({k.note})" if k.note else ""),
                    str(k.rows),
                    f"{k.latency_ms:.3f} ms",
                    f"{k.speedup:.2f}x",
                    "" if k.limit is None else f"{k.limit:.2f}x",
                    "" if k.of_limit is None else f"{k.of_limit * 100:.0f}%",
                ]
                for k in self.kernels
            ]
            out += [
                "",
                "Kernel table: one 4096x4096 linear. Limit = fp32 bytes / stored bytes at 1 row "
                "(memory-bound), int8 vs fp32 peak compute at 64 rows.",
                "",
                markdown_table(KERNEL_COLUMNS, kernel_rows),
            ]
        out += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(out).rstrip() + "\n"


# --- timing -----------------------------------------------------------------------------------------

# Untimed pause after each timed call: longer than PyTorch's OpenMP spin-wait after a call (~10 ms).
SETTLE_SECONDS = 0.02


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2, settle: float = 0.0
) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin so that load changes on a
    shared machine affect every entry alike.

    A call can slow the next one: PyTorch's OpenMP workers keep spinning ~10 ms after a call
    returns (measured here), taking a core from whatever runs next. So the round starts one entry
    later each repeat (no entry always follows the same neighbour), and ``settle`` seconds of
    sleep, untimed, follow every call.

    >>> t = time_interleaved({"noop": lambda: None}, repeats=3)
    >>> t["noop"] >= 0
    True
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
            if settle:
                time.sleep(settle)
    return {name: statistics.median(s) for name, s in samples.items()}


# --- model variants -----------------------------------------------------------------------------------


@dataclass
class _Variant:
    name: str
    backend: str
    run: Callable[[Any], torch.Tensor]  # batch -> output tensor
    prepare: Callable[[Any], Any]  # batch -> what ``call`` takes (feeds), done outside the timing
    call: Callable[[Any], Any]
    size_bytes: int | None
    note: str = ""
    path: Path | None = None  # the ONNX file, for rows that run one


def _slice(batch: Any, n: int) -> Any:
    if isinstance(batch, dict):
        return {k: v[:n] for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v[:n] for v in batch)
    return batch[:n]


def _batch_rows(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0])


def _torch_variant(name: str, model: nn.Module, backend: str, size: int | None, note: str = "") -> _Variant:
    from lowbit.eval.metrics import output_tensor
    from lowbit.zoo import call_model

    def run(batch: Any) -> torch.Tensor:
        with torch.no_grad():
            return output_tensor(call_model(model, batch)).float()

    return _Variant(name, backend, run, lambda b: b, run, size, note)


def _ort_variant(name: str, path: Path, threads: int, note: str = "") -> _Variant:
    from lowbit.runtime import OrtModel

    # No spinning: in an interleaved loop, one session's spinning workers would steal the cores
    # from the next variant (PyTorch included) and distort every ratio.
    m = OrtModel(path, threads=threads, spin=False)
    return _Variant(
        name, m.backend, lambda b: m(b) if isinstance(b, dict) else m(b), m.feeds, m.run_feeds,
        path.stat().st_size, note, path,
    )  # fmt: skip


def _openvino_variant(name: str, path: Path, threads: int, example: Any) -> _Variant:
    """The same ONNX file in OpenVINO (f32 precision), fed through ORT's input conversion."""
    from lowbit.eval.openvino import OpenVinoModel
    from lowbit.runtime import OrtModel

    feeder = OrtModel(path, threads=1, spin=False)
    ov = OpenVinoModel(path, threads)
    ov.check(feeder.feeds(example))

    def run(batch: Any) -> torch.Tensor:
        return torch.from_numpy(ov.run_feeds(feeder.feeds(batch))[0])

    return _Variant(name, ov.backend, run, feeder.feeds, ov.run_feeds, path.stat().st_size)


def _add_openvino(variants: list[_Variant], notes: list[str], threads: int, example: Any) -> None:
    """OpenVINO rows beside every ONNX Runtime row, when OpenVINO is installed."""
    from lowbit.eval.openvino import OpenVinoModel

    if not OpenVinoModel.available():
        notes.append("OpenVINO rows: not installed (pip install openvino)")
        return
    for v in [v for v in variants if v.backend == "onnxruntime-cpu" and v.path is not None]:
        if "quantize_dynamic" in v.name:
            continue  # ORT's own tool's graph: compared in ORT only
        name = "OpenVINO " + v.name.removeprefix("ORT ")
        try:
            variants.append(_openvino_variant(name, v.path, threads, example))
        except Exception as err:  # OpenVINO refusing a graph (contrib ops) is a finding, not a crash
            last = (str(err).strip().splitlines() or [type(err).__name__])[-1][:160]
            notes.append(f"{name}: OpenVINO cannot run this graph ({last})")


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _recipes_for(zm: Any) -> tuple[Recipe | str, Recipe | str]:
    """(int8, int4) recipes: for text models the ``int8-dynamic`` preset (with calibration data it
    measures which layers take per-tensor activations, ``lowbit.ptq.activation_plan``), presets
    otherwise."""
    if isinstance(zm.calibration[0] if zm.calibration else None, dict):
        return "int8-dynamic", ENCODER_INT4
    return "int8-static", "int4-weight-only"


def _build_variants(
    zm: Any, workdir: Path, threads: int, example: Any, recipes: list[Any] | None = None
) -> tuple[list[_Variant], list[str]]:
    import lowbit
    from lowbit.export.onnx import export_onnx
    from lowbit.export.onnx_lower import ExportOptions

    notes: list[str] = []
    model = zm.model
    variants = [_torch_variant("PyTorch fp32", model, "torch-cpu", _param_bytes(model))]
    fp32_path = workdir / "fp32.onnx"
    # Plain float graph (no contrib-op fusions): ORT's quantize_dynamic needs standard ops to type
    # its inputs, and ORT's session optimizer fuses GELU in float graphs by itself.
    export_onnx(model, fp32_path, example, options=ExportOptions(transformer_fusions=False))
    variants.append(_ort_variant("ORT fp32", fp32_path, threads))
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        ortq = workdir / "ort_quantize_dynamic.onnx"
        quantize_dynamic(str(fp32_path), str(ortq), per_channel=True, weight_type=QuantType.QInt8)
        variants.append(_ort_variant("ORT quantize_dynamic int8 per-channel", ortq, threads))
    except Exception as err:  # a third-party tool failing is reported, not fatal
        notes.append(f"ORT quantize_dynamic failed: {type(err).__name__}: {err}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated: that is the point
            from torch.ao.quantization import quantize_dynamic as ao_dynamic

            ao = ao_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        variants.append(_torch_variant("torch.ao dynamic int8 (deprecated)", ao, "torch-fbgemm", None))
    except Exception as err:
        notes.append(f"torch.ao dynamic quantization unavailable: {type(err).__name__}")
    int8, int4 = _recipes_for(zm)
    chosen = [("lowbit int8", int8), ("lowbit int4 weight-only", int4)]
    if recipes:
        chosen = [("lowbit", r) for r in recipes]
    for label, recipe in chosen:
        q = lowbit.quantize(model, recipe, calibration=zm.calibration, progress=False)
        name = recipe if isinstance(recipe, str) else recipe.name
        variants.append(_torch_variant(f"{label} ({name}), PyTorch", q, backend_of(q), _param_bytes(q)))
        path = workdir / f"{label.replace(' ', '_')}_{Path(str(name)).stem}.onnx"
        report = export_onnx(q, path, example)
        fallback = f"; {len(report.fallbacks)} layer(s) float" if report.fallbacks else ""
        variants.append(_ort_variant(f"{label} ({name})", path, threads, note=fallback.lstrip("; ")))
    _add_openvino(variants, notes, threads, example)
    return variants, notes


def _fidelity(zm: Any, variant: _Variant, reference: list[torch.Tensor] | None) -> tuple[float | None, str]:
    from lowbit.eval.metrics import cosine_per_row

    if not zm.eval_data:
        return None, ""
    if zm.metric == "accuracy":
        correct = total = 0
        for inputs, labels in zm.eval_data:
            correct += int((variant.run(inputs).argmax(-1) == labels).sum())
            total += labels.numel()
        return correct / max(total, 1), "accuracy"
    outs = [variant.run(b) for b in zm.eval_inputs()]
    assert reference is not None
    return float(cosine_per_row(reference, outs).mean()), "cosine"


def bench(
    model_spec: str = "minilm",
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 20,
    threads: int | None = None,
    kernels: bool = True,
    workdir: str | Path | None = None,
    recipes: list[str | Recipe] | None = None,
    out: str | Path | None = None,
) -> BenchReport:
    """Benchmark ``model_spec`` (zoo name or HF dir) in every runtime, one interleaved run.

    Batches are the first ``b`` rows of the model's first evaluation batch (same inputs for every
    variant). Fidelity uses all evaluation data. ``kernels=True`` adds the 4096x4096 kernel table.
    ``recipes`` replaces lowbit's default int8 / int4 rows; ``out`` (a directory) receives
    ``<model>.md`` and ``<model>.json``.

    >>> r = bench("digits-mlp", batch_sizes=(4,), repeats=2, kernels=False)  # doctest: +SKIP
    >>> [row.name for row in r.rows][:2]  # doctest: +SKIP
    ['PyTorch fp32', 'ORT fp32']
    """
    from lowbit.doctor import cpu_features
    from lowbit.runtime import default_threads
    from lowbit.zoo import load_model

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    zm = load_model(model_spec)
    inputs = zm.eval_inputs() or list(zm.calibration)
    if not inputs:
        raise ValueError(f"model {model_spec!r} comes without data; bench needs example batches")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        variants, notes = _build_variants(zm, work, threads, inputs[0], recipes)
        report = BenchReport(str(model_spec), threads, repeats, asdict(cpu_features()), notes=notes)
        reference = None
        if zm.metric != "accuracy" and zm.eval_data:
            reference = [variants[0].run(b) for b in zm.eval_inputs()]
        fid = {v.name: _fidelity(zm, v, reference) for v in variants}
        for bs in batch_sizes:
            batch = _slice(inputs[0], bs)
            feeds = {v.name: v.prepare(batch) for v in variants}
            calls = {v.name: (lambda v=v, f=feeds[v.name]: v.call(f)) for v in variants}
            times = time_interleaved(calls, repeats, settle=SETTLE_SECONDS)
            base, torch_base = times.get("ORT fp32"), times[variants[0].name]
            for v in variants:
                f, metric = fid[v.name]
                real = is_real_kernel(v.backend)
                report.rows.append(
                    BenchRow(
                        v.name, _batch_rows(batch), times[v.name] * 1e3,
                        None if base is None or not real else base / times[v.name], f, metric,
                        None if v.size_bytes is None else v.size_bytes / 1e6, v.backend, v.note,
                        torch_base / times[v.name] if real else None,
                    )
                )  # fmt: skip
        if kernels:
            report.kernels = kernel_table(threads=threads, repeats=repeats, workdir=work)
    if out is not None:
        import json

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(str(model_spec)).name
        (folder / f"{stem}.md").write_text(report.to_markdown())
        (folder / f"{stem}.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


# --- kernel table ---------------------------------------------------------------------------------------


def kernel_table(
    size: int = 4096, rows: tuple[int, ...] = (1, 64), repeats: int = 20, threads: int | None = None,
    workdir: str | Path | None = None,
) -> list[KernelRow]:  # fmt: skip
    """One ``size x size`` linear in fp32 and in every lowbit ORT kernel, timed interleaved.

    >>> rows = kernel_table(size=256, rows=(1,), repeats=2)  # doctest: +SKIP
    """
    import lowbit
    from lowbit.doctor import cpu_features
    from lowbit.export.onnx import export_onnx
    from lowbit.runtime import default_threads

    threads = threads or default_threads()
    feats = cpu_features()
    compute_limit = 4.0 if feats.vnni or feats.amx else (2.0 if feats.avx2 or feats.neon else 1.0)
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(size, size, bias=False)).eval()  # quantize() skips a bare root
    int8 = WeightSpec(format="int8")
    specs: dict[str, Recipe | None] = {
        "fp32 MatMul": None,
        "int8 dynamic per-tensor (DynamicQuantizeMatMul)": Recipe(weight=int8, activation=_TENSOR),
        "int8 dynamic per-token (MatMulIntegerToFloat)": Recipe(weight=int8, activation=_TOKEN),
        "int8 weight-only (MatMulNBits)": Recipe(weight=int8),
        "int4 weight-only g32 (MatMulNBits)": Recipe(weight=WeightSpec("uint4", "group:32", symmetric=False)),
        "int2 weight-only g32 (MatMulNBits)": Recipe(weight=WeightSpec("uint2", "group:32", symmetric=False)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp) / "kernels"
        work.mkdir(parents=True, exist_ok=True)
        models, stored = {}, {}
        from lowbit.runtime import OrtModel

        for i, (name, recipe) in enumerate(specs.items()):
            model = layer if recipe is None else lowbit.quantize(layer, recipe, progress=False)
            path = work / f"k{i}.onnx"
            export_onnx(model, path, torch.randn(rows[0], size))
            models[name] = OrtModel(path, threads=threads, spin=False)
            stored[name] = size * size * 4 if recipe is None else lowbit.size_report(model).stored_bytes
        fbgemm = _fbgemm_linear(layer[0])
        out: list[KernelRow] = []
        for n in rows:
            x = torch.randn(n, size)
            fns = {}
            for name, m in models.items():
                feeds = m.feeds(x)
                fns[name] = lambda m=m, f=feeds: m.run_feeds(f)
            if fbgemm is not None:
                fns["torch fbgemm int8 dynamic (reference)"] = lambda x=x: fbgemm(x)
                stored.setdefault("torch fbgemm int8 dynamic (reference)", size * size + size * 8)
            times = time_interleaved(fns, repeats, settle=SETTLE_SECONDS)
            base = times["fp32 MatMul"]
            for name, t in times.items():
                is_int_compute = "dynamic" in name or "weight-only" in name
                limit = (
                    (size * size * 4 / stored[name]) if n == 1 else (compute_limit if is_int_compute else 1.0)
                )
                out.append(KernelRow(name, n, t * 1e3, base / t, None if name.startswith("fp32") else limit))
    return out


def _fbgemm_linear(layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """PyTorch's fbgemm dynamic int8 linear, as a reference point (None where it is unavailable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynLinear

            q = DynLinear.from_float(_with_qconfig(layer))
        q(torch.randn(1, layer.in_features))
    except Exception:
        return None

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return q(x)

    return run


def _with_qconfig(layer: nn.Linear) -> nn.Linear:
    from torch.ao.quantization import default_dynamic_qconfig

    copy = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    copy.load_state_dict(layer.state_dict())
    layer = copy
    layer.qconfig = default_dynamic_qconfig  # type: ignore[assignment]
    return layer


__all__ = [
    "ENCODER_INT4", "BenchReport", "BenchRow", "KernelRow", "bench", "kernel_table",
    "time_interleaved",
]  # fmt: skip
