"""The long artifact fuzz run (issue 16): mutated artifacts against ``lowbit.load`` and ``inspect_artifact``.

The cases are those of ``tests/test_artifact_fuzz.py`` (the mutations live in
``tests/artifact_mutations.py``), drawn from ``random`` instead of hypothesis: case ``i`` of seed
``s`` is a pure function of ``(s, i)``, so any case can be replayed alone (``--case i --keep DIR``
writes the mutated artifact to ``DIR`` as a reproducer).

Each case copies one of five source artifacts (int8-static CNN, int4 MLP, k-means embedding+LSTM,
pruned int8 CNN coded with lzma, Deep Compression MLP), applies one mutation in one mode and
judges ``load`` and ``inspect_artifact``:

- ``raw``: digests untouched; a load must raise ``ArtifactError`` or give bit-identical outputs;
- ``resealed``: the manifest's tensor-file entry and ``lowbit.sha256`` recomputed after the edit,
  so only the schema and semantic checks stand in the way; a load with different outputs is
  counted as ``different`` (a schema gap after a manifest edit, a new model after a data edit).

Columns: ``silent`` = raw mode, loaded with different outputs (or a forward pass that raises);
``other`` = any exception but ``ArtifactError`` (``Timeout``: past ``--timeout``; ``MemoryError``:
hit the ``--memory-cap-gb`` address-space cap, i.e. a memory bomb got through); ``fooled`` = raw
mode, ``inspect`` said "verified" though a file's bytes changed; ``max RSS`` = the largest peak-RSS
growth of one case (Linux ``VmHWM``, reset per case).

Usage::

    python bench/artifact_fuzz.py --mutations 100000 --json fuzz.json
    python bench/artifact_fuzz.py --mutations 5000 --seed 1 --markdown fuzz.md --keep repro/
    python bench/artifact_fuzz.py --case 1234 --keep repro/case-1234    # replay one case
    python bench/artifact_fuzz.py --render fuzz.json                       # its report again

A replay (``--case``) needs the same ``--seed``, ``--sources`` and ``--kinds`` as the run it came from.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import artifact_mutations as am  # noqa: E402
from lowbit.report.table import markdown_table  # noqa: E402

EXAMPLES = 3  # reproducers kept per (kind, source, category)


def case_plan(seed: int, i: int, cells: list[tuple[str, str, str]]) -> tuple[tuple[str, str, str], am.Draw]:
    """Case ``i``'s cell and the draw for its mutation (seeded by ``(seed, i)`` alone)."""
    rng = random.Random(f"{seed}:{i}")
    return rng.choice(cells), am.RandomDraw(rng)


def category(o: am.Outcome) -> str:
    if o.verdict == "other":
        bad = o.load if o.load not in ("ArtifactError", "identical", "different") else f"inspect {o.inspect}"
        return f"other:{bad}"
    if o.verdict in ("silent", "different"):
        return o.verdict
    return "fooled" if o.inspect_fooled else o.load


class Tally:
    """Counts per (kind, source) and the first cases of each category as reproducers."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.rss: dict[tuple[str, str], int] = defaultdict(int)
        self.examples: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        self.slowest = 0.0

    def add(self, i: int, o: am.Outcome) -> str:
        key = (o.kind, o.source)
        row = self.rows[key]
        row["cases"] += 1
        if o.load in ("ArtifactError", "identical"):
            row[o.load] += 1
        if o.verdict in ("silent", "different"):
            row[o.verdict] += 1
        if o.verdict == "other":
            for what, result in (("load", o.load), ("inspect", o.inspect)):
                if result not in ("ArtifactError", "identical", "different", "verified", "unverified"):
                    if not result.startswith("broken:"):
                        row[f"{what}:{result}"] += 1
        if o.inspect_fooled:
            row["fooled"] += 1
        self.rss[key] = max(self.rss[key], o.rss_kb or 0)
        self.slowest = max(self.slowest, o.seconds)
        cat = category(o)
        if cat not in ("ArtifactError", "identical"):
            kept = self.examples[(o.kind, o.source, cat)]
            if len(kept) < EXAMPLES:
                kept.append({"case": i, **o.to_dict()})
        return cat

    def totals(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for row in self.rows.values():
            out.update(row)
        return out


def _others(row: Counter[str], prefix: str) -> str:
    parts = [f"{k.split(':', 1)[1]} {v}" for k, v in sorted(row.items()) if k.startswith(prefix)]
    return ", ".join(parts) or "0"


def table(tally: Tally, by_source: bool = True) -> str:
    """One row per mutation kind and source artifact (``by_source=False``: per kind, all sources)."""
    rows_by: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    rss: dict[tuple[str, str], int] = defaultdict(int)
    for (kind, source), row in tally.rows.items():
        key = (kind, source if by_source else "all")
        rows_by[key].update(row)
        rss[key] = max(rss[key], tally.rss[(kind, source)])
    headers = ["kind", "source", "cases", "ArtifactError", "identical", "silent (raw)",
               "different (resealed)", "other: load", "other: inspect", "fooled", "max RSS MB"]  # fmt: skip
    rows = []
    order = list(am.MUTATIONS)
    for (kind, source), row in sorted(rows_by.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        rows.append([kind, source, str(row["cases"]), str(row["ArtifactError"]), str(row["identical"]),
                     str(row["silent"]), str(row["different"]), _others(row, "load:"),
                     _others(row, "inspect:"), str(row["fooled"]),
                     f"{rss[(kind, source)] / 1024:.0f}"])  # fmt: skip
    return markdown_table(headers, rows)


def summary(tally: Tally) -> str:
    t = tally.totals()
    other_load = sum(v for k, v in t.items() if k.startswith("load:"))
    other_inspect = sum(v for k, v in t.items() if k.startswith("inspect:"))
    by_type: Counter[str] = Counter()
    for k, v in t.items():
        if k.startswith(("load:", "inspect:")):
            by_type[k] += v
    rows = [["cases", str(t["cases"])], ["ArtifactError (load)", str(t["ArtifactError"])],
            ["loaded identical", str(t["identical"])], ["silent: raw, loaded different", str(t["silent"])],
            ["resealed, loaded different", str(t["different"])],
            ["other exception from load", str(other_load)],
            ["other exception from inspect", str(other_inspect)],
            ["inspect 'verified' changed bytes (raw)", str(t["fooled"])],
            ["max RSS growth of one case, MB", f"{max(tally.rss.values(), default=0) / 1024:.0f}"],
            ["slowest case, s", f"{tally.slowest:.2f}"]]  # fmt: skip
    rows += [[f"  {k}", str(v)] for k, v in by_type.most_common()]
    return markdown_table(["", "count"], rows)


def examples(tally: Tally, categories: tuple[str, ...]) -> str:
    lines = []
    for (kind, source, cat), items in sorted(tally.examples.items()):
        if cat.startswith(categories):
            for e in items[:1]:
                lines.append(f"- `{cat}` {kind} / {source} / {e['mode']} (case {e['case']}): "
                             f"{e['description'][:120]} -> {e['detail'][:160]}")  # fmt: skip
    return "\n".join(lines) or "(none)"


def from_json(data: dict[str, Any]) -> Tally:
    """The tally a ``--json`` file holds (to render its report again)."""
    tally = Tally()
    for row in data["rows"]:
        key = (row["kind"], row["source"])
        tally.rows[key].update({k: v for k, v in row.items() if isinstance(v, int) and k != "max_rss_mb"})
        tally.rss[key] = int(row["max_rss_mb"] * 1024)
    for key, items in data["examples"].items():
        kind, source, cat = key.split("/", 2)
        tally.examples[(kind, source, cat)] = items
    tally.slowest = data.get("slowest_s", float("nan"))
    return tally


def report(tally: Tally, args: argparse.Namespace, seconds: float) -> str:
    head = (f"{tally.totals()['cases']} mutations, seed {args.seed}, {seconds:.0f} s, lowbit "
            f"{__import__('lowbit').__version__}, torch {torch.__version__}")  # fmt: skip
    return "\n\n".join([
        f"## Artifact fuzz: {head}", summary(tally), "### Per mutation kind", table(tally, by_source=False),
        "### Per mutation kind and source", table(tally),
        "### First case of each failing category", examples(tally, ("silent", "other", "fooled")),
        "### Resealed cases that load with different outputs", examples(tally, ("different",)),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mutations", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", type=int, help="replay only case CASE (with --keep: write its artifact)")
    p.add_argument("--sources", nargs="*", default=list(am.SOURCE_NAMES), choices=am.SOURCE_NAMES)
    p.add_argument("--kinds", nargs="*", default=list(am.MUTATIONS), choices=list(am.MUTATIONS))
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per load / inspect (default 10)")
    p.add_argument("--memory-cap-gb", type=float, default=3.0, help="address space beyond the start (GiB)")
    p.add_argument("--json", type=Path, help="write the counts and the reproducers as JSON")
    p.add_argument("--markdown", type=Path, help="write the report as Markdown (it is printed anyway)")
    p.add_argument("--keep", type=Path, help="copy the artifact of each failing category's first case here")
    p.add_argument("--render", type=Path, help="print the report of an earlier --json file; run nothing")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        args.seed = data["seed"]
        print(report(from_json(data), args, data.get("seconds", float("nan"))))
        return 0

    torch.set_num_threads(1)  # tiny models; the machine is shared
    sources = {k: v for k, v in am.sources().items() if k in args.sources}
    cells = [c for c in am.plan(sources) if c[1] in args.kinds]
    am.limit_memory(int(args.memory_cap_gb * (1 << 30)))
    tally, kept = Tally(), set()
    indices = [args.case] if args.case is not None else range(args.mutations)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-fuzz-") as scratch:
        for i in tqdm(indices, desc="mutations", mininterval=2, disable=args.no_progress):
            (name, kind, mode), draw = case_plan(args.seed, i, cells)
            keep = args.keep if args.case is not None else None
            outcome = am.run_case(sources[name], kind, mode, draw, Path(scratch), args.timeout, keep=keep)
            cat = tally.add(i, outcome)
            if args.keep and args.case is None and cat not in ("ArtifactError", "identical"):
                if (kind, cat) not in kept:  # one reproducer per kind and category: replay it
                    kept.add((kind, cat))
                    (name, kind, mode), draw = case_plan(args.seed, i, cells)
                    dest = args.keep / f"{cat.replace(':', '-')}-{kind}-{name}-{mode}-case{i}"
                    am.run_case(sources[name], kind, mode, draw, Path(scratch), args.timeout, keep=dest)
            if args.case is not None:
                print(json.dumps(outcome.to_dict(), indent=2))
    text = report(tally, args, time.perf_counter() - start)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({
            "mutations": tally.totals()["cases"], "seed": args.seed, "totals": tally.totals(),
            "seconds": round(time.perf_counter() - start, 1), "slowest_s": round(tally.slowest, 3),
            "rows": [{"kind": k, "source": s, **row, "max_rss_mb": tally.rss[(k, s)] / 1024}
                     for (k, s), row in sorted(tally.rows.items())],
            "examples": {"/".join(k): v for k, v in sorted(tally.examples.items())},
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
