"""What every verb shares: the one-line error, printing text or JSON, warnings, optional modules."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lowbit.errors import BudgetError, DataError, ModelError, RecipeError

# Errors that mean the user's input is at fault: one line, exit code 2, wherever they are raised.
BAD_INPUT = (RecipeError, DataError, ModelError, BudgetError)


class CliError(Exception):
    """A failure to report as one line; ``code`` 2 = bad input, 1 = the work failed."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


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
