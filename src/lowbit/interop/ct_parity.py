"""The parity certificate of a compressed-tensors export: what transformers' own loader makes of it.

``certify`` loads the written directory with ``AutoModelForCausalLM.from_pretrained`` (CPU; the
compressed-tensors quantizer decompresses it), runs it and the lowbit model (on lowbit's reference
path, the exact meaning of the stored codes) on the same token batches, and compares logits and
every quantized layer's weight. A checkpoint transformers cannot load is a certificate with
``loaded=False`` and the reason, never an exception.

>>> ParityReport(loaded=False, error="no transformers").ok
False
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.eval.metrics import output_tensor
from lowbit.nn.base import QuantizedModule

PARITY_FILE = "parity.json"
RANDOM_BATCHES, RANDOM_SHAPE = 4, (2, 32)
MAX_BATCHES = 8


@dataclass
class ParityReport:
    """transformers' reading of an exported checkpoint against the lowbit model it came from.

    Attributes:
        loaded: transformers loaded the directory (``error`` says why not otherwise).
        loader: ``default`` (``from_pretrained(directory)``, compressed-tensors' quantizer with
            its input quantization), or ``dequantize=True`` when only that worked (weights
            decompressed while loading; inputs not quantized); ``error`` says why the first failed.
        inputs: ``"calibration"`` or ``"random tokens"``; ``batches`` / ``tokens`` how many.
        logits_cosine_min / logits_cosine_mean: cosine of the two logit vectors per token.
        top1_agreement: fraction of tokens whose arg-max logit is the same.
        logits_max_abs_diff: largest absolute logit difference.
        weight_max_abs_diff: per quantized layer, the largest absolute difference between
            transformers' decompressed weight and lowbit's dequantized one (0.0: bit-identical).
    """

    loaded: bool
    error: str | None = None
    loader: str = ""
    inputs: str = ""
    batches: int = 0
    tokens: int = 0
    logits_cosine_min: float | None = None
    logits_cosine_mean: float | None = None
    top1_agreement: float | None = None
    logits_max_abs_diff: float | None = None
    weight_max_abs_diff: dict[str, float] = field(default_factory=dict)
    lowbit_path: str = "reference"
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def max_weight_diff(self) -> float | None:
        """The largest per-layer weight difference (``None`` when nothing was compared)."""
        return max(self.weight_max_abs_diff.values()) if self.weight_max_abs_diff else None

    @property
    def ok(self) -> bool:
        """Loaded, weights bit-identical, and logits cosine at least 0.9999 on every token."""
        return (
            self.loaded
            and self.max_weight_diff == 0.0
            and self.logits_cosine_min is not None
            and self.logits_cosine_min >= 0.9999
        )

    def summary(self) -> str:
        """A few lines for the terminal."""
        if not self.loaded:
            return f"transformers could not load the checkpoint: {self.error}"
        worst = self.max_weight_diff
        lines = [
            f"transformers ({self.loader} loader) read it back: largest weight difference "
            f"{worst if worst is not None else 'n/a'}, logits cosine min {self.logits_cosine_min:.6f} / mean "
            f"{self.logits_cosine_mean:.6f}, top-1 agreement {self.top1_agreement:.2%} on {self.tokens} "
            f"tokens ({self.inputs})"
        ]
        if self.error:
            lines.append(f"(the default loader failed first: {self.error})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a layer transformers lost (no comparable weight) is ``None``."""
        out = dataclasses.asdict(self)
        out["weight_max_abs_diff"] = {
            k: (v if math.isfinite(v) else None) for k, v in self.weight_max_abs_diff.items()
        }
        worst = self.max_weight_diff
        out["max_weight_diff"] = worst if worst is None or math.isfinite(worst) else None
        out["ok"] = self.ok
        return out


def _versions() -> dict[str, str]:
    import compressed_tensors
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
    }


def _batches(model: nn.Module, calibration: Iterable[Any] | None) -> tuple[str, list[dict[str, Any]]]:
    if calibration is not None:
        out = []
        for batch in list(calibration)[:MAX_BATCHES]:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            if not isinstance(batch, dict) or "input_ids" not in batch:
                raise TypeError("calibration batches must be token tensors or dicts with 'input_ids'")
            out.append(dict(batch))
        if out:
            return "calibration", out
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, RANDOM_SHAPE, generator=gen) for _ in range(RANDOM_BATCHES)]
    return "random tokens", [{"input_ids": t} for t in ids]


@contextlib.contextmanager
def reference_path(model: nn.Module) -> Iterator[None]:
    """Run every quantized layer on the reference path inside the block; kernels come back after."""
    kept = [(m, m._kernel) for m in model.modules() if isinstance(m, QuantizedModule)]
    for m, _ in kept:
        m.set_kernel(None)
    try:
        yield
    finally:
        for m, kernel in kept:
            m.set_kernel(kernel)


def _logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return output_tensor(model(**inputs)).float().cpu()


def compare_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    """Per-token cosine (min, mean), top-1 agreement and max |diff| of two lists of logit tensors.

    >>> x = [torch.randn(2, 3, 5)]
    >>> compare_logits(x, x)["top1_agreement"]
    1.0
    """
    la = torch.cat([t.reshape(-1, t.shape[-1]) for t in a]).double()
    lb = torch.cat([t.reshape(-1, t.shape[-1]) for t in b]).double()
    cos = torch.nn.functional.cosine_similarity(la, lb, dim=-1)
    return {
        "logits_cosine_min": float(cos.min()),
        "logits_cosine_mean": float(cos.mean()),
        "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean()),
        "logits_max_abs_diff": float((la - lb).abs().max()),
    }


LOADERS = ("default", "dequantize=True")


def _short(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _load_and_run(
    directory: str | Path, loader: str, batches: list[dict[str, Any]]
) -> tuple[nn.Module, list[torch.Tensor]]:
    """transformers' model of ``directory`` and its logits; ``loader`` is ``default`` (the
    compressed-tensors quantizer as ``from_pretrained`` sets it up) or ``dequantize=True``
    (weights decompressed while loading, inputs left float)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs: dict[str, Any] = {}
    if loader == "dequantize=True":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    sink = io.StringIO()
    try:
        with _quiet(sink):
            hf = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).eval()
            with torch.no_grad():
                return hf, [_logits(hf, b) for b in batches]  # the first call decompresses
    except Exception as err:
        # transformers logs which tensors it could not load before raising: keep those lines.
        found = [" ".join(line.split()) for line in sink.getvalue().splitlines() if "MISMATCH |" in line]
        if found:
            raise RuntimeError(f"{_short(err)} [load report: {found[0]}]") from err
        raise


@contextlib.contextmanager
def _quiet(sink: io.StringIO) -> Iterator[None]:
    """Send transformers' progress bars, load report and warnings to ``sink``: the certificate is
    the record."""
    logger = logging.getLogger("transformers")
    handlers, propagate = list(logger.handlers), logger.propagate
    handler = logging.StreamHandler(sink)
    for h in handlers:
        logger.removeHandler(h)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeHandler(handler)
        for h in handlers:
            logger.addHandler(h)
        logger.propagate = propagate


def certify(
    qmodel: nn.Module, directory: str | Path, layers: list[str], calibration: Iterable[Any] | None
) -> ParityReport:
    """Load ``directory`` with transformers and compare it with ``qmodel`` (see the module docstring)."""
    inputs, batches = _batches(qmodel, calibration)
    report = ParityReport(loaded=False, inputs=inputs, batches=len(batches))
    try:
        report.versions = _versions()
    except ImportError as err:
        report.error = f"transformers / compressed-tensors are not importable: {err}"
        return report
    loaded = None
    for loader in LOADERS:
        try:
            loaded = _load_and_run(directory, loader, batches)
        except Exception as err:  # noqa: BLE001 - any loader failure is what the certificate records
            note = f"transformers' {loader} loader failed: {type(err).__name__}: {_short(err)}"
            report.error = note if report.error is None else f"{report.error}; {note}"
            continue
        report.loader = loader
        break
    if loaded is None:
        return report
    hf, theirs = loaded
    report.loaded = True
    was_training = qmodel.training
    qmodel.eval()
    try:
        with reference_path(qmodel), torch.no_grad():
            ours = [_logits(qmodel, b) for b in batches]
    finally:
        qmodel.train(was_training)
    report.tokens = sum(t.numel() // t.shape[-1] for t in ours)
    for key, value in compare_logits(theirs, ours).items():
        setattr(report, key, value)
    for name in layers:
        mine = qmodel.get_submodule(name).qweight.dequantize(torch.float32)
        other = getattr(hf.get_submodule(name), "weight", None)
        if other is None or tuple(other.shape) != tuple(mine.shape):
            report.weight_max_abs_diff[name] = float("inf")
            continue
        report.weight_max_abs_diff[name] = float((other.detach().float().cpu() - mine).abs().max())
    return report
