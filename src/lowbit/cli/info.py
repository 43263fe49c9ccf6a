"""Verbs that need no model of your own: ``demo``, ``recipes`` and ``doctor``."""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.cli.common import _call_with_supported, _json_default, _optional, _out, _show_result


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


def cmd_doctor(args: argparse.Namespace) -> int:
    doctor = _optional("lowbit.doctor", "doctor", "doctor")
    options = {"recipe": args.recipe} if args.recipe else {}
    return _show_result(args, _call_with_supported(doctor, args.target, **options))
