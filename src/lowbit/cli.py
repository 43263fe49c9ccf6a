"""The ``lowbit`` command line: thin verbs over the Python API.

Every error is one line saying what to do, never a traceback (``LOWBIT_DEBUG=1`` shows it):
exit code 2 for bad input (unknown recipe, missing model or data file, output directory in the
way), 1 when the work itself fails, 0 on success. ``--json`` prints machine-readable output on
stdout; progress and warnings go to stderr.

>>> main(["recipes", "--json"])  # doctest: +ELLIPSIS
{...
0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXAMPLES = """\
verbs (run `lowbit VERB --help` for options):
  demo         quantize the built-in digits CNN 10 ways, print the table, write lowbit-report/
                 lowbit demo
  recipes      list preset recipes and built-in models
                 lowbit recipes
  quantize     quantize a model and save the artifact
                 lowbit quantize minilm --recipe int8-dynamic -o out/
  eval         evaluate one recipe or artifact against the float model
                 lowbit eval digits-cnn --recipe int8-static
  compare      evaluate several recipes side by side (optionally write a report)
                 lowbit compare digits-cnn --recipes int8-static,nf4,int4-weight-only
  inspect      show and verify what an artifact stores
                 lowbit inspect out/
  export       export a quantized model to ONNX for ONNX Runtime
                 lowbit export digits-cnn --recipe int8-dynamic -o model.onnx
  doctor       what this machine can run fast; what a model / artifact will get
                 lowbit doctor out/
  bench        latency benchmark against the float model and other tools
                 lowbit bench minilm
  sensitivity  quantize one layer at a time and rank the layers by the loss they cause
                 lowbit sensitivity digits-cnn --recipe int4-weight-only
  search       choose a format per layer under an accuracy or size constraint
                 lowbit search digits-cnn --max-drop 0.5 -o searched/

MODEL is a built-in name (digits-cnn, digits-lstm, digits-mlp, minilm), a Hugging Face model
directory, or package.module:factory. DATA files: .pt/.pth (loaded with weights_only=True),
.safetensors, .npy/.npz, or .txt (one sentence per line, for text models).
exit codes: 0 ok, 1 failure, 2 bad input."""


# What lowbit.save writes; --force may replace a directory holding only these.
ARTIFACT_FILES = ("lowbit.json", "lowbit.json.xz", "model.safetensors", "model.safetensors.xz")


class CliError(Exception):
    """A failure to report as one line; ``code`` 2 = bad input, 1 = the work failed."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --- shared helpers ---------------------------------------------------------------------------------


def _out(args: argparse.Namespace, text: str, data: Any) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=_json_default))
    else:
        print(text)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _progress() -> bool:
    return sys.stderr.isatty()


def _recipe(spec: str) -> Any:
    from lowbit.recipes import names, resolve

    try:
        return resolve(spec)
    except (ValueError, OSError) as err:
        msg = str(err)
        if "unknown recipe" in msg:
            msg = f"unknown recipe {spec!r}; choose one of: {', '.join(names())} (or a recipe YAML file)"
        raise CliError(f"{msg}; list them with 'lowbit recipes'", 2) from None


def _model(spec: str) -> Any:
    from lowbit.zoo import load_model

    try:
        return load_model(spec)
    except ImportError as err:
        raise CliError(str(err), 1) from None
    except ValueError as err:
        raise CliError(str(err), 2) from None


def _data(path: str | None, zm: Any, batch_size: int, what: str) -> Any:
    from lowbit.eval.datafile import load_data

    if path is None:
        return None
    try:
        return load_data(path, batch_size=batch_size, tokenizer=zm.tokenizer)
    except ValueError as err:
        raise CliError(f"{what}: {err}", 2) from None


def _check_output_dir(path: str, force: bool) -> Path:
    """Refuse to overwrite a non-empty directory without ``--force``, and never replace a
    directory holding anything but a lowbit artifact (saving replaces the whole directory)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"output {out} exists and is a file; give a directory path with -o", 2)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CliError(f"output directory {out} exists and is not empty; pass --force to replace it", 2)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ARTIFACT_FILES)
        if foreign:
            raise CliError(
                f"refusing to replace {out}: it holds files that are not a lowbit artifact "
                f"(e.g. {foreign[0]}); choose another -o directory",
                2,
            )
    return out


def _calibration(args: argparse.Namespace, zm: Any) -> list[Any] | None:
    data = _data(getattr(args, "calib", None), zm, args.batch_size, "--calib")
    if data is not None:
        return data.inputs()
    return list(zm.calibration) or None


def _eval_data(args: argparse.Namespace, zm: Any) -> tuple[list[Any] | None, str | None]:
    """``--data`` (labelled -> accuracy, else cosine fidelity), else the model's own data."""
    data = _data(getattr(args, "data", None), zm, args.batch_size, "--data")
    if data is not None:
        return data.batches, ("accuracy" if data.labelled else "cosine")
    from lowbit.eval.compare import evaluation_data

    try:
        return evaluation_data(zm)
    except ValueError as err:
        raise CliError(str(err), 2) from None


def _quantized(args: argparse.Namespace, zm: Any) -> Any:
    """The quantized model from ``--recipe`` (quantize now) or ``--artifact`` (load)."""
    if getattr(args, "artifact", None):
        from lowbit.export.artifact import ArtifactError, load

        if not Path(args.artifact).is_dir():
            raise CliError(f"artifact directory {args.artifact} does not exist", 2)
        try:
            return load(args.artifact, model=copy.deepcopy(zm.model))
        except ArtifactError as err:
            raise CliError(str(err), 1) from None
    if not getattr(args, "recipe", None):
        raise CliError("give --recipe R (quantize now) or --artifact DIR (a saved artifact)", 2)
    return _quantize(zm, _recipe(args.recipe), _calibration(args, zm))


def _quantize(zm: Any, recipe: Any, calibration: list[Any] | None) -> Any:
    from lowbit.api import quantize

    needs_data = recipe.activation is not None and getattr(recipe.activation, "mode", None) == "static"
    if needs_data and not calibration:
        raise CliError(f"recipe {recipe.name!r} needs calibration data; pass --calib DATA", 2)
    try:
        return quantize(zm.model, recipe, calibration=calibration, progress=_progress())
    except ValueError as err:
        raise CliError(f"quantization failed: {err}", 1) from None


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show warnings as ``lowbit: warning: ...`` lines on stderr."""
    original = warnings.showwarning

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        text = str(message).removeprefix("lowbit: ")
        print(f"lowbit: warning: {text}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _optional(module: str, attr: str, verb: str) -> Callable[..., Any]:
    """A function from a module that may not exist in this version."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        mod = None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise CliError(f"'lowbit {verb}' is not available in this version ({module}.{attr} is missing)", 1)
    return fn


def _call_with_supported(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` passing only the keyword arguments its signature accepts (optional modules)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _show_result(args: argparse.Namespace, result: Any) -> int:
    """Print a result object from an optional module (text or JSON); an int result is the exit code."""
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if getattr(args, "json", False):
        data = result.to_dict() if hasattr(result, "to_dict") else result
        print(json.dumps(data, indent=2, default=_json_default))
        return 0
    for method in ("to_text", "to_markdown"):
        if hasattr(result, method):
            print(getattr(result, method)())
            return 0
    if result is not None:
        print(result)
    return 0


# --- verbs ------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.demo import run_demo

    records = run_demo(
        out=args.out,
        repeats=args.repeats,
        retrain=args.retrain,
        ort=False if args.no_ort else None,
        stream=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2, default=_json_default))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from lowbit.recipes import describe
    from lowbit.zoo import names as model_names

    recipes, models = describe(), model_names()
    width = max(map(len, list(recipes) + list(models)))
    lines = ["recipes (lowbit quantize MODEL --recipe NAME):"]
    lines += [f"  {n:<{width}}  {d}" for n, d in recipes.items()]
    lines += ["", "built-in models (MODEL):"]
    lines += [f"  {n:<{width}}  {d}" for n, d in models.items()]
    _out(args, "\n".join(lines), {"recipes": recipes, "models": models})
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.export.artifact import save
    from lowbit.size import size_report

    recipe = _recipe(args.recipe)
    out = _check_output_dir(args.output, args.force)
    zm = _model(args.model)
    qmodel = _quantize(zm, recipe, _calibration(args, zm))
    report = size_report(qmodel)
    manifest = save(qmodel, out)
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


def _compare_and_print(args: argparse.Namespace, zm: Any, techniques: list[Any], title: str) -> list[Any]:
    from lowbit.eval.compare import compare
    from lowbit.report import summary, text_table, write_report
    from lowbit.report.table import NOISY_NOTE, REFERENCE_NOTE, layer_rows

    data, metric = _eval_data(args, zm)
    records = compare(zm, techniques, repeats=args.repeats, ort=args.ort, data=data, metric=metric)
    if args.report:
        write_report(
            records,
            args.report,
            {"title": title, "model": zm.name, "description": zm.description, "repeats": args.repeats},
        )
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2, default=_json_default))
        return records
    print(text_table(*summary(records)))
    print(REFERENCE_NOTE)
    if any((r.latency and r.latency.noisy) or (r.ort or {}).get("noisy") for r in records):
        print(NOISY_NOTE)
    if len(records) == 2:  # one quantized model: show where its error comes from
        headers, rows = layer_rows(records[1].to_dict())
        if rows:
            print("\nper-layer error (SQNR: layer alone on the float inputs; in model: with earlier errors)")
            print(text_table(headers, rows))
    if args.report:
        print(f"report: {args.report}/report.html")
    return records


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.compare import FLOAT, Technique

    if args.recipe and args.artifact:
        raise CliError("give either --recipe or --artifact, not both", 2)
    if args.recipe:
        _recipe(args.recipe)  # unknown recipe: fail before loading the model
    zm = _model(args.model)
    qmodel = _quantized(args, zm)
    stored = getattr(getattr(qmodel, "lowbit_recipe", None), "name", None)
    name = args.recipe or f"{stored or 'artifact'} ({Path(args.artifact).name}/)"
    _compare_and_print(args, zm, [FLOAT, Technique(name, lambda _zm: qmodel)], f"lowbit eval: {zm.name}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lowbit.eval.compare import FLOAT, Technique

    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not names:
        raise CliError("--recipes needs at least one recipe name, e.g. --recipes int8-static,nf4", 2)
    recipes = [_recipe(n) for n in names]
    zm = _model(args.model)
    calibration = _calibration(args, zm)

    def technique(name: str, recipe: Any) -> Technique:
        return Technique(name, lambda zm_: _quantize(zm_, recipe, calibration))

    techniques = [FLOAT] + [technique(n, r) for n, r in zip(names, recipes, strict=True)]
    _compare_and_print(args, zm, techniques, f"lowbit compare: {zm.name}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.eval.artifact_info import inspect_artifact
    from lowbit.export.artifact import ArtifactError
    from lowbit.report import text_table

    path = Path(args.dir)
    if not path.is_dir():
        raise CliError(
            f"artifact directory {path} does not exist; give the folder 'lowbit quantize -o' wrote", 2
        )
    try:
        info = inspect_artifact(path)
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
        lines.append(
            "verified: file size and sha256, every tensor's shape, dtype and bytes, and the "
            "bits/param (within 1%) match the manifest"
        )
    else:
        lines += [f"PROBLEM: {p}" for p in info.problems]
    _out(args, "\n".join(lines), info.to_dict())
    return 0 if info.verified else 1


def cmd_export(args: argparse.Namespace) -> int:
    export_onnx = _optional("lowbit.export.onnx", "export_onnx", "export")
    out = Path(args.output).expanduser()
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; pass --force to overwrite it", 2)
    if out.suffix != ".onnx":
        raise CliError(f"-o {out}: give a file name ending in .onnx", 2)
    if args.recipe:
        _recipe(args.recipe)
    zm = _model(args.model)
    if not zm.example_inputs:
        raise CliError(f"model {zm.name!r} has no example inputs to trace; export it from Python", 2)
    qmodel = _quantized(args, zm)
    example = zm.example_inputs[0] if len(zm.example_inputs) == 1 else zm.example_inputs
    if isinstance(zm.calibration[0] if zm.calibration else None, dict):
        example = zm.calibration[0]  # text models: export with named inputs
    report = export_onnx(qmodel, out, example)
    text = report.to_text() if hasattr(report, "to_text") else f"exported {out}"
    _out(args, text, report)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    doctor = _optional("lowbit.doctor", "doctor", "doctor")
    options = {"recipe": args.recipe} if args.recipe else {}
    return _show_result(args, _call_with_supported(doctor, args.target, **options))


def cmd_bench(args: argparse.Namespace) -> int:
    bench = _optional("lowbit.benchmark", "bench", "bench")
    recipes = [r for r in (args.recipes or "").split(",") if r]
    for r in recipes:
        _recipe(r)
    options = {"recipes": recipes or None, "repeats": args.repeats, "threads": args.threads, "out": args.out}
    options = {k: v for k, v in options.items() if v is not None}
    return _show_result(args, _call_with_supported(bench, args.model, **options))


def cmd_sensitivity(args: argparse.Namespace) -> int:
    sensitivity = _optional("lowbit.analysis", "sensitivity", "sensitivity")
    recipe = _recipe(args.recipe)
    zm = _model(args.model)
    data, metric = _eval_data(args, zm)
    report = sensitivity(
        zm.model, data, metric or "cosine", recipe, calibration=_calibration(args, zm), progress=_progress()
    )
    if args.plot:
        Path(args.plot).write_bytes(report.plot_png())
    return _show_result(args, report)


def cmd_search(args: argparse.Namespace) -> int:
    search = _optional("lowbit.analysis", "search", "search")
    if args.max_drop is None and args.target_bits is None and args.target_size is None:
        raise CliError("give a constraint: --max-drop POINTS, --target-bits B or --target-size FRACTION", 2)
    out = _check_output_dir(args.output, args.force) if args.output else None
    zm = _model(args.model)
    data, metric = _eval_data(args, zm)
    kwargs: dict[str, Any] = {
        "max_drop": args.max_drop,
        "target_bits": args.target_bits,
        "target_size": args.target_size,
        "progress": _progress(),
        "calibration": _calibration(args, zm),
        "budget_minutes": args.budget_minutes,
    }
    if args.candidates:
        kwargs["candidates"] = [c.strip() for c in args.candidates.split(",") if c.strip()]
    try:
        result = search(zm.model, data, metric or "cosine", **kwargs)
    except ValueError as err:
        raise CliError(str(err), 2) from None
    if out is not None:
        from lowbit.export.artifact import save

        save(result.model, out)
        print(f"saved the searched model to {out}/ (recipe in its lowbit.json)", file=sys.stderr)
    return _show_result(args, result)


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``lowbit --help`` lists every verb with an example)."""
    parser = _Parser(
        prog="lowbit",
        description="Quantize PyTorch models and measure exactly what it bought and cost.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from lowbit import __version__

    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(
        dest="verb", metavar="VERB", help="one of the verbs below", parser_class=_Parser
    )
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    def verb(name: str, func: Callable[[argparse.Namespace], int], help_: str, example: str) -> _Parser:
        p = sub.add_parser(
            name,
            description=f"{help_}\n\nexample:\n  {example}",
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    def model_args(p: argparse.ArgumentParser, data: bool = True) -> None:
        p.add_argument(
            "model", metavar="MODEL", help="zoo name, Hugging Face directory, or package.module:factory"
        )
        p.add_argument(
            "--calib", metavar="DATA", help="calibration data file (.pt/.safetensors/.npy/.npz/.txt)"
        )
        if data:
            p.add_argument("--data", metavar="DATA", help="evaluation data file (default: the model's own)")
        p.add_argument("--batch-size", type=int, default=32, help="batch size for data files (default 32)")

    def eval_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repeats", type=int, default=20, help="timed calls per model (default 20)")
        p.add_argument("--ort", action="store_true", help="also time ONNX Runtime exports")
        p.add_argument("--report", metavar="DIR", help="also write JSON / Markdown / HTML there")

    p = verb("demo", cmd_demo, "technique matrix on the digits CNN, table + lowbit-report/", "lowbit demo")
    p.add_argument("--out", default="lowbit-report", help="report directory (default lowbit-report)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model (default 10)")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime latency columns")
    p.add_argument("--retrain", action="store_true", help="retrain digits-cnn instead of using the cache")

    verb("recipes", cmd_recipes, "list preset recipes and built-in models", "lowbit recipes")

    p = verb(
        "quantize",
        cmd_quantize,
        "quantize MODEL and save the artifact",
        "lowbit quantize minilm --recipe int8-dynamic -o out/",
    )
    model_args(p, data=False)
    p.add_argument("--recipe", required=True, help="preset name or recipe YAML (see 'lowbit recipes')")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in DIR")

    p = verb(
        "eval",
        cmd_eval,
        "evaluate one recipe or saved artifact against the float model",
        "lowbit eval digits-cnn --recipe int8-static  |  lowbit eval minilm --artifact out/",
    )
    model_args(p)
    p.add_argument("--recipe", help="preset name or recipe YAML")
    p.add_argument("--artifact", metavar="DIR", help="a saved artifact of MODEL instead of --recipe")
    eval_args(p)

    p = verb(
        "compare",
        cmd_compare,
        "evaluate several recipes side by side",
        "lowbit compare digits-cnn --recipes int8-static,nf4,int4-weight-only",
    )
    model_args(p)
    p.add_argument("--recipes", required=True, help="comma-separated preset names or YAML files")
    eval_args(p)

    p = verb("inspect", cmd_inspect, "show and verify what an artifact stores", "lowbit inspect out/")
    p.add_argument("dir", metavar="DIR", help="artifact directory (lowbit.json + model.safetensors)")

    p = verb(
        "export",
        cmd_export,
        "export a quantized model to ONNX (ONNX Runtime integer kernels)",
        "lowbit export digits-cnn --recipe int8-dynamic -o model.onnx",
    )
    model_args(p, data=False)
    p.add_argument("--recipe", help="preset name or recipe YAML")
    p.add_argument("--artifact", metavar="DIR", help="a saved artifact of MODEL instead of --recipe")
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    p.add_argument("--force", action="store_true", help="overwrite FILE.onnx")

    p = verb(
        "doctor",
        cmd_doctor,
        "what this machine runs fast; what a model, recipe or artifact gets",
        "lowbit doctor out/",
    )
    p.add_argument("target", nargs="?", default=None, help="optional MODEL, artifact directory or .onnx file")
    p.add_argument("--recipe", help="recipe to check MODEL against (default: the doctor's choice)")

    p = verb("bench", cmd_bench, "latency benchmark against the float model", "lowbit bench minilm")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--recipes", help="comma-separated recipes to benchmark")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="where to write results")

    p = verb(
        "sensitivity",
        cmd_sensitivity,
        "rank layers by the loss each causes when quantized alone",
        "lowbit sensitivity digits-cnn --recipe int4-weight-only --plot sens.png",
    )
    model_args(p)
    p.add_argument("--recipe", default="int4-weight-only", help="recipe applied to one layer at a time")
    p.add_argument("--plot", metavar="FILE.png", help="write the bar chart there")

    p = verb(
        "search",
        cmd_search,
        "choose a format per layer under a constraint",
        "lowbit search digits-cnn --max-drop 0.5 -o searched/",
    )
    model_args(p)
    p.add_argument("--max-drop", type=float, help="largest allowed metric drop (points)")
    p.add_argument("--target-bits", type=float, help="average bits per parameter")
    p.add_argument("--target-size", type=float, help="size as a fraction of float32 (0.2 = 20%%)")
    p.add_argument("--candidates", help="comma-separated formats, e.g. int8,int4,int2")
    p.add_argument("--budget-minutes", type=float, default=None)
    p.add_argument("-o", "--output", metavar="DIR", help="save the searched model as an artifact")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowbit`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        with _one_line_warnings():
            return int(args.func(args) or 0)
    except CliError as err:
        print(f"lowbit {args.verb}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"lowbit {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the promise is one line, never a traceback; LOWBIT_DEBUG shows it
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        hint = "(set LOWBIT_DEBUG=1 for the traceback)"
        print(f"lowbit {args.verb}: error: {type(err).__name__}: {first} {hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
