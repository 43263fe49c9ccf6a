"""``sensitivity``: which layer causes the accuracy drop?

For every layer the recipe quantizes, quantize *only that layer* (the same recipe with
``include=(name,)``, so static activations, GPTQ and friends behave exactly as in the full run)
and measure the task metric on ``data``. Next to that ground truth sit two cheap proxies, each
with the seconds it took, so users can see how far a proxy can be trusted on their model:

- ``layer_sqnr_db``: SQNR of the quantized layer's output against the float layer's, on the
  float model's own inputs to that layer (the first ``proxy_batches`` batches).
- ``fisher``: the second-order estimate of the loss increase, ``1/2 * sum(F * dW**2)``, with ``F``
  the diagonal Fisher information. For classifiers it is the true Fisher (labels sampled from the
  model's own prediction, so batch gradients are unbiased); otherwise the Gauss-Newton diagonal
  of the output error, from gradients of ``<output, u>`` with random Gaussian ``u``.

>>> import torch, lowbit
>>> from lowbit.analysis import sensitivity
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> data = [(torch.randn(64, 16), torch.randint(0, 4, (64,)))]
>>> report = sensitivity(model, data, "accuracy", "int4-weight-only")
>>> [row.name for row in report.layers]  # most sensitive first  # doctest: +SKIP
['2', '0']
>>> sorted(report.to_dict()["layers"][0])[:4]
['drop', 'fisher', 'fisher_seconds', 'float_bytes']
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.analysis.common import Evaluator, human_bytes, split_data
from lowbit.analysis.plots import bar_chart_png
from lowbit.eval.metrics import output_tensor, sqnr_db
from lowbit.modelcheck import require_module
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import is_hf_conv1d
from lowbit.ptq.convert import model_device, to_device
from lowbit.ptq.plan import plan_model
from lowbit.recipes import resolve
from lowbit.recipes.spec import Recipe
from lowbit.zoo.base import call_model


@dataclass
class LayerSensitivity:
    """One layer's row: the measured metric change and the proxies, each with its cost."""

    name: str
    kind: str
    format: str
    parameters: int
    stored_bytes: int  # this layer quantized alone, as stored
    float_bytes: int
    value: float  # the task metric with only this layer quantized
    drop: float  # metric_drop from float (points; positive = worse)
    output_sqnr_db: float  # the model output's SQNR against float's, same run
    layer_sqnr_db: float
    fisher: float
    quantize_seconds: float
    metric_seconds: float
    sqnr_seconds: float
    fisher_seconds: float


@dataclass
class SensitivityReport:
    """Layers ranked most sensitive first (largest drop, then lowest output SQNR)."""

    metric: str
    recipe: str
    float_value: float
    layers: list[LayerSensitivity] = field(default_factory=list)
    seconds: float = 0.0

    def ranked_names(self) -> list[str]:
        """Layer names, most sensitive first."""
        return [row.name for row in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinite SQNRs become ``None``)."""
        rows = [{k: _finite(v) for k, v in dataclasses.asdict(r).items()} for r in self.layers]
        return {
            "metric": self.metric,
            "recipe": self.recipe,
            "float_value": self.float_value,
            "seconds": self.seconds,
            "layers": rows,
        }

    def to_markdown(self) -> str:
        """The ranked table, with the seconds each measure took in its column header."""
        t_metric = sum(r.metric_seconds for r in self.layers)
        t_sqnr = sum(r.sqnr_seconds for r in self.layers)
        t_fisher = sum(r.fisher_seconds for r in self.layers)
        lines = [
            f"Sensitivity of `{self.metric}` (float {self.float_value:.4f}) to quantizing one layer "
            f"at a time with recipe `{self.recipe}`; ranked most sensitive first.",
            "",
            f"| rank | layer | kind | format | params | size | {self.metric} | drop (pts) "
            f"| output SQNR dB | layer SQNR dB | Fisher est. |",
            "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(self.layers, 1):
            lines.append(
                f"| {i} | {r.name} | {r.kind} | {r.format} | {r.parameters:,} "
                f"| {human_bytes(r.stored_bytes)} "
                f"| {r.value:.4f} | {r.drop:+.2f} | {_db(r.output_sqnr_db)} | {_db(r.layer_sqnr_db)} "
                f"| {r.fisher:.3g} |"
            )
        lines += [
            "",
            f"Time: metric {t_metric:.1f} s, layer SQNR {t_sqnr:.1f} s, Fisher {t_fisher:.1f} s "
            f"(quantizing the layers: {sum(r.quantize_seconds for r in self.layers):.1f} s).",
        ]
        return "\n".join(lines)

    def plot_png(self) -> bytes:
        """Bar chart of the drop per layer, most sensitive on top (PNG bytes)."""
        return bar_chart_png(
            [r.name for r in self.layers],
            [r.drop for r in self.layers],
            [r.layer_sqnr_db for r in self.layers],
            f"{self.metric} drop per layer ({self.recipe})",
        )


def sensitivity(
    model: nn.Module,
    data: Sequence[Any],
    metric: str,
    recipe: str | Recipe | dict[str, Any] = "int4-weight-only",
    calibration: Sequence[Any] | None = None,
    reference: Sequence[torch.Tensor] | None = None,
    *,
    proxy_batches: int = 2,
    progress: bool = False,
) -> SensitivityReport:
    """Quantize each layer alone as ``recipe`` says and measure ``metric`` on ``data``.

    Args:
        model: the float model (left unchanged).
        data: evaluation batches: ``(inputs, labels)`` for ``accuracy``, input batches otherwise.
        metric: ``accuracy``, ``cosine`` (against ``reference`` or the float model's outputs) or
            ``perplexity``.
        recipe: preset name, YAML path, dict or ``Recipe``; its include / exclude pick the layers.
        calibration: input batches for recipes with static activations or data-aware algorithms.
        reference: float outputs on ``data`` for the cosine metric (computed when ``None``).
        proxy_batches: how many batches of ``data`` the SQNR and Fisher proxies use.
        progress: show a progress bar with the remaining time.

    Example (digits CNN, a few seconds)::

        zm = lowbit.zoo.get("digits-cnn")
        report = sensitivity(zm.model, zm.eval_data, zm.metric, "int4-weight-only")
        print(report.to_markdown()); open("sens.png", "wb").write(report.plot_png())
    """
    require_module(model, "sensitivity")
    from lowbit.api import quantize

    started = time.perf_counter()
    recipe = resolve(recipe)
    if recipe.needs_calibration and not calibration:
        raise ValueError(f"recipe {recipe.name!r} calibrates activations: pass calibration=[batch, ...]")
    layers = plan_model(model, recipe).layers
    if not layers:
        raise ValueError(f"recipe {recipe.name!r} selects no layer of this model; nothing to analyse")
    evaluator = Evaluator(model, data, metric, reference)
    inputs, _ = split_data(list(data), metric)
    proxy_inputs = inputs[: max(1, proxy_batches)]
    captured = _capture_layer_io(model, [lay.name for lay in layers], proxy_inputs)
    grads, grad_seconds = _fisher_diagonal(model, [lay.module for lay in layers], proxy_inputs, metric)

    rows = []
    for layer in tqdm(layers, desc="sensitivity", unit="layer", disable=not progress, leave=False):
        t0 = time.perf_counter()
        single = dataclasses.replace(recipe, include=(_literal(layer.name),))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plan's warnings were the user's to see once, not 40 times
            qmodel = quantize(model, single, calibration=calibration, progress=False)
        qlayer = qmodel.get_submodule(layer.name)
        assert isinstance(qlayer, QuantizedModule)
        t1 = time.perf_counter()
        score = evaluator.score(qmodel)
        t2 = time.perf_counter()
        args, kwargs, float_out = captured[layer.name]
        with torch.no_grad():
            layer_sqnr = sqnr_db(
                float_out, [output_tensor(qlayer(*a, **k)) for a, k in zip(args, kwargs, strict=True)]
            )
        t3 = time.perf_counter()
        fisher = _fisher_estimate(layer.module, qlayer, grads)
        t4 = time.perf_counter()
        rows.append(
            LayerSensitivity(
                name=layer.name,
                kind=layer.kind,
                format=",".join(sorted({qw.fmt.name for qw in qlayer.quantized_weights().values()})),
                parameters=sum(p.numel() for p in layer.module.parameters()),
                stored_bytes=qlayer.stored_bytes,
                float_bytes=sum(p.numel() * p.element_size() for p in layer.module.parameters()),
                value=score.value,
                drop=score.drop,
                output_sqnr_db=score.output_sqnr_db,
                layer_sqnr_db=layer_sqnr,
                fisher=fisher,
                quantize_seconds=t1 - t0,
                metric_seconds=t2 - t1,
                sqnr_seconds=t3 - t2 + captured["__seconds__"] / len(layers),
                fisher_seconds=t4 - t3 + grad_seconds / len(layers),
            )
        )
    # Accuracy on a few hundred examples moves in coarse steps; the output SQNR breaks the ties.
    rows.sort(key=lambda r: (-r.drop, r.output_sqnr_db))
    return SensitivityReport(metric, recipe.name, evaluator.float_value, rows, time.perf_counter() - started)


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly ``name`` (``[`` is the only special character in names)."""
    return name.replace("[", "[[]")


def _capture_layer_io(model: nn.Module, names: list[str], inputs: list[Any]) -> dict[str, Any]:
    """Every named layer's call arguments and float output on ``inputs`` (one float pass)."""
    started = time.perf_counter()
    store: dict[str, Any] = {n: ([], [], []) for n in names}
    handles = []

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            store[name][0].append(args)
            store[name][1].append(kwargs)
            store[name][2].append(output_tensor(out).detach())

        return fn

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name), with_kwargs=True))
    try:
        device = model_device(model)
        with torch.no_grad():
            for batch in inputs:
                call_model(model, to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
    store["__seconds__"] = time.perf_counter() - started
    return store


def _fisher_diagonal(
    model: nn.Module, modules: list[nn.Module], inputs: list[Any], metric: str, draws: int = 2
) -> tuple[dict[int, torch.Tensor], float]:
    """Diagonal Fisher (or Gauss-Newton) of every 2-D+ weight of ``modules``, keyed by ``id(param)``."""
    started = time.perf_counter()
    params = [p for m in modules for p in m.parameters(recurse=True) if p.dim() >= 2]
    unique = list({id(p): p for p in params}.values())
    flags = [p.requires_grad for p in unique]
    sums = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in unique}
    gen = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for p in unique:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in inputs:
                for _ in range(draws):
                    out = output_tensor(call_model(model, to_device(batch, device))).float()
                    if metric == "accuracy":
                        probs = torch.softmax(out.detach().reshape(-1, out.shape[-1]), dim=-1).cpu()
                        labels = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(out.device)
                        loss = nn.functional.cross_entropy(
                            out.reshape(-1, out.shape[-1]), labels, reduction="sum"
                        )
                    else:
                        u = torch.randn(out.shape, generator=gen).to(out.device)
                        loss = (out * u).sum()
                    grads = torch.autograd.grad(loss, unique, allow_unused=True)
                    for p, g in zip(unique, grads, strict=True):
                        if g is not None:
                            sums[id(p)] += g.float() ** 2 / (len(inputs) * draws)
    finally:
        for p, flag in zip(unique, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return sums, time.perf_counter() - started


def _fisher_estimate(module: nn.Module, qlayer: QuantizedModule, fisher: dict[int, torch.Tensor]) -> float:
    """``1/2 sum(F * (W_q - W)**2)`` over the layer's quantized weights."""
    total = 0.0
    with torch.no_grad():
        for qname, qw in qlayer.quantized_weights().items():
            pname = qname.rsplit(".", 1)[-1]
            param = module.get_parameter("weight" if pname == "qweight" else pname)
            deq = qw.dequantize()
            if tuple(deq.shape) != tuple(param.shape):
                # HF Conv1D stores [in, out]; convolutions are quantized as [out, in * kernel] matrices.
                deq = deq.t() if is_hf_conv1d(module) else deq.reshape(param.shape)
            f = fisher.get(id(param))
            if f is not None:
                total += 0.5 * float((f * (deq.float() - param.detach().float()) ** 2).sum())
    return total


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and math.isinf(v) else v


def _db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"
