"""The parity certificate of a GGUF export: what was written, read back by the ``gguf`` package.

Two checks, both through the target's own reader rather than lowbit's writer:

1. every tensor is read with ``gguf.GGUFReader`` and dequantized with ``gguf.quants``; its largest
   absolute difference from the weight lowbit holds is recorded (0 where lowbit's codes were
   written, the rounding error where values were re-quantized or cast to F16);
2. the file is loaded back as a model (``load_gguf``) and run on the first calibration batches
   (or on a few random token sequences when there are none) next to the model that was exported:
   logits cosine and top-1 agreement.

llama.cpp itself runs in the bench (``bench/gguf_llama_cpp.py``) and in the ``llama_cpp`` test
marker, where the ``llama-cpp-python`` package is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import ArtifactError

CHECK_BATCHES = 4


def certify(report: Any, model: nn.Module, written: list[Any], batches: list[Any]) -> None:
    """Fill ``report`` (a ``GGUFReport``) with the read-back differences and output agreement;
    ``ArtifactError`` when a tensor reads back missing, misshaped, or not bit-identical where
    lowbit's codes were written."""
    from lowbit.interop import gguf_blocks as blocks
    from lowbit.interop.gguf_import import load_gguf, open_reader

    reader = open_reader(report.path)
    stored = {t.name: t for t in reader.tensors}
    for w in written:
        t = stored.get(w.entry.name)
        if t is None:
            raise ArtifactError(f"{report.path}: tensor {w.entry.name} was written but does not read back")
        data = np.asarray(t.data)
        values = data.astype(np.float32) if w.qtype in ("F32", "F16") else blocks.dequantize(data, w.qtype)
        values = values.reshape(w.expected.shape)
        diff = float(np.abs(values - w.expected).max()) if values.size else 0.0
        w.record.max_abs_diff = diff
        if w.record.source == "lowbit codes" and diff != 0.0:
            raise ArtifactError(
                f"{report.path}: tensor {w.entry.name} holds lowbit's codes but reads back {diff:.3g} away"
            )
        report.tensors.append(w.record)
    report.notes += [f"{w.entry.name}: {w.record.note}" for w in written if w.record.note]
    reread = load_gguf(report.path, kernels="reference")
    report.notes += list(getattr(reread, "lowbit_import_notes", []))
    with reference_path(model):  # the file's numbers against lowbit's exact ones, not a kernel's
        report.logits_cosine, report.top1_agreement = agreement(
            model, reread, batches or _probe_batches(model)
        )


@contextmanager
def reference_path(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s quantized layers on the reference (dequantize + float) path inside."""
    from lowbit.nn.base import QuantizedModule

    layers = [m for m in model.modules() if isinstance(m, QuantizedModule)]
    kernels = [m._kernel for m in layers]
    for m in layers:
        m.set_kernel(None)
    try:
        yield
    finally:
        for m, k in zip(layers, kernels, strict=True):
            m.set_kernel(k)


def _probe_batches(model: nn.Module) -> list[torch.Tensor]:
    vocab = int(model.config.vocab_size)
    length = min(32, int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings))
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (2, length), generator=gen) for _ in range(2)]


def agreement(reference: nn.Module, other: nn.Module, batches: list[Any]) -> tuple[float, float]:
    """Logits cosine (all positions flattened) and top-1 agreement of ``other`` with ``reference``."""
    from lowbit.batches import call_model
    from lowbit.eval.metrics import output_tensor

    ref, out = [], []
    with torch.no_grad():
        for batch in batches[:CHECK_BATCHES]:
            ref.append(output_tensor(call_model(reference, batch)).float().flatten(0, -2))
            out.append(output_tensor(call_model(other, batch)).float().flatten(0, -2))
    a, b = torch.cat(ref), torch.cat(out)
    cosine = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return cosine, top1
