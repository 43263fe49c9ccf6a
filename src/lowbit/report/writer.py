"""Write ``lowbit-report/`` (report.json, report.md, report.html) atomically.

All three files are rendered in memory first, then the directory is replaced as a whole (see
``lowbit.export.atomic``): a crash or Ctrl-C never leaves a half-written report behind.

>>> import tempfile, torch, lowbit
>>> from lowbit.eval.evaluate import evaluate
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
>>> rec = evaluate(m, lowbit.quantize(m, "nf4", progress=False), [torch.randn(4, 8)], metric=None,
...                repeats=2)
>>> out = write_report([rec], tempfile.mkdtemp() + "/lowbit-report", {"title": "demo"})
>>> sorted(p.name for p in out.iterdir())
['report.html', 'report.json', 'report.md']
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.eval.evaluate import EvalRecord
from lowbit.export.atomic import write_directory
from lowbit.report.html_page import html_report
from lowbit.report.markdown_doc import markdown_report
from lowbit.report.table import rows_of

REPORT_VERSION = 1
FILES = ("report.json", "report.md", "report.html")


def environment() -> dict[str, Any]:
    """Where the numbers were measured: machine, thread count, versions, time (JSON-ready)."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "versions": f"lowbit {lowbit.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
    }


def report_json(records: list[EvalRecord] | list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: ``{"lowbit_report": 1, "meta": {...}, "records": [...]}``."""
    return {"lowbit_report": REPORT_VERSION, "meta": {**environment(), **meta}, "records": rows_of(records)}


def write_report(
    records: list[EvalRecord] | list[dict[str, Any]],
    directory: str | Path = "lowbit-report",
    meta: dict[str, Any] | None = None,
) -> Path:
    """Render JSON, Markdown and HTML for ``records`` and replace ``directory`` with them.

    ``meta`` adds facts to the header (``title``, ``model``, ``description``, ``seconds``,
    ``repeats``, ``notes``...). Returns the directory.
    """
    doc = report_json(records, meta or {})
    rows, full_meta = doc["records"], doc["meta"]
    files = {
        "report.json": (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
        "report.md": markdown_report(full_meta, rows).encode(),
        "report.html": html_report(full_meta, rows).encode(),
    }
    directory = Path(directory)
    # markers=(): a report directory is replaced whatever it holds, as it always was.
    write_directory(directory, files, markers=())
    return directory
