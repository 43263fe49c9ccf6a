"""docs/api.md's examples run as written (each block on its own, in a fresh namespace)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

API_DOC = Path(__file__).parents[1] / "docs" / "api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.S)


def test_the_api_doc_lists_every_top_level_verb():
    import lowbit

    text = API_DOC.read_text()
    steps = ("prepare", "calibrate", "convert", "size_report")  # quantize's parts, in docs/ptq.md
    verbs = [n for n in lowbit.__all__ if n[0].islower() and callable(getattr(lowbit, n)) and n not in steps]
    missing = [n for n in verbs if f"lowbit.{n}" not in text]
    assert not missing, f"docs/api.md does not mention {missing}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_api_doc_example_runs(index):
    if "sklearn" in BLOCKS[index]:
        pytest.importorskip("sklearn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(BLOCKS[index], f"docs/api.md block {index}", "exec"), {"__name__": "__docs__"})
