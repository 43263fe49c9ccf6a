"""Modifiers: the steps a layer's weight goes through, in recipe order, inside a calibration stage.

A recipe's ``algorithm`` is one step or a sequence: scalers first (``smoothquant`` or ``awq``:
a per-input-channel divisor ``s``, with ``x / s`` at run time and ``W * s`` quantized), then one
quantizer (``rtn``, ``mse``, ``gptq``, ``awq``: scale search, clip search, round to nearest, or
``autoround``: rounding and clipping learned on the stage's output, alone or after ``gptq`` as
its starting point), then optionally ``bias_correction``. ``[awq, gptq]`` runs GPTQ on the
AWQ-scaled weight with the Hessian of the scaled input; ``[smoothquant, gptq]`` does the same
for W8A8. Sequences that cannot mean anything are refused before any work, with the reason.

The math is in ``lowbit.algorithms``; this module only feeds it the statistics a stage gathered
(``lowbit.ptq.stats``) and the weight matrices of each layer kind (``lowbit.ptq.matrices``).

>>> check_sequence(("awq", "gptq"))
>>> try:
...     check_sequence(("gptq", "awq"))
... except ValueError as err:
...     print(str(err)[:72])
recipe: algorithm ['gptq', 'awq']: gptq already quantizes the weight, so
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import torch

from lowbit import formats
from lowbit.algorithms.awq import awq_search_clip, awq_search_scales
from lowbit.algorithms.gptq import gptq_quantize, reconstruction_error
from lowbit.algorithms.rtn import choose_weight_qparams
from lowbit.algorithms.smoothquant import smoothquant_scales
from lowbit.codecs.scales import has_tensor_scale
from lowbit.granularity import PerChannel, PerGroup, PerTensor, block_shape, parse
from lowbit.nn.layers import is_hf_conv1d, quantize_weight
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import QParams, check_finite, dequantize, quantize
from lowbit.ptq.judge import ModuleJudge
from lowbit.ptq.matrices import Matrix, matrices, read, write
from lowbit.ptq.plan import LayerPlan
from lowbit.ptq.stats import Group, InputStats
from lowbit.recipes.spec import Recipe, WeightSpec
from lowbit.threads import single_thread

QUANTIZERS = ("rtn", "mse", "gptq", "awq", "autoround")
SCALERS = ("smoothquant", "awq")
DATA_AWARE = ("gptq", "awq", "autoround", "smoothquant", "bias_correction")
# Quantizers that compensate with calibration inputs: integer formats only, none for embeddings.
COMPENSATING = ("gptq", "awq", "autoround")
SMOOTHQUANT_DEFAULT_ALPHA = 0.5  # the paper's value for OPT / LLaMA-style decoders


def _quantizer_index(steps: tuple[str, ...]) -> int:
    return max(i for i, s in enumerate(steps) if s != "bias_correction")


def check_sequence(steps: tuple[str, ...], where: str = "recipe") -> None:
    """Refuse a modifier sequence that cannot mean anything, saying why (``ValueError``)."""
    shown = f"{where}: algorithm {list(steps)}"
    for i, step in enumerate(steps):
        if step in steps[:i]:
            raise ValueError(f"{shown} lists {step} twice; each step runs once")
    if all(s == "bias_correction" for s in steps):
        raise ValueError(
            f"{shown}: bias_correction corrects the output shift of a quantized weight; put a "
            "quantizer (rtn, mse, gptq or awq) before it"
        )
    q = _quantizer_index(steps)
    if steps[q] not in QUANTIZERS:
        raise ValueError(
            f"{shown} ends with {steps[q]}, which only rescales the weight; end it with a quantizer "
            f"(rtn, mse, gptq or awq), e.g. [{steps[q]}, gptq]"
        )
    if steps[q] == "autoround":
        if steps not in (("autoround",), ("gptq", "autoround")):
            raise ValueError(
                f"{shown}: autoround learns the rounding and clipping against the stage's float "
                "output itself, which already takes in what scaling and bias correction would fix; "
                "give it alone, or as [gptq, autoround] (starting from GPTQ's rounding)"
            )
        return
    for i, step in enumerate(steps[:q]):
        if step == "bias_correction":
            raise ValueError(f"{shown}: bias_correction corrects a quantized weight, so it must come last")
        if step not in SCALERS:
            raise ValueError(
                f"{shown}: {step} already quantizes the weight, so {steps[i + 1]} after it has nothing "
                "to work on; put smoothquant or awq before the quantizer and bias_correction last"
            )
    if q > 1:
        raise ValueError(
            f"{shown}: {' and '.join(steps[:q])} both rescale the same input channels; keep one of them"
        )


def needs_data(steps: tuple[str, ...]) -> bool:
    """Whether a sequence needs calibration statistics."""
    return any(s in DATA_AWARE for s in steps)


def _smoothquant_applies(layer: LayerPlan, recipe: Recipe) -> bool:
    return (
        layer.kind == "linear"
        and layer.activation.enabled
        and not any(fnmatch.fnmatchcase(layer.name, p) for p in recipe.smoothquant_exclude)
    )


@dataclass
class Notes:
    """What the pipeline did differently from the recipe's letter, by reason (for the user)."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.by_reason.setdefault(reason, []).append(name)

    def lines(self) -> list[str]:
        out = []
        for reason, names in self.by_reason.items():
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            out.append(f"{reason}: {shown}")
        return out


def layer_sequence(layer: LayerPlan, recipe: Recipe, notes: Notes | None = None) -> tuple[str, ...]:
    """The steps ``layer`` goes through: its weight spec's ``algorithm`` plus the recipe-wide
    ``smoothquant_alpha`` / ``bias_correction``, adapted to the layer kind. Raises ``ValueError``
    naming the layer for a sequence, format or layer that cannot work (before any calibration)."""
    assert layer.weight is not None
    spec, notes = layer.weight, notes or Notes()
    where = f"layer {layer.name}"
    steps = spec.steps
    if (
        recipe.smoothquant_alpha is not None
        and "smoothquant" not in steps
        and _smoothquant_applies(layer, recipe)
    ):
        steps = ("smoothquant", *steps)
    if recipe.bias_correction and "bias_correction" not in steps:
        if steps[-1] == "autoround":  # tuned against the float output: the shift is already in it
            notes.add("bias correction skipped (autoround is tuned on the stage's output)", layer.name)
        else:
            steps = (*steps, "bias_correction")
    check_sequence(steps, where)
    quantizer = steps[_quantizer_index(steps)]
    if layer.kind == "embedding":
        if quantizer in COMPENSATING:
            notes.add(
                "embeddings have no input to compensate: round to nearest with MSE-chosen clipping",
                layer.name,
            )
            return ("mse",)
        return (quantizer,)
    fmt = formats.get(spec.format)
    if quantizer in COMPENSATING and fmt.family != "int":
        raise ValueError(
            f"{quantizer.upper()} needs an integer format (int2..int8, uint2..uint8); "
            f"{layer.name} asks for {fmt.name}"
        )
    if "smoothquant" in steps:
        if not layer.activation.enabled:
            raise ValueError(
                f"{where}: smoothquant moves activation outliers into the weights for quantized "
                "activations, but this recipe keeps its activations float, so it would only make the "
                "weights harder to quantize: drop smoothquant or quantize activations"
            )
        if not _smoothquant_applies(layer, recipe):
            steps = tuple(s for s in steps if s != "smoothquant")
            notes.add("smoothquant skipped (linear layers only, minus smoothquant_exclude)", layer.name)
    g = parse(spec.granularity)
    if "gptq" in steps and not (
        isinstance(g, PerTensor | PerGroup) or (isinstance(g, PerChannel) and g.axis % 2 == 0)
    ):
        raise ValueError(
            f"{where}: GPTQ quantizes one input column at a time, so weight scales must be per output "
            f"channel, per group or per tensor; the recipe gives {spec.granularity!r}"
        )
    if layer.kind == "conv" and layer.module.groups > 1 and quantizer in ("gptq", "awq"):
        if isinstance(g, PerTensor):
            raise ValueError(
                f"{where}: {quantizer} on a grouped convolution calibrates each group on its own, which "
                "needs per-channel or per-group scales, not one scale per tensor"
            )
        if "awq" in steps:
            notes.add(
                "grouped convolutions: AWQ searches clipping only (no input channel feeds every output)",
                layer.name,
            )
    if quantizer == "autoround" and (
        layer.kind == "rnn" or (layer.kind == "conv" and layer.module.groups > 1)
    ):
        raise ValueError(
            f"{where}: autoround tunes linear and ungrouped convolution weights; give this "
            f"{'RNN' if layer.kind == 'rnn' else 'grouped convolution'} gptq or rtn (an override)"
        )
    if layer.kind == "rnn" and "bias_correction" in steps:
        steps = tuple(s for s in steps if s != "bias_correction")
        notes.add("bias correction skipped (RNN gates are not a plain affine output)", layer.name)
    if layer.kind == "rnn" and getattr(layer.module, "proj_size", 0) and quantizer in ("gptq", "awq"):
        raise ValueError(
            f"{where}: LSTM with proj_size is not supported by {quantizer}; give it algorithm rtn"
        )
    return steps


# --- applying a sequence to one group ---------------------------------------------------------------


@dataclass
class LayerResult:
    """What a layer's sequence produced."""

    weights: dict[str, QuantizedWeight]  # by parameter name (``weight``, ``weight_ih_l0``)
    smooth: torch.Tensor | None = None  # divisor per input channel (``x / s`` before the layer)
    effective: list[tuple[Matrix, torch.Tensor]] = field(default_factory=list)  # what x multiplies now
    bias_shift: torch.Tensor | None = None  # add to the bias (bias correction)


# Data-free layers quantize at most this many weights at a time when every row has its own
# parameters: the temporaries of one 32000 x 768 head in one go were 3.6x its float size.
RTN_CHUNK_ELEMENTS = 1 << 20


def quantize_rtn(layer: LayerPlan, steps: tuple[str, ...], apply: bool = False) -> LayerResult:
    """A data-free sequence (``rtn`` or ``mse``): quantize every weight of the layer now.

    ``apply=True`` writes the dequantized weight into the layer as it goes (``effective`` stays
    empty); large weights whose rows have their own parameters (per channel, per group) are then
    quantized ``RTN_CHUNK_ELEMENTS`` at a time, with the same codes as in one piece."""
    assert layer.weight is not None
    spec = dataclasses.replace(layer.weight, algorithm=steps[-1])
    result = LayerResult({})
    # One matrix per parameter: a grouped conv's groups share one kernel and are quantized as one.
    for m in {m.param: dataclasses.replace(m, rows=None) for m in matrices(layer)}.values():
        what = f"layer {layer.name} {m.param}"
        chunked = _rtn_in_chunks(layer, m, spec, what) if apply else None
        if chunked is not None:
            result.weights[m.param] = chunked
            continue
        qw = quantize_weight(read(layer, m), spec, what)
        result.weights[m.param] = qw
        if apply:
            write(layer, m, qw.dequantize())
        else:
            result.effective.append((m, qw.dequantize()))
    return result


def _rtn_in_chunks(layer: LayerPlan, m: Matrix, spec: WeightSpec, what: str) -> QuantizedWeight | None:
    """Quantize a large matrix a block of rows at a time, writing each block's dequantized values
    back; ``None`` where that is not the same as one piece (parameters spanning rows, learned
    grids, Hugging Face's transposed Conv1D) or not worth it (small matrices)."""
    p = getattr(layer.module, m.param)
    fmt, g = formats.get(spec.format), parse(spec.granularity)
    if is_hf_conv1d(layer.module) or p.dim() < 2 or p.numel() <= RTN_CHUNK_ELEMENTS:
        return None
    full = p.detach().reshape(p.shape[0], -1)
    rows, cols = full.shape
    # Formats with one scale per tensor (NVFP4's power of two) need the whole tensor at once.
    if fmt.family not in ("int", "grid") or block_shape(g, (rows, cols))[0] != 1 or has_tensor_scale(fmt):
        return None
    step = max(1, RTN_CHUNK_ELEMENTS // cols)
    codes = torch.empty(rows, cols, dtype=fmt.code_dtype, device=full.device)  # filled chunk by chunk
    scales, zeros = [], []
    qp = None
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        w = full[start:stop].float()
        check_finite(w, what)
        qp = choose_weight_qparams(w, fmt, g, spec.symmetric, spec.algorithm)
        c = quantize(w, fmt, qp)
        codes[start:stop] = c
        scales.append(qp.scale)
        zeros.append(qp.zero_point)
        write(layer, dataclasses.replace(m, rows=(start, stop)), dequantize(c, fmt, qp))
    assert qp is not None
    zero_point = None if zeros[0] is None else torch.cat(zeros)  # type: ignore[arg-type]
    joined = QParams(torch.cat(scales), zero_point, qp.block)
    qw = QuantizedWeight.from_codes(codes, fmt, joined, g, spec.symmetric, (rows, cols))
    qw.algorithm = "+".join(spec.steps)
    return qw


def _scaled_gram(stats: InputStats, c: torch.Tensor | None) -> torch.Tensor:
    """``X^T X / n`` of the scaled input ``x / c``."""
    g = stats.gram()
    if c is None:
        return g
    inv = 1.0 / c.double()
    return g * inv.unsqueeze(1) * inv.unsqueeze(0)


def _per_channel(v: torch.Tensor, taps: int) -> torch.Tensor:
    """Average over a conv's kernel taps, repeated back: one value per input channel."""
    return v if taps == 1 else v.reshape(-1, taps).mean(1).repeat_interleave(taps)


@dataclass
class _Entry:
    layer: LayerPlan
    m: Matrix
    w: torch.Tensor  # current (scaled) float matrix
    original: torch.Tensor


def gptq_as_recipe(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: WeightSpec,
    recipe: Recipe,
    updated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, QParams]:
    """``gptq_quantize`` on one ``[out, in]`` matrix with the weight spec's grid and the recipe's
    GPTQ options (``updated``: see ``gptq_quantize``)."""
    o = recipe.gptq
    extra = {} if updated is None else {"updated": updated}
    return gptq_quantize(
        w,
        hessian,
        formats.get(spec.format),
        parse(spec.granularity),
        bool(spec.symmetric),
        block_size=o.block_size,
        percdamp=o.damping,
        act_order=o.act_order,
        static_groups=o.static_groups,
        observer=o.observer,
        **extra,
    )


def _gptq(
    w: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec | None, recipe: Recipe
) -> tuple[torch.Tensor, QParams, dict[str, float]]:
    """GPTQ on one matrix with the recipe's options; its error and round-to-nearest's, for the report."""
    assert spec is not None
    fmt, g = formats.get(spec.format), parse(spec.granularity)
    with single_thread():  # many small ops: a second thread only adds sync cost
        c_codes, qp = gptq_as_recipe(w, hessian, spec, recipe)
        rtn_qp = choose_weight_qparams(w, fmt, g, spec.symmetric, "rtn")
        rtn = dequantize(quantize(w, fmt, rtn_qp), fmt, rtn_qp)
        info = {
            "gptq_error": reconstruction_error(w, dequantize(c_codes, fmt, qp), hessian),
            "rtn_error": reconstruction_error(w, rtn, hessian),
        }
    return c_codes, qp, info


def apply_group(group: Group, recipe: Recipe, judge: ModuleJudge | None = None) -> dict[str, LayerResult]:
    """Run the group's sequence on every matrix of its layers, from the group's statistics.

    With a ``judge`` (``lowbit.ptq.judge``), AWQ's scale search measures each candidate at the
    output of the judge's module (rerun on recorded inputs) instead of at each layer's output."""
    steps = group.sequence
    q = _quantizer_index(steps)
    quantizer, scalers, post = steps[q], list(steps[:q]), steps[q + 1 :]
    if quantizer == "awq":
        scalers.append("awq")  # AWQ as the quantizer: its scale search, then clip search below
    entries = []
    for layer in group.layers:
        for m in matrices(layer):
            w = read(layer, m)
            check_finite(w, f"layer {layer.name} {m.param}")
            entries.append(_Entry(layer, m, w.clone(), w))
    by_source: dict[str, list[_Entry]] = {}
    for e in entries:
        by_source.setdefault(e.m.source or "", []).append(e)
    divisor: dict[str, torch.Tensor] = {}  # cumulative column divisor per source (x / divisor)

    for step in scalers:
        for source, items in by_source.items():
            first = items[0]
            if not first.m.smoothable or (step == "smoothquant" and first.layer.kind != "linear"):
                continue
            stats = group.stats[source]
            c = divisor.get(source)
            ws = [e.w for e in items]
            if step == "smoothquant":
                alpha = recipe.smoothquant_alpha
                alpha = SMOOTHQUANT_DEFAULT_ALPHA if alpha is None else alpha
                absmax = stats.abs_max if c is None else stats.abs_max / c
                s = smoothquant_scales(absmax, ws, alpha)
            else:
                spec = first.layer.weight
                assert spec is not None
                act = stats.abs_mean() if c is None else stats.abs_mean() / c
                loss = None
                if judge is not None and first.m.taps == 1:

                    def loss(effective: list[torch.Tensor], items=items, c=c, judge=judge) -> float:
                        # What x itself meets: an earlier divisor c is undone as well.
                        pairs = zip(items, effective, strict=True)
                        return judge.error([(e.layer, e.m, v if c is None else v / c) for e, v in pairs])

                with single_thread():  # small ops; one thread keeps results independent of threads
                    s = awq_search_scales(
                        ws,
                        None,
                        formats.get(spec.format),
                        parse(spec.granularity),
                        spec.symmetric,
                        act_mean=_per_channel(act, first.m.taps),
                        gram_matrix=None if loss is not None else _scaled_gram(stats, c),
                        duo_scaling=recipe.awq.duo_scaling,
                        loss=loss,
                    )
            s = s.to(first.w.device)
            divisor[source] = s if c is None else c * s
            for e in items:
                e.w = e.w * s

    codes: dict[tuple[str, str], list[tuple[_Entry, torch.Tensor, QParams, dict[str, float]]]] = {}
    for e in entries:
        spec = e.layer.weight
        assert spec is not None
        source = e.m.source or ""
        fmt, g = formats.get(spec.format), parse(spec.granularity)
        stats = group.stats.get(source)
        c = divisor.get(source)
        info: dict[str, float] = {}
        if quantizer == "gptq":
            assert stats is not None
            hessian = _scaled_gram(stats, c).mul_(2.0).float()  # in place: one float64 copy less
            c_codes, qp, info = _gptq(e.w, hessian, spec, recipe)
        elif quantizer == "awq":
            assert stats is not None
            with single_thread():
                qp = awq_search_clip(e.w, None, fmt, g, spec.symmetric, gram_matrix=_scaled_gram(stats, c))
            c_codes = quantize(e.w, fmt, qp)
        elif e.m.rows is None:
            qp = choose_weight_qparams(e.w, fmt, g, spec.symmetric, quantizer)
            c_codes = quantize(e.w, fmt, qp)
        else:  # grouped conv, round to nearest: the whole kernel at once, below
            c_codes, qp = None, None  # type: ignore[assignment]
        codes.setdefault((e.layer.name, e.m.param), []).append((e, c_codes, qp, info))

    results: dict[str, LayerResult] = {layer.name: LayerResult({}) for layer in group.layers}
    for (name, param), parts in codes.items():
        layer = parts[0][0].layer
        spec = layer.weight
        assert spec is not None
        fmt, g = formats.get(spec.format), parse(spec.granularity)
        if len(parts) == 1:
            e, c_codes, qp, info = parts[0]
        elif parts[0][1] is None:
            full = torch.cat([p[0].w for p in parts])
            qp = choose_weight_qparams(full, fmt, g, spec.symmetric, quantizer)
            c_codes, info = quantize(full, fmt, qp), {}
        else:  # grouped conv: one matrix per group, stacked back along the output channels
            e = parts[0][0]
            c_codes = torch.cat([p[1] for p in parts])
            qps = [p[2] for p in parts]
            zps = [p.zero_point for p in qps]
            qp = QParams(
                torch.cat([p.scale for p in qps]), None if zps[0] is None else torch.cat(zps), qps[0].block
            )
            info = {k: sum(p[3].get(k, 0.0) for p in parts) for k in parts[0][3]}
        shape = (c_codes.shape[0], c_codes.shape[1])
        qw = QuantizedWeight.from_codes(c_codes, fmt, qp, g, spec.symmetric, shape)
        qw.algorithm = "+".join(steps)
        qw.info = info
        result = results[name]
        result.weights[param] = qw
        deq = qw.dequantize()
        for part in parts:
            pe = part[0]
            c = divisor.get(pe.m.source or "")
            rows = deq if pe.m.rows is None else deq[pe.m.rows[0] : pe.m.rows[1]]
            effective = rows if c is None else rows / c
            result.effective.append((pe.m, effective))
            if pe.m.smoothable and c is not None:
                result.smooth = c if pe.m.taps == 1 else c[:: pe.m.taps].contiguous()
            if "bias_correction" in post and layer.kind in ("linear", "conv"):
                stats = group.stats[pe.m.source or ""]
                shift = ((pe.original.double() - effective.double()) @ stats.mean().double()).float()
                if result.bias_shift is None:
                    out = pe.original.shape[0] if pe.m.rows is None else layer.module.out_channels
                    result.bias_shift = torch.zeros(out, device=shift.device)
                if pe.m.rows is None:
                    result.bias_shift += shift
                else:
                    result.bias_shift[pe.m.rows[0] : pe.m.rows[1]] += shift
    return results
