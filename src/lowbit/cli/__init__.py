"""The ``lowbit`` command line: thin verbs over the Python API.

Every error is one line saying what to do, never a traceback (``LOWBIT_DEBUG=1`` shows it):
exit code 2 for bad input (unknown recipe, missing model or data file, output directory in the
way, and every ``lowbit.errors`` type: ``RecipeError``, ``DataError``, ``ModelError``), 1 when
the work itself fails, 0 on success. ``--json`` prints machine-readable output on
stdout; progress and warnings go to stderr.

Where things live:

- ``parser.py``: the arguments of every verb (``build_parser``) and the ``--help`` epilog.
- ``common.py``: errors, printing text or JSON, warnings, optional modules.
- ``inputs.py``: turning MODEL, ``--recipe``, ``--calib``/``--data``, ``-o`` into objects.
- ``info.py``: demo, recipes, doctor.
- ``artifacts.py``: quantize, inspect, export.
- ``evaluate.py``: eval, compare, bench.
- ``analysis.py``: sensitivity, search.

>>> main(["recipes", "--json"])  # doctest: +ELLIPSIS
{...
0
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lowbit.cli.common import BAD_INPUT, CliError, _one_line_warnings, _optional
from lowbit.cli.parser import build_parser

__all__ = ["CliError", "_optional", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowbit`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        if args.verb == "quantize":  # under torchrun: data-parallel calibration (one process group)
            from lowbit.ptq.distributed import init_from_environment

            init_from_environment()
        with _one_line_warnings():
            return int(args.func(args) or 0)
    except CliError as err:
        print(f"lowbit {args.verb}: error: {err}", file=sys.stderr)
        return err.code
    except BAD_INPUT as err:  # a recipe, data file or model at fault, from any verb (compare, search ...)
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"lowbit {args.verb}: error: {first}", file=sys.stderr)
        return 2
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
