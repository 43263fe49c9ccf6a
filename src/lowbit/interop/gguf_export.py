"""``export_gguf``: a transformers causal LM (float, or quantized by lowbit) as a GGUF file for
llama.cpp, Ollama and LM Studio, ending with a parity certificate read back through the ``gguf``
package's own reader.

Where each tensor's type comes from:

* a layer lowbit quantized to an exact GGUF grid (``int8@fp16``, ``gguf_q5_0`` / ``int5@fp16``,
  ``gguf_q4_0`` / ``int4@fp16``; symmetric, groups of 32 or a multiple) is written as ``Q8_0`` /
  ``Q5_0`` / ``Q4_0`` with its own codes and scales: GPTQ's or AWQ's choices survive, nothing is
  rounded again;
* a layer lowbit quantized to any other grid is refused, naming the layer and why, unless
  ``requantize=True``, which re-quantizes its dequantized weight to ``qtype`` and reports the
  extra error;
* a float model with ``qtype`` one of those three grids is first quantized by lowbit itself
  (``algorithm="rtn"``, ``"gptq"`` or ``"awq"``, on the linear layers), then written exactly;
  with the other types (``Q4_1``, ``Q4_K``, ``Q6_K``, ``F16``) its float weights are quantized
  straight into the file (the K-quants optionally weighted by an importance matrix);
* the output head follows llama.cpp's own mix (``output_qtype="auto"``: ``Q6_K`` for 4- and
  5-bit files, else ``qtype``); token embeddings get ``qtype`` (re-quantized, as llama.cpp does);
  norms and biases stay float32; float layers of a lowbit-quantized model are written ``F16``.
  A row length a block type cannot hold falls back as llama.cpp falls back (K-quants to
  ``Q5_0`` / ``Q8_0``, the 32-blocks to ``F16``), and the report says so.

>>> report = export_gguf(model, "tiny.gguf", "Q4_0", calibration=batches, algorithm="gptq")  # doctest: +SKIP
>>> report.exact_tensors, report.logits_cosine  # doctest: +SKIP
(8, 0.99998)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.batches import run_with_pre_hooks
from lowbit.errors import ArtifactError, DataError, ModelError
from lowbit.interop import gguf_blocks as blocks
from lowbit.interop.gguf_arch import Entry, entries, family_of, write_hparams
from lowbit.interop.gguf_vocab import write_vocab
from lowbit.nn.layers import QuantizedLinear, is_hf_conv1d, linear_weight

GRID_FORMATS = {"Q8_0": "int8@fp16", "Q5_0": "gguf_q5_0", "Q4_0": "gguf_q4_0"}
ALGORITHMS = ("rtn", "gptq", "awq")
LOW_BIT = ("Q4_0", "Q4_1", "Q5_0", "Q4_K")
FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q4_0": "F16", "Q4_1": "F16", "Q5_0": "F16", "Q8_0": "F16"}
FILE_TYPES = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q5_0": "MOSTLY_Q5_0",
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q4_K": "MOSTLY_Q4_K_M", "Q6_K": "MOSTLY_Q6_K",
}  # fmt: skip


@dataclass
class TensorRecord:
    """How one tensor was written: its GGUF type, where the values came from, and the largest
    absolute difference between the file's dequantized values and lowbit's weight."""

    name: str
    qtype: str
    source: str  # "lowbit codes" | "re-quantized" | "float"
    max_abs_diff: float = 0.0
    note: str = ""


@dataclass
class GGUFReport:
    """The parity certificate of one export (also written as ``<file>.parity.json``)."""

    path: str
    qtype: str
    reference: str  # what the file is compared with: the lowbit model, or the float model
    vocabulary: str
    tensors: list[TensorRecord] = field(default_factory=list)
    logits_cosine: float | None = None
    top1_agreement: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exact_tensors(self) -> int:
        """Tensors holding lowbit's own codes, bit-identical when read back."""
        return sum(1 for t in self.tensors if t.source == "lowbit codes" and t.max_abs_diff == 0.0)

    def summary(self) -> str:
        """One paragraph for the terminal."""
        kinds: dict[str, int] = {}
        for t in self.tensors:
            kinds[t.qtype] = kinds.get(t.qtype, 0) + 1
        types = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        exact = [t for t in self.tensors if t.source == "lowbit codes"]
        worst = max(exact, key=lambda t: t.max_abs_diff, default=None)
        lines = [f"wrote {self.path}: {len(self.tensors)} tensors ({types}); {self.vocabulary}"]
        if exact:
            lines.append(
                f"{len(exact)} tensors hold lowbit's codes; read back with gguf's dequantizer, the largest "
                f"difference is {worst.max_abs_diff:.3g}"  # type: ignore[union-attr]
            )
        if self.logits_cosine is not None:
            lines.append(
                f"read back as a model: logits cosine {self.logits_cosine:.6f}, top-1 agreement "
                f"{self.top1_agreement:.2%} against the {self.reference}"
            )
        return "\n".join(lines + self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact_tensors": self.exact_tensors}


def export_gguf(
    model: nn.Module,
    path: str | Path,
    qtype: str = "Q4_0",
    calibration: Iterable[Any] | None = None,
    algorithm: str = "rtn",
    *,
    tokenizer: Any | None = None,
    output_qtype: str = "auto",
    requantize: bool = False,
    imatrix: bool = False,
    progress: bool = True,
) -> GGUFReport:
    """Write ``model`` (a transformers GPT-2 or Llama-style causal LM) to ``path`` as GGUF.

    ``qtype`` is the file's main type (``F16``, ``Q8_0``, ``Q5_0``, ``Q4_0``, ``Q4_1``, ``Q4_K``,
    ``Q6_K``); ``algorithm`` how a float model's linear layers are quantized to the grid types
    (``rtn``, ``gptq``, ``awq``: the latter two need ``calibration``, batches of token ids).
    ``imatrix=True`` weights the K-quants' rounding by each input's mean squared activation on
    ``calibration``. Returns the ``GGUFReport`` (also printed, and stored as
    ``<path>.parity.json``). Nothing is left at ``path`` when anything fails.
    """
    qtype = qtype.upper()
    blocks.qtype_enum(qtype)  # refuses an unknown type before any work
    _check_model(model)
    family = family_of(model.config)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    batches = list(calibration) if calibration is not None else []
    if (algorithm != "rtn" or imatrix) and not batches:
        raise DataError(f"{'imatrix' if imatrix else algorithm} needs calibration batches of token ids")
    head = _head_name(model)
    out_type = _output_type(qtype, output_qtype)
    quantized_already = any(hasattr(m, "qweight") for m in model.modules())
    importance = _importance(model, batches) if imatrix else {}
    reference = "lowbit model"
    lowbit_model = model
    if not quantized_already and qtype in GRID_FORMATS:
        lowbit_model = quantize_for_gguf(
            model, qtype, batches, algorithm, output_qtype=output_qtype, progress=progress
        )
    elif not quantized_already:
        reference = "float model"
        if algorithm != "rtn":
            raise ValueError(
                f"{algorithm} writes lowbit's own grids, which are {', '.join(GRID_FORMATS)}; {qtype} is "
                "written by re-quantizing the float weights (algorithm='rtn')"
            )
    written = _tensors(lowbit_model, family, qtype, out_type, head, quantized_already, requantize, importance)
    path = Path(path)
    report = GGUFReport(str(path), qtype, reference, "")
    report.vocabulary = _write_file(lowbit_model, family, path, qtype, written, tokenizer)
    from lowbit.interop.gguf_check import certify

    try:
        certify(report, lowbit_model, written, batches)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    Path(f"{path}.parity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if progress:
        print(f"lowbit: {report.summary()}", file=sys.stderr)
    return report


# --- what goes into the file ---------------------------------------------------------------------------


@dataclass
class Written:
    """One tensor ready for the writer: the array (uint8 blocks or float), its type, its record,
    and the float32 values lowbit holds for it (what the certificate compares with)."""

    entry: Entry
    array: np.ndarray
    qtype: str
    record: TensorRecord
    expected: np.ndarray


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None)


def _output_type(qtype: str, output_qtype: str) -> str:
    if output_qtype != "auto":
        blocks.qtype_enum(output_qtype)
        return output_qtype.upper()
    return "Q6_K" if qtype in LOW_BIT else qtype


def quantize_for_gguf(
    model: nn.Module,
    qtype: str = "Q4_0",
    calibration: Iterable[Any] | None = None,
    algorithm: str = "rtn",
    *,
    output_qtype: str = "auto",
    gptq: Any = None,
    progress: bool = True,
) -> nn.Module:
    """The lowbit model ``export_gguf`` writes for a float ``model`` and a grid ``qtype``
    (``Q8_0``, ``Q5_0``, ``Q4_0``): the linear layers quantized with ``algorithm``, the token
    embedding with round to nearest, the head with its own type's grid when that is one. Evaluate
    it with lowbit, then ``export_gguf(qmodel, path)`` writes exactly these codes. ``gptq`` is a
    ``lowbit.recipes.GPTQOptions`` (act-order, damping...) for ``algorithm="gptq"``.

    >>> qmodel = quantize_for_gguf(model, "Q4_0", calibration=batches, algorithm="gptq")  # doctest: +SKIP
    """
    qtype = qtype.upper()
    if qtype not in GRID_FORMATS:
        raise ValueError(f"lowbit's grids are {', '.join(GRID_FORMATS)}; {qtype} is written by re-quantizing")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    _check_model(model)
    batches = list(calibration) if calibration is not None else []
    if algorithm != "rtn" and not batches:
        raise DataError(f"{algorithm} needs calibration batches of token ids")
    head = _head_name(model)
    out_type = _output_type(qtype, output_qtype)
    import lowbit
    from lowbit.recipes import LayerRule, Recipe, WeightSpec

    def spec(t: str, how: str = algorithm) -> WeightSpec:
        return WeightSpec(format=GRID_FORMATS[t], granularity="group:32", symmetric=True, algorithm=how)

    names = {m: n for n, m in model.named_modules()}
    embedding = names.get(model.get_input_embeddings())
    rules: list[LayerRule] = []
    exclude = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and n != embedding]
    if embedding is not None:
        width = model.get_input_embeddings().embedding_dim
        if _fits(qtype, width) == qtype:
            rules.append(LayerRule(embedding, weight=spec(qtype, "rtn")))
        else:
            exclude.append(embedding)
    if head is not None:
        head_type = _fits(out_type, _float_rows_of(model, head).shape[-1])
        if head_type in GRID_FORMATS:
            rules.append(LayerRule(head, weight=spec(head_type)))
        else:
            exclude.append(head)
    recipe = Recipe(
        name=f"gguf-{qtype.lower()}-{algorithm}", weight=spec(qtype), modules=("linear", "embedding"),
        exclude=tuple(exclude), overrides=tuple(rules), **({"gptq": gptq} if gptq is not None else {}),
    )  # fmt: skip
    return lowbit.quantize(model, recipe, calibration=batches or None, progress=progress)


def _float_rows_of(model: nn.Module, name: str) -> torch.Tensor:
    return linear_weight(model.get_submodule(name))


def _importance(model: nn.Module, batches: list[Any]) -> dict[int, np.ndarray]:
    """Mean squared input of every linear layer (by module identity) over ``batches``: the
    importance matrix llama.cpp's ``imatrix`` tool collects."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        key = id(module)
        sums[key] = sums.get(key, 0) + (x * x).sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear)) or is_hf_conv1d(m)]
    run_with_pre_hooks(model, batches, {m: hook for m in linears})
    return {k: (sums[k] / counts[k]).cpu().numpy() for k in sums}


def _float_rows(entry: Entry) -> np.ndarray:
    """The entry's values as float32, ``[out, in]`` for weights (HF ``Conv1D`` transposed back)."""
    module = entry.module
    if entry.attr == "weight" and hasattr(module, "qweight"):
        t = module.qweight.dequantize()
    elif entry.attr == "weight" and is_hf_conv1d(module):
        t = linear_weight(module)
    else:
        t = getattr(module, entry.attr).detach()
    return t.float().cpu().numpy()


def _fits(qtype: str, cols: int) -> str:
    """``qtype``, or llama.cpp's fallback when rows of ``cols`` values do not fill its blocks."""
    while qtype in FALLBACK and cols % blocks.block_size(qtype):
        qtype = FALLBACK[qtype]
    return qtype


def _tensors(model, family, qtype, out_type, head, quantized_already, requantize, importance):  # type: ignore[no-untyped-def]
    out: list[Written] = []
    for entry in entries(model, family):
        values = _float_rows(entry)
        module, rows = entry.module, entry.rows
        if values.ndim == 1 or entry.name.startswith("position_embd"):
            array, t, source, note = values.astype(np.float32), "F32", "float", ""
        elif hasattr(module, "qweight") and entry.attr == "weight":
            array, t, source, note = _quantized(entry, qtype, requantize, values)
        else:
            wanted = out_type if head is not None and entry.hf_name == f"{head}.weight" else qtype
            if quantized_already:
                wanted = "F16"  # the user's recipe kept this layer float
            t = _fits(wanted, values.shape[-1])
            note = f"{wanted} blocks do not fit rows of {values.shape[-1]}: {t}" if t != wanted else ""
            array, source = _encode(values, t, importance.get(id(module))), "float"
            if t not in ("F16", "F32"):
                source = "re-quantized"
        expected = values  # what lowbit holds; a re-quantized tensor's difference is its rounding error
        if rows is not None:
            array, expected = array[rows], expected[rows]
        out.append(Written(entry, array, t, TensorRecord(entry.name, t, source, note=note), expected))
    return out


def _encode(values: np.ndarray, qtype: str, importance: np.ndarray | None) -> np.ndarray:
    if qtype == "F32":
        return values.astype(np.float32)
    if qtype == "F16":
        return values.astype(np.float16)
    return blocks.quantize(values, qtype, importance if qtype in ("Q4_K", "Q6_K") else None)


def _quantized(entry: Entry, qtype: str, requantize: bool, values: np.ndarray):  # type: ignore[no-untyped-def]
    """A lowbit-quantized weight: its own codes where its grid is a GGUF type, else (with consent)
    re-quantized to ``qtype``."""
    qw = entry.module.qweight
    reasons = {}
    for t in blocks.EXACT_GRIDS:
        reason = blocks.exact_reason(qw, t)
        if reason is None:
            return blocks.exact_blocks(qw, t), t, "lowbit codes", ""
        reasons[t] = reason
    if not requantize:
        raise ArtifactError(
            f"layer {entry.hf_name}: its {qw.fmt.name} {qw.granularity} weights are no GGUF type "
            f"({reasons['Q4_0' if qw.fmt.bits <= 4 else 'Q8_0']}). Quantize with gguf_q4_0 / gguf_q5_0 / "
            "int8@fp16, symmetric, group:32 to write lowbit's codes, or pass requantize=True "
            f"(--requantize) to round its weights again to {qtype} (the extra error is reported)"
        )
    t = _fits(qtype, values.shape[-1])
    return _encode(values, t, None), t, "re-quantized", f"re-quantized from {qw.fmt.name} {qw.granularity}"


def _write_file(model, family, path: Path, qtype: str, written: list[Written], tokenizer) -> str:  # type: ignore[no-untyped-def]
    """Write the GGUF file next to ``path`` under a temporary name, then rename it into place."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), family.arch)
        writer.add_name(getattr(model.config, "name_or_path", "") or type(model).__name__)
        write_hparams(writer, family, model.config)
        writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[qtype]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab_size = int(model.config.vocab_size)
        described = write_vocab(writer, vocab_size, tokenizer, model.config)
        for w in written:
            raw = None if w.qtype in ("F16", "F32") else blocks.qtype_enum(w.qtype)
            writer.add_tensor(w.entry.name, np.ascontiguousarray(w.array), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return described


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ModelError("export_gguf takes a transformers causal LM (a model with a .config)")
    rotated = [n for n, m in model.named_modules() if getattr(m, "input_rotation", None) is not None]
    if rotated:
        raise ArtifactError(
            f"layer {rotated[0]} (and {len(rotated) - 1} more) rotates its input (recipe rotation: "
            "hadamard); llama.cpp runs no per-layer rotation, so the file would compute a different "
            "function: quantize without rotation for GGUF"
        )
