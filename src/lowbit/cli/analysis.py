"""Verbs that look inside a model layer by layer: ``sensitivity`` (rank the layers by the loss each
causes) and ``search`` (choose a format per layer under a constraint)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lowbit.cli.common import CliError, _optional, _progress, _show_result
from lowbit.cli.inputs import _calibration, _check_output_dir, _eval_data, _model, _recipe, _save


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
        _save(result.model, out)
        print(f"saved the searched model to {out}/ (recipe in its lowbit.json)", file=sys.stderr)
    return _show_result(args, result)
