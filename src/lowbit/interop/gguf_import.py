"""``load_gguf``: a GGUF file (llama.cpp's, or lowbit's) as a lowbit model, without re-quantizing.

The architecture is rebuilt from the file's hyper-parameters (``gpt2`` and ``llama``); each
tensor is read with the ``gguf`` package's reader, checked against the shape the architecture
needs, and then:

* ``Q8_0`` / ``Q5_0`` / ``Q4_0`` become lowbit ``int8@fp16`` / ``gguf_q5_0`` / ``gguf_q4_0``
  weights in groups of 32: the file's codes and fp16 scales (negative ones too), unchanged;
* ``Q6_K`` becomes ``int6`` in groups of 16 whose scale is the file's ``d * scale`` product (the
  float32 number llama.cpp multiplies by), so the values are the file's exactly;
* ``F32`` / ``F16`` / ``BF16`` are float tensors;
* the other types (``Q4_K``, ``Q4_1``, ``Q5_K`` ...) have no lowbit grid yet: their values are
  dequantized by the ``gguf`` package (exact, but stored as float32) and the model's
  ``lowbit_import_notes`` says which tensors those are.

Nothing the file says is trusted before it is checked: an unknown architecture, a missing or
misshaped tensor, a type lowbit cannot read, or a truncated / corrupt file is one ``ArtifactError``
naming the file and the tensor.

>>> qmodel = load_gguf("tiny.gguf")  # doctest: +SKIP
>>> qmodel.transformer.h[0].attn.c_attn.qweight.fmt.name  # doctest: +SKIP
'gguf_q4_0'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import ArtifactError, ModelError
from lowbit.interop import gguf_blocks as blocks
from lowbit.interop.gguf_arch import Entry, config_from_gguf, entries, family_of, inverse_rows
from lowbit.nn.layers import is_hf_conv1d

MAGIC = b"GGUF"
GRID_OF = {"Q8_0": "int8@fp16", "Q5_0": "gguf_q5_0", "Q4_0": "gguf_q4_0"}


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def read_fields(reader: Any) -> dict[str, Any]:
    """Every key-value field of a ``gguf.GGUFReader`` as plain Python values."""
    out: dict[str, Any] = {}
    for name, f in reader.fields.items():
        try:
            out[name] = f.contents()
        except Exception:  # a field whose value the reader cannot decode is treated as absent
            continue
    return out


def open_reader(path: str | Path) -> Any:
    """``gguf.GGUFReader`` for ``path``, with any failure of the reader as one ``ArtifactError``."""
    import gguf

    if not is_gguf_file(path):
        raise ArtifactError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors on bad bytes
        raise ArtifactError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def load_gguf(path: str | Path, *, kernels: str = "auto") -> nn.Module:
    """The lowbit model a GGUF file holds (see the module docstring for what each type becomes).

    ``kernels`` picks what runs the quantized layers, as for ``lowbit.quantize``.
    """
    import transformers

    from lowbit.backends import use_kernels

    reader = open_reader(path)
    fields = read_fields(reader)
    arch = fields.get("general.architecture")
    prefix = f"{arch}."
    hparams = {k[len(prefix) :]: v for k, v in fields.items() if k.startswith(prefix)}
    hparams.update({k: v for k, v in fields.items() if k.startswith("tokenizer.ggml.") and k.endswith("_id")})
    tensors = {t.name: t for t in reader.tensors}
    vocab = len(fields.get("tokenizer.ggml.tokens") or []) or _rows_of(tensors, "token_embd.weight", path)
    try:
        config = config_from_gguf(str(arch), hparams, vocab)
    except ModelError as e:
        raise ArtifactError(f"{path}: {e}") from None
    config.tie_word_embeddings = "output.weight" not in tensors
    family = family_of(config)
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    wanted = entries(model, family)
    unknown = sorted(set(tensors) - {e.name for e in wanted})
    if unknown:
        raise ArtifactError(f"{path}: tensors this {arch} model does not have: {', '.join(unknown[:5])}")
    notes: list[str] = []
    # Biases first: a quantized weight replaces its module, which takes the bias it holds then.
    for entry in sorted(wanted, key=lambda e: e.attr != "bias"):
        if entry.name not in tensors:
            raise ArtifactError(f"{path}: tensor {entry.name} ({entry.hf_name}) is missing")
        _fill(model, entry, tensors[entry.name], path, notes)
    _tie_head(model)
    model.eval()  # the replaced layers are new modules, built in training mode
    model.lowbit_import_notes = notes
    model.lowbit_recipe = None
    use_kernels(model, kernels)
    return model


def _tie_head(model: nn.Module) -> None:
    """A tied head reads the token embedding; when that was quantized, the head shares its codes."""
    from lowbit.nn.layers import QuantizedLinear
    from lowbit.ptq.convert import set_submodule
    from lowbit.recipes import WeightSpec

    if not model.config.tie_word_embeddings:
        return
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not hasattr(emb, "qweight"):
        return
    qw = emb.qweight
    spec = WeightSpec(format=qw.fmt.name, granularity=qw.manifest()["granularity"], symmetric=True)
    name = next(n for n, m in model.named_modules() if m is head)
    set_submodule(model, name, QuantizedLinear.from_float(head, spec, name, qweight=qw))


def _rows_of(tensors: dict[str, Any], name: str, path: str | Path) -> int:
    if name not in tensors:
        raise ArtifactError(f"{path}: no tokenizer tokens and no {name}: cannot tell the vocabulary size")
    return int(tensors[name].shape[-1])


def _expected_shape(entry: Entry) -> tuple[int, ...]:
    module = entry.module
    if entry.attr == "bias":
        return tuple(module.bias.shape)
    w = module.weight
    return tuple(w.t().shape) if is_hf_conv1d(module) else tuple(w.shape)


def _fill(model: nn.Module, entry: Entry, tensor: Any, path: str | Path, notes: list[str]) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type).name
    shape = _expected_shape(entry)
    file_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists ne0 (columns) first
    if file_shape != shape:
        raise ArtifactError(
            f"{path}: tensor {entry.name} is {list(file_shape)}, the model needs {list(shape)}"
        )
    data = np.asarray(tensor.data)
    restore = None if entry.rows is None else inverse_rows(entry.rows)
    if qtype in GRID_OF and entry.attr == "weight" and len(shape) == 2:
        qw = _grid_weight(data.reshape(shape[0], -1), qtype, shape)
        _replace(model, entry, qw if restore is None else _permuted(qw, restore))
        return
    if qtype == "Q6_K" and entry.attr == "weight" and len(shape) == 2:
        qw = _q6_k_weight(data.reshape(shape[0], -1), shape)
        _replace(model, entry, qw if restore is None else _permuted(qw, restore))
        return
    try:
        values = blocks.dequantize(data, qtype) if qtype not in ("F32", "F16") else data.astype(np.float32)
    except NotImplementedError:
        raise ArtifactError(
            f"{path}: tensor {entry.name} has type {qtype}, which lowbit cannot read"
        ) from None
    values = values.reshape(shape)
    if restore is not None:
        values = values[restore]
    if qtype not in ("F32", "F16", "BF16"):
        notes.append(f"{entry.name}: {qtype} has no lowbit grid yet; imported as its exact float32 values")
    target = getattr(entry.module, entry.attr)
    t = torch.from_numpy(np.ascontiguousarray(values)).to(target.dtype)
    with torch.no_grad():
        target.copy_(t.t() if is_hf_conv1d(entry.module) and entry.attr == "weight" else t)


def _grid_weight(data: np.ndarray, qtype: str, shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """lowbit weight holding a legacy block type's own codes and fp16 scales."""
    from lowbit.nn.qweight import QuantizedWeight
    from lowbit.primitives import QParams

    rows, cols = shape
    b = data.reshape(rows, cols // blocks.BLOCK, -1)
    d = np.ascontiguousarray(b[..., :2]).view(np.float16).astype(np.float32).reshape(rows, -1)
    payload = b[..., 2:]
    if qtype == "Q8_0":
        codes = payload.view(np.int8).astype(np.int16)
    elif qtype == "Q4_0":
        codes = np.concatenate([payload & 0x0F, payload >> 4], axis=-1).astype(np.int16) - 8
    else:  # Q5_0: 4 bytes of fifth bits, then 16 bytes of nibbles
        high = np.unpackbits(payload[..., :4], axis=-1, bitorder="little")
        nib = payload[..., 4:]
        low = np.concatenate([nib & 0x0F, nib >> 4], axis=-1)
        codes = (low | (high << 4)).astype(np.int16) - 16
    codes_t = torch.from_numpy(codes.reshape(rows, cols)).to(torch.int8)
    qp = QParams(torch.from_numpy(d), None, (1, blocks.BLOCK))
    return QuantizedWeight.from_codes(codes_t, GRID_OF[qtype], qp, f"group:{blocks.BLOCK}", True, shape)


def _q6_k_weight(data: np.ndarray, shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
    """lowbit ``int6`` groups of 16 with scale ``d * sc``: Q6_K's values, bit for bit."""
    from lowbit.nn.qweight import QuantizedWeight
    from lowbit.primitives import QParams

    rows, cols = shape
    b = data.reshape(-1, 210)
    nb = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    ql2 = ql.reshape(nb, 2, 64)  # per half of 128 values: low nibbles 0..63, high nibbles 64..127
    low = np.stack([ql2 & 0x0F, ql2 >> 4], axis=2).reshape(nb, 2, 128)
    qh2 = qh.reshape(nb, 2, 32)
    high = np.stack([(qh2 >> s) & 0x03 for s in (0, 2, 4, 6)], axis=2).reshape(nb, 2, 128)
    codes = (low | (high << 4)).astype(np.int16).reshape(nb, 256) - 32
    scale = np.ascontiguousarray(d).view(np.float16).astype(np.float32) * sc.view(np.int8).astype(np.float32)
    codes_t = torch.from_numpy(codes.reshape(rows, cols)).to(torch.int8)
    qp = QParams(torch.from_numpy(scale.reshape(rows, cols // 16)), None, (1, 16))
    return QuantizedWeight.from_codes(codes_t, "int6", qp, "group:16", True, shape)


def _permuted(qw, order: np.ndarray):  # type: ignore[no-untyped-def]
    """The same weight with its rows reordered (codes and per-row scales move together)."""
    from lowbit.nn.qweight import QuantizedWeight
    from lowbit.primitives import QParams

    idx = torch.from_numpy(order)
    qp = qw.qparams()
    moved = QParams(qp.scale[idx], None if qp.zero_point is None else qp.zero_point[idx], qp.block)
    return QuantizedWeight.from_codes(qw.codes()[idx], qw.fmt, moved, qw.granularity, qw.symmetric, qw.shape)


def _replace(model: nn.Module, entry: Entry, qw) -> None:  # type: ignore[no-untyped-def]
    from lowbit.nn.layers import QuantizedEmbedding, QuantizedLinear
    from lowbit.ptq.convert import set_submodule
    from lowbit.recipes import WeightSpec

    spec = WeightSpec(format=qw.fmt.name, granularity=qw.manifest()["granularity"], symmetric=True)
    name = entry.hf_name.removesuffix(".weight")
    module = entry.module
    if isinstance(module, nn.Embedding):
        new = QuantizedEmbedding.from_float(module, spec, name, qweight=qw)
    else:
        new = QuantizedLinear.from_float(module, spec, name, qweight=qw)
    qw.algorithm = "gguf"
    set_submodule(model, name, new)
    entry.module = new
