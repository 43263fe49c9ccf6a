"""Deep Compression (Han et al., 2016) in one call: prune -> k-means codebook -> entropy-coded storage.

1. **Prune**: iterative magnitude pruning with fine-tuning (``iterative_prune``).
2. **Share weights**: per layer, 1-D k-means on the *surviving* weights learns ``2**bits - 1``
   centroids; the value 0 is always the last codebook entry, so pruned weights stay exactly zero.
   Optionally the centroids are fine-tuned (each step, every cluster is reset to the mean of its
   trained weights, with assignments fixed: the shared-weight update of the paper).
3. **Entropy-code**: the packed model (format ``kmeans_<bits>``, one codebook per tensor) is saved
   with ``lowbit.save(..., compression="lzma")``: a coded artifact that stores each pruned code
   tensor as run lengths of the zero code plus the other codes, biases and centroids (rounded to
   bfloat16) as their two high bytes, and a compact manifest, all LZMA-coded.

``disk_size`` measures the result on disk against the float model saved as safetensors.

>>> import torch
>>> from lowbit.train import batches
>>> x, y = torch.randn(128, 16), torch.randint(0, 2, (128,))
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
>>> result = deep_compress(model, batches(x, y, 32), sparsity=0.8, bits=3, steps=1, epochs_per_step=1,
...                        progress=False)
>>> type(result.model[0]).__name__, result.model[0].qweight.fmt.name, round(result.sparsity, 1)
('QuantizedLinear', 'kmeans_3', 0.8)
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.codecs.kmeans1d import learn_grid
from lowbit.export.artifact import save
from lowbit.nn.layers import QuantizedRNN, linear_weight
from lowbit.nn.qweight import QuantizedWeight
from lowbit.primitives import QParams, dequantize, quantize
from lowbit.pruning.masks import Masks
from lowbit.pruning.schedule import PruneResult, iterative_prune
from lowbit.ptq.convert import prepare
from lowbit.ptq.plan import plan_model
from lowbit.recipes.spec import Recipe, WeightSpec
from lowbit.train import FitResult, LossFn, fit


def deep_compression_recipe(bits: int = 4) -> Recipe:
    """Weight-only recipe with one ``kmeans_<bits>`` codebook per tensor (what ``deep_compress`` packs).

    >>> deep_compression_recipe(5).weight.format
    'kmeans_5'
    """
    return Recipe(
        name=f"deep-compression-{bits}bit",
        description=f"pruned weights, {2**bits}-entry k-means codebook per tensor, lzma-coded artifact",
        weight=WeightSpec(format=f"kmeans_{bits}", granularity="tensor"),
    )


def zero_codebook(w: torch.Tensor, bits: int) -> QParams:
    """Per-tensor codebook: k-means of the nonzero values of ``w`` (``2**bits - 1`` centroids) plus 0.

    >>> qp = zero_codebook(torch.tensor([[0.0, 0.0, 1.0, 1.1, -2.0, 0.0]]), 2)
    >>> qp.codebook.flatten().tolist()
    [-2.0, 0.0, 1.0, 1.100000023841858]
    """
    levels = 1 << bits
    nonzero = w.detach().float().flatten()
    nonzero = nonzero[nonzero != 0]
    if nonzero.numel() == 0:
        centroids = torch.zeros(levels - 1)
    else:
        centroids = learn_grid(nonzero.cpu().reshape(1, -1), levels - 1).flatten()
    grid = torch.cat([centroids, torch.zeros(1)]).sort().values.to(w.device)
    ones = (1,) * w.dim()
    return QParams(torch.ones(ones, device=w.device), None, tuple(w.shape), grid.reshape(*ones, levels))


def _matrices(model: nn.Module, recipe: Recipe) -> dict[str, dict[str, nn.Parameter]]:
    """Per planned layer: its weight parameters by attribute name (``weight``, ``weight_ih_l0``...)."""
    out = {}
    for layer in plan_model(model, recipe).layers:
        params = dict(layer.module.named_parameters(recurse=False))
        out[layer.name] = {n: p for n, p in params.items() if n.startswith("weight") and p.dim() >= 2}
    return out


def _as_matrix(module: nn.Module, pname: str, p: torch.Tensor) -> torch.Tensor:
    if pname == "weight" and isinstance(module, nn.Linear):
        return linear_weight(module)
    return p.detach().reshape(p.shape[0], -1) if p.dim() > 2 else p.detach()


class SharedWeights:
    """Fixed cluster assignments per weight; ``project(model)`` resets every weight to its cluster's
    mean (0 stays 0), which turns ordinary training into centroid fine-tuning."""

    def __init__(self, model: nn.Module, recipe: Recipe, bits: int) -> None:
        self.assignments: dict[str, tuple[torch.Tensor, int]] = {}
        for name, params in _matrices(model, recipe).items():
            for pname, p in params.items():
                qp = zero_codebook(p, bits)
                codes = quantize(p.detach(), _fmt(bits), qp).long()
                zero = int((qp.codebook.flatten() == 0).nonzero()[0])
                self.assignments[f"{name}.{pname}" if name else pname] = (codes, zero)
                with torch.no_grad():
                    p.copy_(dequantize(codes, _fmt(bits), qp).to(p.dtype))
        self.levels = 1 << bits

    @torch.no_grad()
    def project(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for key, (codes, zero) in self.assignments.items():
            p = params[key]
            flat, idx = p.flatten(), codes.flatten()
            sums = torch.zeros(self.levels, dtype=p.dtype, device=p.device).index_add_(0, idx, flat)
            counts = torch.bincount(idx, minlength=self.levels).clamp(min=1).to(p.dtype)
            means = sums / counts
            means[zero] = 0.0
            p.copy_(means[idx].reshape(p.shape))


def _fmt(bits: int):  # noqa: ANN202
    from lowbit import formats

    return formats.get(f"kmeans_{bits}")


def pack_kmeans(
    model: nn.Module, bits: int = 4, recipe: Recipe | None = None, round_codebooks: bool = False
) -> nn.Module:
    """The packed ``kmeans_<bits>`` model for (pruned) float ``model``, zero kept exact (a copy).

    ``round_codebooks`` rounds every centroid to bfloat16 precision (kept in float32; a coded
    artifact then stores only the two high bytes of each).
    """
    recipe = recipe or deep_compression_recipe(bits)
    fmt = _fmt(bits)
    weights: dict[str, dict[str, QuantizedWeight]] = {}
    for name, params in _matrices(model, recipe).items():
        module = model.get_submodule(name)
        weights[name] = {}
        for pname, p in params.items():
            w = _as_matrix(module, pname, p)
            qp = zero_codebook(w, bits)
            if round_codebooks:
                assert qp.codebook is not None
                qp = dataclasses.replace(qp, codebook=qp.codebook.to(torch.bfloat16).float())
            qw = QuantizedWeight.from_codes(quantize(w, fmt, qp), fmt, qp, "tensor", True, tuple(w.shape))
            qw.algorithm = "deep-compression"
            weights[name][pname] = qw
    single = {n: w["weight"] for n, w in weights.items() if "weight" in w}
    qmodel = prepare(model, recipe, weights=single, warn=False)
    for name, ws in weights.items():
        qlayer = qmodel.get_submodule(name)
        if isinstance(qlayer, QuantizedRNN):
            for pname, qw in ws.items():
                qlayer.weights[pname] = qw
    return qmodel.eval()


@torch.no_grad()
def merge_lstm_biases(model: nn.Module) -> None:
    """Move every LSTM's ``bias_hh`` into ``bias_ih`` (their sum is all the cell uses), in place.

    The zeroed half then costs almost nothing once entropy-coded. Not done for GRU, whose
    hidden bias sits inside the reset gate's product.
    """
    for module in model.modules():
        if isinstance(module, nn.LSTM) and module.bias:
            for name, p in module.named_parameters():
                if name.startswith("bias_hh"):
                    getattr(module, name.replace("bias_hh", "bias_ih")).add_(p)
                    p.zero_()


@torch.no_grad()
def round_biases_bf16(model: nn.Module) -> None:
    """Round every 1-D float parameter (biases) to the nearest bfloat16 value, in place."""
    for p in model.parameters():
        if p.dim() == 1 and p.dtype == torch.float32:
            p.copy_(p.to(torch.bfloat16).float())


@dataclass
class DeepCompressionResult:
    """The packed model, the pruning masks, the sparsity reached and the training runs."""

    model: nn.Module
    masks: Masks
    sparsity: float
    bits: int
    pruning: PruneResult
    finetune: FitResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Training seconds (pruning fine-tunes plus centroid fine-tuning)."""
        return self.pruning.seconds + (self.finetune.seconds if self.finetune else 0.0)


def deep_compress(
    model: nn.Module,
    train_data: Iterable[Any],
    val_data: Iterable[Any] | None = None,
    *,
    sparsity: float = 0.8,
    bits: int = 4,
    scope: str = "layer",
    steps: int = 3,
    epochs_per_step: int = 2,
    centroid_epochs: int = 1,
    round_biases: bool = True,
    loss_fn: LossFn | None = None,
    **fit_options: Any,
) -> DeepCompressionResult:
    """Run the three Deep Compression stages on a copy of ``model``; save the result with
    ``lowbit.save(result.model, dir, compression="lzma")`` (``disk_size`` does and measures it).

    ``round_biases`` rounds the float biases and the codebook centroids to bfloat16 precision (kept
    in float32 tensors; the coded artifact leaves out their all-zero low bytes: half the bytes).
    ``fit_options`` go to every ``lowbit.train.fit`` call (``lr``, ``progress``, ``seed`` ...).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"k-means codebooks have 1..8 bits, got {bits}")
    recipe = deep_compression_recipe(bits)
    work = copy.deepcopy(model)
    pruned = iterative_prune(
        work, sparsity, train_data, val_data, scope=scope, steps=steps, epochs_per_step=epochs_per_step,
        loss_fn=loss_fn, **fit_options,
    )  # fmt: skip
    shared = SharedWeights(work, recipe, bits)
    tuned = None
    if centroid_epochs > 0:
        options = dict(fit_options, restore_best=False)
        tuned = fit(
            work, train_data, val_data, loss_fn, epochs=centroid_epochs,
            after_step=lambda: shared.project(work), **options,
        )  # fmt: skip
    merge_lstm_biases(work)
    if round_biases:
        round_biases_bf16(work)
    qmodel = pack_kmeans(work, bits, recipe, round_codebooks=round_biases)
    qmodel.lowbit_recipe = recipe
    qmodel.lowbit_compression = "lzma"  # the last stage: lowbit.save entropy-codes this model
    return DeepCompressionResult(qmodel, pruned.masks, pruned.masks.sparsity(), bits, pruned, tuned)


def disk_size(qmodel: nn.Module, float_model: nn.Module, compression: str = "lzma") -> dict[str, float]:
    """Save both models to a temporary directory and compare bytes on disk.

    ``float_bytes``: the float ``state_dict`` as one safetensors file. ``tensor_bytes``: the lowbit
    artifact's tensor file (entropy-coded with ``compression``); ``manifest_bytes``: its manifest
    (entropy-coded too when compressed). ``artifact_bytes``: every file of the artifact directory,
    and ``ratio = float_bytes / artifact_bytes``: the whole artifact counts, nothing is left out.
    """
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in float_model.state_dict().items()}
        save_file(state, str(float_path))
        manifest = save(qmodel, Path(tmp) / "artifact", compression=compression)
        files = list((Path(tmp) / "artifact").iterdir())
        artifact_bytes = sum(f.stat().st_size for f in files)
        float_bytes = float_path.stat().st_size
    tensor_bytes = manifest["file"]["bytes"]
    return {
        "float_bytes": float_bytes,
        "tensor_bytes": tensor_bytes,
        "uncompressed_bytes": manifest["file"]["uncompressed_bytes"],
        "manifest_bytes": artifact_bytes - tensor_bytes,
        "artifact_bytes": artifact_bytes,
        "ratio": float_bytes / max(artifact_bytes, 1),
    }


__all__ = [
    "DeepCompressionResult",
    "SharedWeights",
    "deep_compress",
    "deep_compression_recipe",
    "disk_size",
    "merge_lstm_biases",
    "round_biases_bf16",
    "pack_kmeans",
    "zero_codebook",
]
