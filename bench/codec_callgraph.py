"""Follow one ``lowbit.quantize(model, preset, calibration)`` call: which lowbit files and functions
it visits, and how often a lower layer calls up into a higher one.

A profiler hook records every call between lowbit functions (caller = the nearest lowbit frame).
Reported per preset: files visited, distinct functions ("stays"), distinct caller -> callee file
edges, and the "climbs": distinct edges from a lower layer to a higher one, with layers

    0 formats, codecs, granularity, packing, errors   1 primitives   2 algorithms, observers
    3 nn, qat   4 ptq, recipes, size, export, pruning, analysis, eval   5 api

    PYTHONPATH=src python bench/codec_callgraph.py [--src DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

LAYERS = [
    (("formats", "codecs", "granularity", "packing", "errors", "threads"), 0),
    (("primitives",), 1),
    (("algorithms", "observers"), 2),
    (("nn", "qat"), 3),
    (("ptq", "recipes", "size", "export", "pruning", "analysis", "eval", "runtime", "report"), 4),
    (("api", "__init__"), 5),
]


def layer(rel: str) -> int:
    head = rel.split("/")[0].removesuffix(".py")
    for names, rank in LAYERS:
        if head in names:
            return rank
    return 4


def trace(preset: str, root: str) -> dict[str, object]:
    import torch

    import lowbit
    from lowbit.zoo.tinygpt import TinyGPT, TinyGPTConfig

    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(n_layer=2, d_model=32, n_head=2, context=16)).eval()
    g = torch.Generator().manual_seed(5)
    calibration = [torch.randint(0, 256, (4, 16), generator=g) for _ in range(2)]
    prefix = os.path.join(root, "lowbit") + os.sep
    functions: set[tuple[str, str]] = set()
    edges: dict[tuple[str, str], int] = defaultdict(int)

    def rel(frame) -> str | None:  # type: ignore[no-untyped-def]
        name = frame.f_code.co_filename
        if not name.startswith(prefix) or "/zoo/" in name:
            return None
        return name[len(prefix) :]

    def hook(frame, event, arg):  # type: ignore[no-untyped-def]
        if event != "call":
            return
        callee = rel(frame)
        if callee is None:
            return
        functions.add((callee, frame.f_code.co_qualname))
        back = frame.f_back
        while back is not None and rel(back) is None:
            back = back.f_back
        if back is not None and rel(back) != callee:
            edges[(rel(back), callee)] += 1  # type: ignore[index]

    sys.setprofile(hook)
    try:
        lowbit.quantize(model, preset, calibration, progress=False)
    finally:
        sys.setprofile(None)
    climbs = sorted(e for e in edges if layer(e[1]) > layer(e[0]))
    both_ways = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    return {
        "files": len({f for f, _ in functions}),
        "stays": len(functions),
        "edges": len(edges),
        "climbs": climbs,
        "both_ways": both_ways,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    parser.add_argument("--presets", default="int4-gptq,kmeans-4bit,pq,nf4")
    args = parser.parse_args()
    root = os.path.abspath(args.src)
    sys.path.insert(0, root)
    for preset in args.presets.split(","):
        r = trace(preset, root)
        climbs = r["climbs"]
        print(
            f"{preset}: {r['files']} files, {r['stays']} functions, {r['edges']} file edges, "
            f"{len(climbs)} climbs"  # type: ignore[arg-type]
        )
        for a, b in climbs:  # type: ignore[misc]
            print(f"    climb {a} -> {b}")
        for a, b in r["both_ways"]:  # type: ignore[misc]
            print(f"    both ways {a} <-> {b}")


if __name__ == "__main__":
    main()
