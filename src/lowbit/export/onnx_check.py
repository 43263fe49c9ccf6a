"""``export_onnx`` proves its file: ONNX Runtime run on the example (and on a perturbed copy) against PyTorch.

Three things go wrong silently without this check:

- **traced control flow**: the TorchScript exporter records one path through Python ``if`` / ``for``
  on tensor values (a detector's NMS written as a Python loop, ``.item()`` thresholds); the graph
  then matches PyTorch on the example only. A second input (the example plus noise) shows it;
- **denormal activations**: a model whose intermediate values fall below float32's smallest
  normal (~1.18e-38; random-init networks with tiny weight init) is quantized faithfully by lowbit,
  but runtimes that flush denormals to zero (ORT with ``set_denormal_as_zero``, GPUs, many
  accelerators) give zeros or other values;
- **all-zero outputs** in ORT where PyTorch's are not.

Each gives one warning naming the cause and what to do, also kept in ``report.warnings``.

>>> import torch
>>> subnormal_modules({"a": torch.tensor([1e-39]), "b": torch.tensor([0.0, 1.0])})
['a']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

TINY = float(torch.finfo(torch.float32).tiny)  # float32's smallest normal, 1.1755e-38
MIN_COSINE = 0.99  # below this ORT and PyTorch disagree for a reason other than rounding ties


def _has_subnormal(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return False
    a = t.detach().abs()
    return bool(((a > 0) & (a < TINY)).any())


def subnormal_modules(outputs: Mapping[str, Any]) -> list[str]:
    """Names whose output tensor(s) hold float32 denormals (``0 < |x| < 1.18e-38``)."""
    found = []
    for name, out in outputs.items():
        tensors = out if isinstance(out, list | tuple) else [out]
        if any(isinstance(t, torch.Tensor) and _has_subnormal(t) for t in tensors):
            found.append(name)
    return found


def trace_subnormals(model: nn.Module, run: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``run()``'s result and the modules of ``model`` whose outputs held denormals during it."""
    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            if name not in found and subnormal_modules({name: out}):
                found.append(name)

        return record

    handles = [m.register_forward_hook(hook(n or "<model>")) for n, m in model.named_modules()]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return result, found


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    if a.numel() == 0:
        return 1.0
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def compare(
    names: list[str],
    ort_out: list[torch.Tensor],
    ref: list[torch.Tensor],
    before: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Per-output agreement: shapes that differ, the lowest cosine, outputs all zero in ORT only.

    ``before``: ORT's outputs on the example, given when the tracer saw the model read tensor values
    as Python numbers; ``traced_shapes`` then lists the outputs whose size PyTorch changed on this
    input while ORT's stayed the example's (a size recorded as a constant). A size the graph
    computes itself may still differ by a box whose score rounding moved across a threshold.
    """
    shapes = [n for n, o, r in zip(names, ort_out, ref, strict=True) if tuple(o.shape) != tuple(r.shape)]
    traced = []
    if before is not None:
        same_as_before = {n for n, o, b in zip(names, ort_out, before, strict=True) if o.shape == b.shape}
        traced = [n for n in shapes if n in same_as_before]
    same = [(n, o, r) for n, o, r in zip(names, ort_out, ref, strict=True) if n not in shapes]
    cos = {n: _cosine(o, r) for n, o, r in same}
    zero = [n for n, o, r in same if o.numel() and not o.any() and r.any()]
    worst = min(cos, key=cos.__getitem__) if cos else None
    return {
        "shape_mismatch": shapes,
        "traced_shapes": traced,
        "min_cosine": None if worst is None else round(cos[worst], 6),
        "worst_output": worst,
        "all_zero_in_ort": zero,
    }


def perturbed(tensors: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The example with noise on its float tensors (token ids and masks stay as they are)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in tensors:
        if t.is_floating_point() and t.numel():
            scale = float(t.float().std()) if t.numel() > 1 else 1.0
            noise = torch.randn(t.shape, generator=g) * (0.5 * (scale or 1.0))
            t = t + noise.to(t.dtype)
        out.append(t)
    return tuple(out)


def messages(example: dict[str, Any], second: dict[str, Any] | None, subnormal: list[str]) -> list[str]:
    """Warnings for the report (empty when ORT follows PyTorch and no denormal was seen)."""
    out = []
    if subnormal:
        names = ", ".join(subnormal[:4]) + (f" (+{len(subnormal) - 4})" if len(subnormal) > 4 else "")
        out.append(
            f"activations below float32's smallest normal (~1.2e-38) in {names}: runtimes that flush "
            "denormals to zero (ONNX Runtime with set_denormal_as_zero, GPUs, NPUs) will differ from "
            "PyTorch. This is the model's scale, not quantization (random init with a tiny weight init "
            "does it): use trained weights or a larger init (e.g. initializer_range), or rescale the inputs"
        )
    zero = example["all_zero_in_ort"]
    if zero:
        cause = "denormal activations flushed to zero" if subnormal else "values lost in ORT"
        out.append(
            f"ONNX Runtime outputs {zero} are all zero where PyTorch's are not ({cause}); do not use this "
            "file as is: check the model's activation scale, or export the float model to compare"
        )
    low = example["min_cosine"] is not None and example["min_cosine"] < MIN_COSINE
    if example["shape_mismatch"] or low:
        if not zero:
            out.append(
                f"ONNX Runtime does not match PyTorch on the example (shapes differ: "
                f"{example['shape_mismatch']}; lowest output cosine {example['min_cosine']} at "
                f"{example['worst_output']!r}); report it with the model"
            )
    elif second is not None and (
        second["traced_shapes"] or (second["min_cosine"] is not None and second["min_cosine"] < MIN_COSINE)
    ):
        out.append(
            "the graph matches PyTorch on the example but not on a second input (sizes fixed at the "
            f"example's: {second['traced_shapes']}; lowest cosine {second['min_cosine']} at "
            f"{second['worst_output']!r}): "
            "Python control flow on tensor values (a loop over detections, NMS in Python, .item() "
            "thresholds) was recorded as constants. Export the model without that post-processing "
            "(run it on the ORT outputs) or write it with tensor ops (masks, topk)"
        )
    return out
