"""Verbs that write or read a quantized model on disk: ``quantize``, ``inspect`` and ``export``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.common import BAD_INPUT, CliError, _optional, _out, _progress
from lowbit.cli.inputs import (
    _calibration,
    _check_output_dir,
    _checkpoint_calibration,
    _model,
    _quantize,
    _quantized,
    _recipe,
    _save,
)


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.ptq.distributed import is_writer
    from lowbit.size import size_report

    recipe = _recipe(args.recipe)
    out = _check_output_dir(args.output, args.force)
    if args.max_memory is not None or args.onload:
        return _quantize_checkpoint(args, recipe, out)
    zm = _model(args.model)
    qmodel = _quantize(zm, recipe, _calibration(args, zm))
    report = size_report(qmodel)
    manifest = _save(qmodel, out)
    if not is_writer():
        return 0  # rank 0 wrote the artifact and reports it
    quantized = [r for r in report.layers if r.kind != "float"]
    kept = next((r.parameters for r in report.layers if r.kind == "float"), 0)
    text = (
        f"saved {out}/ ({manifest['file']['bytes']:,} bytes in {manifest['file']['name']}, "
        f"float32 tensors: {report.float_bytes:,}): {len(quantized)} layers as {recipe.name}, "
        f"{report.bits_per_param:.2f} bits/param, {kept:,} parameters kept float\n"
        f"next: lowbit inspect {out}   |   lowbit eval {args.model} --artifact {out}"
    )
    _out(
        args,
        text,
        {"path": str(out), "recipe": recipe.name, "file": manifest["file"], "totals": manifest["totals"]},
    )
    return 0


def _quantize_checkpoint(args: argparse.Namespace, recipe: Any, out: Path) -> int:
    """``lowbit quantize DIR --max-memory SIZE``: onloading (``lowbit.quantize_checkpoint``)."""
    from lowbit.ptq.onload import quantize_checkpoint
    from lowbit.ptq.preflight import human, parse_bytes

    path = Path(args.model).expanduser()
    if not path.is_dir():
        raise CliError(
            f"--max-memory / --onload read a Hugging Face checkpoint directory; {args.model} is not one",
            2,
        )
    try:
        budget = parse_bytes(args.max_memory) if args.max_memory is not None else None
    except ValueError as err:
        raise CliError(f"--max-memory: {err}", 2) from None
    try:
        done = quantize_checkpoint(
            path, recipe, _checkpoint_calibration(args, path), out, max_memory=budget, progress=_progress()
        )
    except BAD_INPUT as err:  # a bad checkpoint, budget, recipe or data: one line, exit 2
        raise CliError(str(err), 2) from None
    except ValueError as err:
        raise CliError(f"quantization failed: {err}", 1) from None
    assert done.manifest is not None
    manifest = done.manifest
    text = (
        f"saved {out}/ ({manifest['file']['bytes']:,} bytes in {manifest['file']['name']}): {path} onloaded "
        f"as {recipe.name}, {manifest['totals']['bits_per_param']:.2f} bits/param; peak memory "
        f"{human(done.peak_memory_bytes)} (predicted {human(done.preflight.peak_bytes)})\n"
        f"next: lowbit inspect {out}"
    )
    data = {
        "path": str(out),
        "recipe": recipe.name,
        "file": manifest["file"],
        "totals": manifest["totals"],
        "peak_memory_bytes": done.peak_memory_bytes,
        "predicted_peak_bytes": done.preflight.peak_bytes,
    }
    _out(args, text, data)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.eval.artifact_info import inspect_artifact
    from lowbit.export.artifact import ArtifactError
    from lowbit.report import text_table

    path = Path(args.dir)
    if path.is_file() and path.suffix == ".gguf":
        return _inspect_gguf(args, path)
    if not path.is_dir():
        raise CliError(
            f"artifact directory {path} does not exist; give the folder 'lowbit quantize -o' wrote", 2
        )
    try:
        info = inspect_artifact(path, allow_unsealed=args.allow_unsealed)
    except ArtifactError as err:
        raise CliError(str(err), 1) from None
    headers = [
        "layer",
        "kind",
        "format",
        "granularity",
        "params",
        "stored bytes",
        "bits/param",
        "activations",
    ]
    rows = [
        [
            r.name,
            r.kind,
            r.format,
            r.granularity,
            f"{r.parameters:,}",
            f"{r.stored_bytes:,}",
            f"{r.bits_per_param:.3f}",
            r.activation,
        ]
        for r in info.layers
    ]
    formats = ", ".join(f"{f}: {n:,} params" for f, n in info.formats.items())
    claim = info.manifest_bits_per_param
    lines = [
        f"artifact {info.path}: recipe {info.recipe}, {info.file_name} {info.file_bytes:,} bytes on disk "
        f"(+ lowbit.json {info.manifest_bytes:,})",
        f"formats: {formats}",
        "",
        text_table(headers, rows),
        "",
        f"total: {info.parameters:,} parameters, {info.stored_bytes:,} tensor bytes, "
        f"{info.bits_per_param:.4f} bits/param (stored bytes * 8 / parameters; manifest says "
        f"{claim if claim is not None else '?'})",
    ]
    if info.verified:
        lines.append("verified:")
        lines += [f"  - {c}" for c in info.checks]
    else:
        lines += [f"PROBLEM: {p}" for p in info.problems]
    lines.append("not checked:")
    lines += [f"  - {c}" for c in info.not_checked]
    _out(args, "\n".join(lines), info.to_dict())
    return 0 if info.verified else 1


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output).expanduser()
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to overwrite it", 2)
    kind = args.format or {".gguf": "gguf", ".onnx": "onnx", "": "hf"}.get(out.suffix)
    if kind is None:
        raise CliError(
            f"-o {out}: give a file name ending in .onnx (ONNX) or .gguf (GGUF), or a directory for a "
            "Hugging Face checkpoint (or say which with --format)",
            2,
        )
    if kind == "gguf":
        return _export_gguf(args, out)
    if kind == "hf":
        return _export_hf(args, out)
    export_onnx = _optional("lowbit.export.onnx", "export_onnx", "export")
    if out.suffix != ".onnx":
        raise CliError(f"-o {out}: give a file name ending in .onnx", 2)
    if args.recipe:
        _recipe(args.recipe)
    zm = _model(args.model)
    calibration = _calibration(args, zm)
    if not zm.example_inputs and not calibration:
        raise CliError(
            f"model {zm.name!r} comes without example inputs to trace: pass --calib DATA (its first "
            "batch becomes the example), or from Python: lowbit.export_onnx(qmodel, 'model.onnx', batch)",
            2,
        )
    qmodel = _quantized(args, zm)
    if zm.example_inputs:
        example = zm.example_inputs[0] if len(zm.example_inputs) == 1 else zm.example_inputs
    if calibration and (not zm.example_inputs or isinstance(calibration[0], dict)):
        example = calibration[0]  # text models export with named inputs; factories with the user's data
    report = export_onnx(qmodel, out, example)
    text = report.to_text() if hasattr(report, "to_text") else f"exported {out}"
    _out(args, text, report)
    return 0


def _export_gguf(args: argparse.Namespace, out: Path) -> int:
    """``lowbit export MODEL --format gguf``: lowbit's grids written exactly, the rest re-quantized."""
    export_gguf = _optional("lowbit.interop.gguf_export", "export_gguf", "export --format gguf")
    from lowbit.errors import ArtifactError, DataError, ModelError

    zm = _model(args.model)
    calibration = _calibration(args, zm)
    model = _quantized(args, zm) if (args.recipe or args.artifact) else zm.model
    try:
        report = export_gguf(
            model, out, args.qtype, calibration=calibration, algorithm=args.algorithm,
            tokenizer=zm.tokenizer, requantize=args.requantize, imatrix=args.imatrix, progress=False,
        )  # fmt: skip
    except (ArtifactError, DataError, ModelError, ValueError) as err:
        raise CliError(str(err), 2) from None
    _out(args, report.summary(), report)
    return 0


def _export_hf(args: argparse.Namespace, out: Path) -> int:
    """``lowbit export MODEL --format hf``: a compressed-tensors checkpoint directory."""
    save_pretrained = _optional("lowbit.interop.compressed_tensors", "save_pretrained", "export --format hf")
    from lowbit.errors import ArtifactError, ModelError

    zm = _model(args.model)
    qmodel = _quantized(args, zm)
    try:
        calibration = _calibration(args, zm)
        report = save_pretrained(
            qmodel, out, tokenizer=zm.tokenizer, calibration=calibration, force=args.force
        )
    except (ArtifactError, ModelError, ValueError) as err:
        raise CliError(str(err), 2) from None
    _out(args, f"wrote {out}\n{report.summary()}", report)
    return 0 if report.ok else 1


def _inspect_gguf(args: argparse.Namespace, path: Path) -> int:
    """``lowbit inspect model.gguf``: every tensor's GGUF type, shape and bytes, then the file read
    back as a lowbit model (what becomes packed lowbit weights, what float values)."""
    from lowbit.errors import ArtifactError
    from lowbit.interop.gguf_import import load_gguf, open_reader, read_fields
    from lowbit.report import text_table

    try:
        reader = open_reader(path)
        fields = read_fields(reader)
        model = load_gguf(path, kernels="reference")
    except ArtifactError as err:
        raise CliError(str(err), 1) from None
    rows, total = [], 0
    for t in reader.tensors:
        shape = "x".join(str(int(d)) for d in reversed(t.shape.tolist()))
        rows.append([t.name, t.tensor_type.name, shape, f"{int(t.n_elements):,}", f"{int(t.n_bytes):,}"])
        total += int(t.n_bytes)
    params = sum(int(t.n_elements) for t in reader.tensors)
    packed = sum(1 for m in model.modules() if hasattr(m, "qweight"))
    notes = list(getattr(model, "lowbit_import_notes", []))
    lines = [
        f"GGUF {path}: {fields.get('general.architecture')} ({fields.get('general.name', '?')}), "
        f"{path.stat().st_size:,} bytes, vocabulary {fields.get('tokenizer.ggml.model', '?')} "
        f"({len(fields.get('tokenizer.ggml.tokens') or [])} tokens)",
        "",
        text_table(["tensor", "type", "shape", "params", "bytes"], rows),
        "",
        f"total: {params:,} parameters, {total:,} tensor bytes, {total * 8 / max(params, 1):.4f} bits/param",
        f"read back by lowbit: {packed} packed quantized layers (the file's own codes), "
        f"{len(notes)} tensors as float values",
    ]
    lines += [f"  - {n}" for n in notes]
    data = {"path": str(path), "tensors": rows, "parameters": params, "tensor_bytes": total, "notes": notes}
    _out(args, "\n".join(lines), data)
    return 0
