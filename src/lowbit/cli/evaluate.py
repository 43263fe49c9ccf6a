"""Verbs that measure quantized models against the float one: ``eval``, ``compare`` and ``bench``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lowbit.cli.common import CliError, _call_with_supported, _json_default, _optional, _show_result
from lowbit.cli.inputs import _calibration, _eval_data, _model, _quantize, _quantized, _recipe


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


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "domains":
        return _bench_domains(args)
    if args.model is None:
        raise ValueError("lowbit bench needs a MODEL (or 'decode', or --suite domains)")
    if args.model == "decode":
        return _bench_decode(args)
    bench = _optional("lowbit.benchmark", "bench", "bench")
    recipes = [r for r in (args.recipes or "").split(",") if r]
    for r in recipes:
        _recipe(r)
    options = {"recipes": recipes or None, "repeats": args.repeats, "threads": args.threads, "out": args.out}
    options = {k: v for k, v in options.items() if v is not None}
    return _show_result(args, _call_with_supported(bench, args.model, **options))


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _bench_domains(args: argparse.Namespace) -> int:
    """``lowbit bench --suite domains``: the tables on stdout; ``--json`` rows, ``--report`` pages."""
    import json
    from pathlib import Path

    from lowbit.domains import report
    from lowbit.domains.checks import check_rows
    from lowbit.domains.suite import run_suite
    from lowbit.zoo.cache import atomic_write

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_suite(
        domains=_split(args.domains), models=_split(args.models), techniques=_split(args.techniques),
        quick=args.quick, repeats=args.repeats, onnx=not args.no_onnx,
    )  # fmt: skip
    doc = result.to_dict()
    rows_json = json.dumps(doc["rows"], indent=2, allow_nan=False) + "\n"
    if args.json == "-":
        print(rows_json, end="")
    else:
        print()
        print(report.markdown(doc["meta"], doc["rows"], doc["tasks"]))
    if args.json and args.json != "-":
        atomic_write(Path(args.json), rows_json.encode())
        print(f"rows: {args.json}")
    if args.report:
        print(f"report: {report.write(result, args.report)}/report.html (also report.md, report.json)")
    misses = [c for c in check_rows(doc["rows"]) if not c.ok]
    print(f"{len(misses)} check(s) missed" if misses else "every check held")
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    """``lowbit bench decode``: markdown on stdout, ``--out DIR`` also writes decode.md / decode.json."""
    import json
    from pathlib import Path

    from lowbit.decode_bench import VARIANTS, DecodeConfig, run

    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown decode variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    cfg = DecodeConfig(
        hidden=args.hidden, layers=args.layers, ffn=args.ffn, vocab=args.vocab, heads=args.heads,
        prompt=args.prompt, new_tokens=args.new_tokens,
        batches=tuple(int(b) for b in args.batch.split(",")), threads=args.threads,
        repeats=args.repeats or 3, variants=variants,
    )  # fmt: skip
    report = run(cfg)
    text = report.to_markdown()
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.md").write_text(text)
        (out / "decode.json").write_text(json.dumps(report.to_dict(), indent=2))
    return 0
