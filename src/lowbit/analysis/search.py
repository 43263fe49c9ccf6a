"""``search``: the smallest per-layer mix of formats that keeps the metric (or the best one that fits).

How it works, in four steps:

1. **Measure.** Every (layer, candidate format) pair is quantized once and scored alone (all other
   layers float) on the search split: metric drop, model-output SQNR, stored bytes.
2. **Plan.** Per layer, the candidates form a cost / bytes curve; its lower convex hull gives the
   moves worth making (largest bytes saved per unit of estimated cost first). Merging every layer's
   moves by that ratio gives one path from "all float" to "all smallest", along which the estimated
   drop (sum of the layers' drops alone) grows and the size shrinks.
3. **Verify.** The real combined model is scored along the path (binary search for the last point
   within ``max_drop``, starting from the estimate) -- drops are not exactly additive, so the
   estimate only seeds the search and every answer is a measured one. For a size target, the first
   point that fits is taken. A few more points plus uniform int8 / int4 make the frontier.
4. **Hold out.** The chosen model is scored on data the search never saw. If it misses the
   constraint there, the search backs off along the path and says so in ``notes``.

>>> import torch
>>> from lowbit.analysis import search
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
>>> data = [(torch.randn(32, 16), torch.randint(0, 4, (32,))) for _ in range(4)]
>>> result = search(model, data, "accuracy", max_drop=1.0, candidates=("int8", "int4", "float"))
>>> result.met, result.stored_bytes < result.float_bytes
(True, True)
>>> "overrides" in result.recipe.to_yaml()
True
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lowbit import formats
from lowbit.analysis.common import (
    DEFAULT_CANDIDATES,
    Candidate,
    Evaluator,
    Score,
    float_bytes,
    halve_batch,
    human_bytes,
    quantize_layer,
    resolve_candidates,
    swapped,
)
from lowbit.analysis.result import FrontierPoint, LayerChoice, SearchResult
from lowbit.modelcheck import require_module
from lowbit.nn.base import QuantizedModule
from lowbit.ptq.convert import set_submodule
from lowbit.ptq.plan import LayerPlan, plan_model
from lowbit.recipes.spec import LayerRule, Recipe, WeightSpec
from lowbit.size import size_report

FLOAT = "float"


@dataclass
class _Option:
    """One candidate for one layer, as measured alone."""

    cand: str
    nbytes: int
    score: Score | None  # None for float (nothing changes)

    @property
    def drop(self) -> float:
        return 0.0 if self.score is None else self.score.drop

    @property
    def risk(self) -> float:
        return 0.0 if self.score is None else self.score.risk


@dataclass
class _Move:
    layer: str
    old: str
    new: str
    slope: float


def search(
    model: nn.Module,
    data: Sequence[Any],
    metric: str,
    *,
    max_drop: float | None = None,
    target_bits: float | None = None,
    target_size: float | None = None,
    candidates: Sequence[Candidate] = DEFAULT_CANDIDATES,
    calibration: Sequence[Any] | None = None,
    holdout: Sequence[Any] | None = None,
    budget_minutes: float | None = None,
    frontier_points: int = 10,
    progress: bool = True,
) -> SearchResult:
    """Choose a weight format per layer under a constraint; verify on held-out data.

    Args:
        model: the float model (left unchanged).
        data: evaluation batches (``(inputs, labels)`` for ``accuracy``, inputs otherwise). Without
            ``holdout`` it is split: even-numbered batches for the search, odd ones held out (a
            single batch is cut in half).
        metric: ``accuracy``, ``cosine`` (against the float model's outputs) or ``perplexity``.
        max_drop: largest allowed metric drop in points (``metric_drop``: 0.5 = half a percentage
            point of accuracy, or cosine 0.995); the smallest model within it is returned.
        target_bits: average stored bits per parameter for the whole model (scales included).
        target_size: stored size as a fraction of float32 (0.2 = 20%).
            With a size target the lowest-drop model that fits is returned; with both a drop and a
            size constraint, ``met`` requires both.
        candidates: names from ``lowbit.analysis.CANDIDATES`` (``fp16``, ``int8``, ``int4``, ``int3``,
            ``int2``, ``float``) or ``(label, WeightSpec | None)`` pairs; ``float`` = keep the layer float.
        calibration: optional unlabelled input batches (accuracy metric): a layer choice also counts
            as losing the share of these whose top-1 prediction changes, so decisions rest on more
            examples than the labelled split (fewer surprises on held-out data).
        holdout: held-out batches; when given, all of ``data`` is used for the search.
        budget_minutes: soft time bound: measuring stops when it is reached (unmeasured options
            are not used); the few verification evaluations after it still run.
        frontier_points: extra evenly spaced path points scored for the frontier plot.
        progress: tqdm bar with the remaining-time estimate.

    Example (digits CNN, well under a minute)::

        zm = lowbit.zoo.get("digits-cnn")
        result = search(zm.model, zm.eval_data, zm.metric, max_drop=0.5)
        result.recipe.save("searched.yaml"); print(result.to_markdown())
        lowbit.save(result.model, "out/")          # or lowbit.quantize(float_model, result.recipe)
    """
    require_module(model, "search")
    started = time.perf_counter()
    deadline = None if budget_minutes is None else started + 60.0 * budget_minutes
    if max_drop is None and target_bits is None and target_size is None:
        raise ValueError("give a constraint: max_drop=..., target_bits=... or target_size=...")
    specs = resolve_candidates(candidates)
    if holdout is None:
        data, holdout = split_holdout(data)
    layers = plan_model(model, Recipe(weight=WeightSpec())).layers
    if not layers:
        raise ValueError("the model has no quantizable layer (Linear, Conv, Embedding, LSTM/GRU)")
    work = copy.deepcopy(model).eval()  # layers are swapped in and out of this copy, never the user's
    evaluator = Evaluator(work, data, metric, unlabelled=calibration)
    float_total = size_report(model).stored_bytes
    fixed_bytes = float_total - sum(float_bytes(lay.module) for lay in layers)
    parameters = size_report(model).parameters
    budget_bytes = _byte_budget(target_bits, target_size, parameters, float_total)

    # Most precise format first, so a time budget cuts the least useful measurements.
    ordered = sorted((c for c in specs if specs[c] is not None), key=lambda c: -_bits(specs[c]))
    bar = tqdm(
        total=len(ordered) * len(layers) + frontier_points + 12,
        desc="search",
        unit="eval",
        disable=not progress,
    )
    cache: dict[tuple[str, str], QuantizedModule] = {}
    options: dict[str, dict[str, _Option]] = {lay.name: {} for lay in layers}
    if FLOAT in specs:
        for lay in layers:
            options[lay.name][FLOAT] = _Option(FLOAT, float_bytes(lay.module), None)
    exhausted = False
    for i, cand in enumerate(ordered):
        for lay in layers:
            must = i == 0 and FLOAT not in specs  # every layer needs at least one option
            if deadline is not None and time.perf_counter() > deadline and not must:
                exhausted = True
                break
            spec = specs[cand]
            assert spec is not None
            qm = quantize_layer(lay.module, lay.kind, spec, lay.name)
            cache[(lay.name, cand)] = qm
            with swapped(work, {lay.name: qm}):
                options[lay.name][cand] = _Option(cand, qm.stored_bytes, evaluator.score(work))
            bar.update(1)
        if exhausted:
            break

    noise_weight = 0.0 if metric == "cosine" else 1.0
    start, moves = _plan_path(options, noise_weight)
    path = [dict(start)]
    for mv in moves:
        path.append({**path[-1], mv.layer: mv.new})

    def nbytes(assign: dict[str, str]) -> int:
        return fixed_bytes + sum(options[n][c].nbytes for n, c in assign.items())

    def est_drop(assign: dict[str, str]) -> float:
        return sum(options[n][c].risk for n, c in assign.items())

    evaluated: dict[int, Score] = {}

    def measure(k: int) -> Score:
        if k not in evaluated:
            evaluated[k] = _score_assignment(work, path[k], cache, evaluator)
            bar.update(1)
        return evaluated[k]

    # --- verify along the path ---------------------------------------------------------------------
    notes: list[str] = []
    if max_drop is not None:
        lo, hi = 0, len(path)
        if measure(0).risk > max_drop:
            notes.append(f"even the most precise configuration loses {measure(0).risk:.2f} > {max_drop}")
        guess = max([k for k, a in enumerate(path) if est_drop(a) <= max_drop], default=0)
        if measure(guess).risk <= max_drop:
            lo = guess
        else:
            hi = guess
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if measure(mid).risk <= max_drop:
                lo = mid
            else:
                hi = mid
        chosen = lo
        if budget_bytes is not None:
            fits = [k for k in range(len(path)) if nbytes(path[k]) <= budget_bytes]
            if fits and fits[0] > chosen:
                notes.append("the size target needs a step beyond the largest one within max_drop")
        if hi < len(path):
            mv = moves[hi - 1]
            notes.append(
                f"stopped before step {hi} ({mv.layer}: {mv.old} -> {mv.new}): the combined model "
                f"lost {measure(hi).risk:.2f} > {max_drop} points"
            )
    else:
        assert budget_bytes is not None
        fits = [k for k in range(len(path)) if nbytes(path[k]) <= budget_bytes]
        chosen = fits[0] if fits else len(path) - 1
        if not fits:
            notes.append(f"no configuration fits {human_bytes(budget_bytes)}; returning the smallest")
    for k in _spread(len(path), frontier_points):
        if deadline is None or time.perf_counter() < deadline:
            measure(k)

    # --- held-out check, backing off along the path if needed ----------------------------------------
    hold = Evaluator(work, holdout, metric)
    final_k, backoff = chosen, False
    hold_score = _score_assignment(work, path[chosen], cache, hold)
    if max_drop is not None and hold_score.drop > max_drop:
        for k in _backoff_steps(chosen):
            if measure(k).risk > max_drop:
                continue
            s = _score_assignment(work, path[k], cache, hold)
            notes.append(
                f"held-out drop {hold_score.drop:.2f} > {max_drop} at step {final_k}; backed off to step {k}"
            )
            final_k, hold_score, backoff = k, s, True
            if s.drop <= max_drop:
                break
    assignment = path[final_k]
    bar.close()

    # --- the result -----------------------------------------------------------------------------------
    recipe = _recipe(layers, assignment, specs, metric, max_drop, budget_bytes)
    qmodel = _assemble(model, assignment, cache)
    qmodel.lowbit_recipe = recipe  # what lowbit.save records
    stored = size_report(qmodel).stored_bytes
    final = evaluated.get(final_k) or measure(final_k)
    met = (max_drop is None or (final.risk <= max_drop and hold_score.drop <= max_drop)) and (
        budget_bytes is None or stored <= budget_bytes
    )
    frontier = [FrontierPoint("float", float_total, 100.0, evaluator.float_value, 0.0)]
    for cand in ("int8", "int4"):
        if all((lay.name, cand) in cache for lay in layers):
            uniform = {lay.name: cand for lay in layers}
            s = _score_assignment(work, uniform, cache, evaluator)
            frontier.append(_point(f"{cand} (uniform)", nbytes(uniform), float_total, s))
    for k, s in sorted(evaluated.items()):
        frontier.append(_point(f"step {k}", nbytes(path[k]), float_total, s))
    frontier.append(_point("searched", stored, float_total, final))
    choices = _explain(layers, assignment, options, moves, chosen, final_k, max_drop)
    from lowbit.backends import use_kernels  # scored on the reference path; handed over on kernels

    use_kernels(qmodel)
    return SearchResult(
        recipe=recipe,
        model=qmodel,
        metric=metric,
        constraint=_describe(max_drop, target_bits, target_size),
        met=met,
        float_value=evaluator.float_value,
        value=final.value,
        drop=final.drop,
        holdout_float_value=hold.float_value,
        holdout_value=hold_score.value,
        holdout_drop=hold_score.drop,
        stored_bytes=stored,
        float_bytes=float_total,
        parameters=parameters,
        layers=choices,
        frontier=frontier,
        notes=notes,
        holdout_backoff=backoff,
        budget_exhausted=exhausted,
        seconds=time.perf_counter() - started,
        evaluations=sum(o.score is not None for opts in options.values() for o in opts.values())
        + len(evaluated),
    )


def split_holdout(data: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Even-numbered batches for the search, odd ones held out; one batch is cut in half.

    >>> search_part, held = split_holdout([1, 2, 3, 4, 5])
    >>> search_part, held
    ([1, 3, 5], [2, 4])
    """
    data = list(data)
    if not data:
        raise ValueError("the evaluation data is empty: pass at least one batch")
    if len(data) == 1:
        first, second = halve_batch(data[0])
        return [first], [second]
    return data[0::2], data[1::2]


def _bits(spec: WeightSpec | None) -> float:
    return 32.0 if spec is None else float(formats.get(spec.format).bits)


def _byte_budget(
    target_bits: float | None, target_size: float | None, parameters: int, float_total: int
) -> int | None:
    budgets = []
    if target_bits is not None:
        if target_bits <= 0:
            raise ValueError(f"target_bits must be positive, got {target_bits}")
        budgets.append(int(target_bits * parameters / 8))
    if target_size is not None:
        if not 0 < target_size <= 1:
            raise ValueError(f"target_size is a fraction of the float size in (0, 1], got {target_size}")
        budgets.append(int(target_size * float_total))
    return min(budgets) if budgets else None


def _plan_path(
    options: dict[str, dict[str, _Option]], noise_weight: float
) -> tuple[dict[str, str], list[_Move]]:
    """Start (largest option per layer) and the hull moves of every layer, merged by slope."""

    def cost(o: _Option) -> float:
        if o.score is None:
            return 0.0
        # Accuracy moves in coarse steps on small data; the output noise power breaks the ties.
        noise = 0.0 if math.isinf(o.score.output_sqnr_db) else 10 ** (-o.score.output_sqnr_db / 10)
        return o.risk + noise_weight * noise

    start: dict[str, str] = {}
    moves: list[_Move] = []
    for name, opts in options.items():
        pts = sorted(opts.values(), key=lambda o: (-o.nbytes, cost(o)))
        first = pts[0]
        start[name] = first.cand
        hull = [first]
        # Lower convex hull in (bytes saved, cost): slopes increase along it, so merging all
        # layers' segments by slope never makes a layer skip back up.
        for o in pts[1:]:
            if o.nbytes >= hull[-1].nbytes:
                continue
            while len(hull) >= 2 and _slope(hull[-2], hull[-1], cost) >= _slope(hull[-1], o, cost):
                hull.pop()
            hull.append(o)
        for a, b in zip(hull, hull[1:], strict=False):
            moves.append(_Move(name, a.cand, b.cand, _slope(a, b, cost)))
    moves.sort(key=lambda m: m.slope)
    return start, moves


def _slope(a: _Option, b: _Option, cost: Any) -> float:
    return (cost(b) - cost(a)) / max(a.nbytes - b.nbytes, 1)


def _score_assignment(
    work: nn.Module, assignment: dict[str, str], cache: dict[tuple[str, str], QuantizedModule], ev: Evaluator
) -> Score:
    repl = {n: cache[(n, c)] for n, c in assignment.items() if c != FLOAT}
    with swapped(work, repl):
        return ev.score(work)


def _assemble(
    model: nn.Module, assignment: dict[str, str], cache: dict[tuple[str, str], QuantizedModule]
) -> nn.Module:
    """A quantized copy of ``model`` from the cached layers (the same modules ``quantize`` builds)."""
    qmodel = copy.deepcopy(model).eval()
    for name, cand in assignment.items():
        if cand != FLOAT:
            set_submodule(qmodel, name, copy.deepcopy(cache[(name, cand)]))
    return qmodel


def _spread(n: int, count: int) -> list[int]:
    if count <= 0 or n == 0:
        return []
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def _backoff_steps(k: int) -> list[int]:
    """k-1 .. k-4, then k-8, k-16, ... 0: a few held-out checks, not one per step.

    >>> _backoff_steps(20)
    [19, 18, 17, 16, 12, 4, 0]
    """
    out = [k - i for i in range(1, 5) if k - i > 0]
    step = 8
    while k - step > 0:
        out.append(k - step)
        step *= 2
    return out + [0] if k > 0 else []


def _literal(name: str) -> str:
    return name.replace("[", "[[]")


def _recipe(
    layers: list[LayerPlan],
    assignment: dict[str, str],
    specs: dict[str, WeightSpec | None],
    metric: str,
    max_drop: float | None,
    budget_bytes: int | None,
) -> Recipe:
    """Default weight spec = the most common chosen format; one exact-name rule per other layer."""
    counts: dict[str, int] = {}
    for cand in assignment.values():
        if cand != FLOAT:
            counts[cand] = counts.get(cand, 0) + 1
    default = max(counts, key=lambda c: counts[c]) if counts else None
    rules = []
    for lay in layers:
        cand = assignment[lay.name]
        if cand == FLOAT:
            rules.append(LayerRule(_literal(lay.name), skip=True))
        elif cand != default:
            rules.append(LayerRule(_literal(lay.name), weight=specs[cand]))
    what = f"max drop {max_drop} {metric}" if max_drop is not None else f"<= {human_bytes(budget_bytes or 0)}"
    return Recipe(
        name="searched",
        description=f"per-layer formats chosen by lowbit.analysis.search ({what})",
        weight=None if default is None else specs[default],
        overrides=tuple(rules),
    )


def _point(label: str, nbytes: int, float_total: int, s: Score) -> FrontierPoint:
    return FrontierPoint(label, nbytes, 100.0 * nbytes / max(float_total, 1), s.value, s.drop)


def _describe(max_drop: float | None, target_bits: float | None, target_size: float | None) -> str:
    parts = []
    if max_drop is not None:
        parts.append(f"max_drop={max_drop}")
    if target_bits is not None:
        parts.append(f"target_bits={target_bits}")
    if target_size is not None:
        parts.append(f"target_size={target_size}")
    return ", ".join(parts)


def _explain(
    layers: list[LayerPlan],
    assignment: dict[str, str],
    options: dict[str, dict[str, _Option]],
    moves: list[_Move],
    chosen: int,
    final_k: int,
    max_drop: float | None,
) -> list[LayerChoice]:
    """One sentence per layer: what the next smaller format would have cost, alone."""
    later: dict[str, tuple[int, _Move]] = {}  # layer -> its first move not in the final model
    for i, mv in enumerate(moves):
        if i >= final_k and mv.layer not in later:
            later[mv.layer] = (i, mv)
    out = []
    for lay in layers:
        opts = options[lay.name]
        cand = assignment[lay.name]
        mine = opts[cand]
        smaller = sorted((o for o in opts.values() if o.nbytes < mine.nbytes), key=lambda o: -o.nbytes)
        verb = "kept float" if cand == FLOAT else f"at {cand}"
        if not smaller:
            reason = (
                f"{lay.name} {verb}: smallest candidate, costs {mine.risk:.2f} points alone, "
                f"saves {human_bytes(float_bytes(lay.module) - mine.nbytes)} vs float"
            )
        else:
            step, nxt = (
                (later[lay.name][0], later[lay.name][1].new) if lay.name in later else (-1, smaller[0].cand)
            )
            o = opts[nxt]
            reason = (
                f"{lay.name} {verb}: {nxt} cost {o.risk:.2f} points alone "
                f"(would save {human_bytes(mine.nbytes - o.nbytes)})"
            )
            if final_k <= step < chosen:
                reason += "; the search took that step, the held-out check undid it"
            elif step == chosen and max_drop is not None:
                reason += f"; that was the next step, and it took the combined model over {max_drop}"
            elif step > chosen:
                reason += "; not reached: steps saving more bytes per point lost came first"
        out.append(
            LayerChoice(
                lay.name,
                lay.kind,
                sum(p.numel() for p in lay.module.parameters()),
                cand,
                mine.nbytes,
                mine.risk,
                reason,
            )
        )
    return out
