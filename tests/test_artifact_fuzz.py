"""Issue 16's fuzz acceptance: 2,000 mutated artifacts, each refused with ArtifactError or loaded exactly.

Hypothesis draws every case: a (source artifact, mutation kind, mode) cell, then the mutation's
choices (``artifact_mutations`` lists the attacks); 2,000 cases give each cell about five. The
fuzz runs in a child process: a memory bomb that gets through hits the child's address-space cap
instead of the machine, and the child's peak RSS is its own.

Asserted over the whole run:

- no silent acceptance: in raw mode (digests untouched) a load that returns gives bit-identical
  outputs, and ``inspect_artifact`` never says "verified" for an artifact whose bytes changed;
- nothing but ``ArtifactError`` escapes ``load`` or ``inspect_artifact``, in either mode;
- peak RSS grows by less than 256 MB over the run (against the child's peak after building the
  sources and loading each once).

Resealed cases that load with different outputs are allowed (the digests were forged too); the
child lists them in its report. ``bench/artifact_fuzz.py`` runs the same cases at length.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

import artifact_mutations as am

CASES = 2000
RSS_GROWTH_LIMIT_MB = 256
MEMORY_CAP = 5 << 29  # 2.5 GiB of address space beyond what the child maps after building the sources
CASE_TIMEOUT_S = 5.0

pytestmark = pytest.mark.fuzz


def fuzz(cases: int, scratch: Path) -> dict[str, Any]:
    """Run ``cases`` hypothesis-drawn mutations (in the child process); returns the report."""
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    torch.set_num_threads(1)
    sources = am.sources()
    for source in sources.values():  # warm-up: the baseline includes one plain load and inspect each
        am.judge_load(source, source.path, CASE_TIMEOUT_S)
        am.judge_inspect(source.path, CASE_TIMEOUT_S)
    cells = am.plan(sources)
    am.limit_memory(MEMORY_CAP)
    baseline = am.run_peak_rss()
    am.run_peak_rss(restart=True)
    outcomes: list[am.Outcome] = []

    # Failures are collected rather than raised: the report then counts every category at once.
    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.data())
    def one_case(data: Any) -> None:
        name, kind, mode = data.draw(st.sampled_from(cells), label="cell")
        outcomes.append(am.run_case(sources[name], kind, mode, am.DataDraw(data), scratch, CASE_TIMEOUT_S))

    one_case()
    peak = am.run_peak_rss()
    return {
        "outcomes": [o.to_dict() for o in outcomes],
        "baseline_rss_mb": baseline / 1024,
        "peak_rss_mb": peak / 1024,
        "rss_growth_mb": (peak - baseline) / 1024,
    }


def _summary(rows: list[dict[str, Any]], title: str, examples: int = 2) -> str:
    """Counts by (kind, load result / inspect result), with the first cases of each as reproducers."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], f"load {r['load']} / inspect {r['inspect']}"), []).append(r)
    lines = [f"{title}: {len(rows)}"]
    for (kind, what), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(items):4d} {kind}: {what}")
        for r in items[:examples]:
            lines.append(f"      {r['source']} {r['mode']}: {r['description'][:90]} -> {r['detail'][:140]}")
    return "\n".join(lines)


def test_mutated_artifacts_are_refused_or_load_bit_identically(tmp_path: Path) -> None:
    import lowbit

    out = tmp_path / "report.json"
    src = str(Path(lowbit.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    child = [sys.executable, __file__, str(out), str(CASES)]
    proc = subprocess.run(child, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"the fuzz child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    rows = report["outcomes"]
    assert len(rows) >= CASES
    assert {r["source"] for r in rows} == set(am.SOURCE_NAMES)
    assert {r["kind"] for r in rows} == set(am.MUTATIONS) and {r["mode"] for r in rows} == {"raw", "resealed"}
    different = [r for r in rows if r["verdict"] == "different"]
    print(_summary(different, "resealed cases that load with different outputs (schema gaps or new data)"))
    problems = [
        _summary([r for r in rows if r["verdict"] == "silent"], "silent acceptances (raw, outputs differ)"),
        _summary([r for r in rows if r["inspect_fooled"]], "inspect said 'verified' for changed bytes (raw)"),
        _summary([r for r in rows if r["verdict"] == "other"], "exceptions other than ArtifactError"),
    ]
    failed = [p for p in problems if not p.endswith(": 0")]
    assert not failed, f"{len(rows)} mutated artifacts:\n" + "\n".join(failed)
    assert report["rss_growth_mb"] < RSS_GROWTH_LIMIT_MB, (
        f"peak RSS grew by {report['rss_growth_mb']:.0f} MB over the fuzz run "
        f"({report['baseline_rss_mb']:.0f} -> {report['peak_rss_mb']:.0f} MB)"
    )


# --- the harness itself: it must be able to fail --------------------------------------------------


def _case(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loader: Any) -> am.Outcome:
    source = am.sources()["int4"]  # built (and checked) with the real loader first
    monkeypatch.setattr(am, "load_artifact", loader)
    draw = am.RandomDraw(__import__("random").Random(0))
    return am.run_case(source, "alias", "raw", draw, tmp_path)


def test_oracle_flags_a_loader_that_accepts_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    outcome = _case(monkeypatch, tmp_path, lambda path, skeleton: skeleton)  # float weights, never checked
    assert (outcome.load, outcome.verdict) == ("different", "silent")


def test_oracle_flags_exceptions_other_than_artifact_error(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    def leaky(path: Path, skeleton: Any) -> Any:
        raise KeyError("qweight")

    def clean(path: Path, skeleton: Any) -> Any:
        raise am.artifact_error()(f"{path}: refused")

    assert _case(monkeypatch, tmp_path, leaky).verdict == "other"
    assert _case(monkeypatch, tmp_path, clean).load == "ArtifactError"


def test_reseal_makes_every_digest_match(tmp_path: Path) -> None:
    """A resealed edit passes ``sha256sum -c`` (the seal is added where the saver wrote none)."""
    import dataclasses
    import hashlib
    import random
    import shutil

    for name in ("int4", "sparse"):
        source = am.sources()[name]
        path = tmp_path / name
        shutil.copytree(source.path, path)
        files = sorted(f for f in os.listdir(path) if f != am.SUMS)
        sums = "".join(f"{hashlib.sha256((path / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
        assert not (path / am.SUMS).exists() or (path / am.SUMS).read_text() == sums  # the saver's seal
        (path / am.SUMS).write_text(sums)
        sealed = dataclasses.replace(source, path=path)
        sealed.fingerprints = {f: am._fingerprint(path / f) for f in sorted(os.listdir(path))}
        work_dir = tmp_path / f"{name}-work"
        shutil.copytree(path, work_dir)
        work = am.Work(sealed, work_dir)
        am.m_st_dtype(work, am.RandomDraw(random.Random(0)))  # rewrites the tensor file
        am.m_format(work, am.RandomDraw(random.Random(0)))  # and the manifest
        work.reseal()
        check = subprocess.run(["sha256sum", "-c", am.SUMS], cwd=work_dir, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        entry = am.file_entries(work.manifest())[0]
        data = (work_dir / source.tensor_name).read_bytes()
        assert (entry["bytes"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert work.changed()


def test_bombs_are_small_on_disk_and_large_decoded(tmp_path: Path) -> None:
    import random
    import shutil

    source = am.sources()["deep"]
    assert am._unxz((source.path / source.tensor_name).read_bytes()) is not None
    for seed in range(6):
        path = tmp_path / str(seed)
        shutil.copytree(source.path, path)
        what = am.m_xz_bomb(am.Work(source, path), am.RandomDraw(random.Random(seed)))
        name = what.split(":")[0]
        data = (path / name).read_bytes()
        assert len(data) < 1 << 20, what
        assert am._unxz(data, cap=64 << 20) is None, what  # decodes past 64 MiB


if __name__ == "__main__":  # the child: python tests/test_artifact_fuzz.py REPORT.json CASES
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as scratch:
        result = fuzz(int(sys.argv[2]), Path(scratch))
    Path(sys.argv[1]).write_text(json.dumps(result))
