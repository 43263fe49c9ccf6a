"""Hugging Face checkpoints in the compressed-tensors format: write them from a lowbit model, read
them (lowbit's or compressed-tensors' own) back into one, codes unchanged both ways.

``save_pretrained`` writes ``config.json`` (the model's config plus a ``quantization_config`` built
from compressed-tensors' own ``QuantizationConfig`` / ``QuantizationScheme`` / ``QuantizationArgs``
and written by its ``ModelCompressor``), ``model.safetensors`` (int4 / uint4 / ... packed into
int32 ``weight_packed`` by compressed-tensors' ``pack_to_int32``; int8 ``weight`` for W8A8;
``float8_e4m3fn`` for fp8), the tokenizer when given, and ``parity.json``: the certificate of what
transformers' loader makes of the directory (``lowbit.interop.ct_parity``). Every layer is checked
by compressed-tensors' own decompressor before anything is written: it must give back lowbit's
dequantized weight bit for bit. A weight compressed-tensors cannot store exactly raises
``ArtifactError`` naming the layer; nothing is re-quantized, and nothing is left on disk.

>>> import lowbit, torch
>>> from lowbit.recipes import Recipe, WeightSpec
>>> from lowbit.zoo.tinylms import TinyLMConfig, build_tiny_lm
>>> model = build_tiny_lm(TinyLMConfig("llama", n_layer=2, d_model=64))  # doctest: +SKIP
>>> recipe = Recipe(weight=WeightSpec("int4", "group:32"), modules=("linear",))
>>> qmodel = lowbit.quantize(model, recipe, progress=False)  # doctest: +SKIP
>>> report = save_pretrained(qmodel, "out-ct")  # doctest: +SKIP
>>> report.ok, report.max_weight_diff  # doctest: +SKIP
(True, 0.0)
>>> again = load_compressed_tensors("out-ct")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ArtifactError
from lowbit.export.atomic import write_directory
from lowbit.interop import ct_schemes
from lowbit.interop.ct_load import is_compressed_tensors_dir, load_compressed_tensors
from lowbit.interop.ct_parity import PARITY_FILE, ParityReport, certify
from lowbit.nn.base import QuantizedModule
from lowbit.nn.layers import QuantizedLinear

__all__ = ["ParityReport", "is_compressed_tensors_dir", "load_compressed_tensors", "save_pretrained"]

WEIGHTS_FILE = "model.safetensors"


@dataclass
class _Layer:
    """One quantized linear layer on its way out."""

    name: str
    layer: QuantizedLinear
    weights: Any  # QuantizationArgs
    inputs: Any  # QuantizationArgs | None

    @property
    def key(self) -> str:
        """Layers with equal keys share one config group."""
        inputs = None if self.inputs is None else self.inputs.model_dump()
        return json.dumps([self.weights.model_dump(), inputs], sort_keys=True, default=str)


def _plan(qmodel: nn.Module) -> list[_Layer]:
    """Every quantized layer with its compressed-tensors args; refuses what cannot be stored."""
    out = []
    for name, module in qmodel.named_modules():
        if not isinstance(module, QuantizedModule):
            continue
        what = f"layer {name}"
        if not isinstance(module, QuantizedLinear):
            raise ArtifactError(
                f"{what} is a quantized {module.kind} layer; compressed-tensors checkpoints hold quantized "
                "torch.nn.Linear layers only: keep it float (Recipe(modules=('linear',)) or exclude it)"
            )
        if getattr(module, "weight_transposed", False):
            raise ArtifactError(
                f"{what} is Hugging Face's Conv1D (GPT-2 style), which compressed-tensors does not quantize "
                "(it targets torch.nn.Linear only); exclude these layers from the recipe "
                "(e.g. exclude=('*.attn.*', '*.mlp.*')), or export with lowbit.save instead"
            )
        if getattr(module, "input_smooth", None) is not None:
            raise ArtifactError(
                f"{what} divides its input by a SmoothQuant / AWQ scale, which compressed-tensors has no "
                "tensor for; quantize without smoothquant / awq to export this model"
            )
        if getattr(module, "input_rotation", None) is not None:
            raise ArtifactError(
                f"{what} rotates its input (recipe rotation: hadamard); this exporter writes no online "
                "rotation, so the checkpoint would compute a different function: quantize without "
                "rotation to export, or use lowbit.save / lowbit.export_onnx"
            )
        weights = ct_schemes.weight_args(module.qweight, what)
        inputs = ct_schemes.activation_args(module.input_quant, what)
        out.append(_Layer(name, module, weights, inputs))
    if not out:
        raise ArtifactError("the model has no quantized linear layer; quantize it with lowbit.quantize first")
    return out


def _check_architecture(qmodel: nn.Module, layers: list[_Layer]) -> list[str]:
    """Build the config's architecture without memory (meta device), check that every quantized
    layer is a ``torch.nn.Linear`` there, and return the float linear layers (the ``ignore`` list)."""
    from transformers import AutoModelForCausalLM

    config = _export_config(qmodel, layers)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        raise ArtifactError(
            f"transformers cannot build {type(qmodel).__name__} from its config ({err}); only models "
            "AutoModelForCausalLM knows can be exported"
        ) from None
    quantized = {entry.name for entry in layers}
    found = {n: m for n, m in skeleton.named_modules() if n in quantized}
    for name in sorted(quantized):
        module = found.get(name)
        if not isinstance(module, nn.Linear):
            kind = "missing" if module is None else type(module).__name__
            raise ArtifactError(
                f"layer {name} is {kind} in the architecture transformers builds from the config, not "
                "torch.nn.Linear; compressed-tensors can only quantize Linear layers"
            )
    return [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def _export_config(qmodel: nn.Module, layers: list[_Layer]) -> Any:
    config = copy.deepcopy(qmodel.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    head = qmodel.get_output_embeddings() if hasattr(qmodel, "get_output_embeddings") else None
    if getattr(config, "tie_word_embeddings", False) and isinstance(head, QuantizedLinear):
        # The head is quantized apart from the float embedding table: both are stored, untied.
        config.tie_word_embeddings = False
    if getattr(config, "dtype", None) is None:
        config.dtype = layers[0].layer.float_dtype
    return config


def _layer_tensors(entry: _Layer, fmt: str, scheme: Any) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one layer (local names), checked by compressed-tensors' decompressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qw, args = entry.layer.qweight, entry.weights
    codes, zp = ct_schemes.ct_codes(qw)
    tensors = {"weight_scale": ct_schemes.ct_scale(qw, args)}
    if fmt == "pack-quantized":
        tensors["weight_packed"] = pack_to_int32(codes, args.num_bits)
        tensors["weight_shape"] = torch.tensor(qw.shape)
        if zp is not None:  # compressed-tensors packs group / channel zero points along the output dim
            packable = args.strategy in ("group", "channel")
            zp = zp.reshape(tensors["weight_scale"].shape)
            tensors["weight_zero_point"] = pack_to_int32(zp, args.num_bits, packed_dim=0) if packable else zp
    else:
        tensors["weight"] = codes
        if zp is not None:
            tensors["weight_zero_point"] = zp.reshape(tensors["weight_scale"].shape)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    compressor = BaseCompressor.get_value_from_registry(fmt)
    expected = set(compressor.compression_param_names(scheme))
    if fmt == "pack-quantized" and zp is None:
        expected.discard("weight_zero_point")
    if set(tensors) != expected:
        raise ArtifactError(
            f"layer {entry.name}: {fmt} stores {sorted(expected)}, lowbit built {sorted(tensors)}"
        )
    back = compressor.decompress(dict(tensors), scheme)["weight"]
    if not torch.equal(back.float(), qw.dequantize(torch.float32)):
        raise ArtifactError(
            f"layer {entry.name}: compressed-tensors' {fmt} decompressor does not give back lowbit's weight "
            "exactly; this is a lowbit bug, please report it with the layer's format"
        )
    if entry.inputs is not None:
        tensors.update(ct_schemes.activation_tensors(entry.layer.input_quant, entry.inputs))
    if entry.layer.bias is not None:
        tensors["bias"] = entry.layer.bias.detach()
    return tensors


def _quantization_config(layers: list[_Layer], ignore: list[str]) -> tuple[Any, dict[str, tuple[str, Any]]]:
    """compressed-tensors' ``QuantizationConfig`` plus, per layer, its format and scheme."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    groups: dict[str, list[_Layer]] = {}
    for entry in layers:
        groups.setdefault(entry.key, []).append(entry)
    config_groups, per_layer, fmts = {}, {}, set()
    for i, members in enumerate(groups.values()):
        # One scheme: every Linear but the ignored ones. More: each group names its layers.
        targets = ["Linear"] if len(groups) == 1 else [m.name for m in members]
        scheme = QuantizationScheme(
            targets=targets, weights=members[0].weights, input_activations=members[0].inputs
        )
        fmt = infer_module_format(nn.Linear, scheme).value
        scheme.format = fmt
        fmts.add(fmt)
        config_groups[f"group_{i}"] = scheme
        per_layer.update({m.name: (fmt, scheme) for m in members})
    qconfig = QuantizationConfig(
        config_groups=config_groups,
        format=fmts.pop() if len(fmts) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore if len(groups) == 1 else [],
    )
    return qconfig, per_layer


def _float_tensors(qmodel: nn.Module, layers: list[_Layer], tied: bool) -> dict[str, torch.Tensor]:
    prefixes = tuple(entry.name + "." for entry in layers)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in qmodel.state_dict().items():
        if key.startswith(prefixes):
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen and tied:
            continue  # the tied copy (lm_head = embed_tokens): transformers ties it again on load
        seen.add(ident)
        out[key] = tensor.detach().cpu().contiguous().clone()
    return out


def _files(qmodel: nn.Module, layers: list[_Layer], tokenizer: Any, scratch: Path) -> None:
    """Write config.json, the safetensors file and the tokenizer into ``scratch``."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    ignore = _check_architecture(qmodel, layers)
    qconfig, per_layer = _quantization_config(layers, ignore)
    config = _export_config(qmodel, layers)
    tensors = _float_tensors(qmodel, layers, bool(getattr(config, "tie_word_embeddings", False)))
    for entry in layers:
        fmt, scheme = per_layer[entry.name]
        local = _layer_tensors(entry, fmt, scheme)
        tensors.update({f"{entry.name}.{k}": v.cpu() for k, v in local.items()})
    config.save_pretrained(str(scratch))
    ModelCompressor(quantization_config=qconfig).update_config(str(scratch))
    save_file(tensors, str(scratch / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(scratch))


def save_pretrained(
    qmodel: nn.Module,
    directory: str | Path,
    tokenizer: Any = None,
    *,
    calibration: Iterable[Any] | None = None,
    force: bool = False,
) -> ParityReport:
    """Write ``qmodel`` (a transformers causal LM quantized by ``lowbit.quantize``) to ``directory``
    as a compressed-tensors checkpoint, then certify it with transformers' own loader.

    The directory appears complete or not at all (staged beside it, swapped in atomically); an
    existing directory is replaced only if it is an earlier export (it holds ``parity.json``), is
    empty, or ``force=True``. ``calibration`` (token tensors or dicts with ``input_ids``) feeds the
    parity check; without it, a few random token batches do. The certificate is returned and
    written as ``parity.json``; a checkpoint transformers cannot load is reported there
    (``report.loaded`` is False), not raised. Raises ``ArtifactError`` naming the layer for
    anything compressed-tensors cannot store exactly (NF4 / codebooks, Conv / GPT-2 Conv1D /
    embedding layers, group sizes that do not divide the input width, SmoothQuant / AWQ scales).

    >>> save_pretrained(torch.nn.Linear(2, 2), "out")
    Traceback (most recent call last):
    ...
    lowbit.errors.ArtifactError: save_pretrained needs a transformers PreTrainedModel, got Linear
    """
    if not (hasattr(qmodel, "config") and hasattr(qmodel, "get_output_embeddings")):
        raise ArtifactError(
            f"save_pretrained needs a transformers PreTrainedModel, got {type(qmodel).__name__}"
        )
    layers = _plan(qmodel)  # refuses before anything touches the disk
    target = Path(directory).expanduser().resolve()
    if not force and target.is_dir() and any(target.iterdir()) and not (target / PARITY_FILE).is_file():
        raise ArtifactError(
            f"{target} exists and is not a lowbit compressed-tensors export (no {PARITY_FILE}); choose "
            "another directory, or pass force=True to replace it and everything in it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.ct-") as tmp:
        scratch = Path(tmp)
        _files(qmodel, layers, tokenizer, scratch)
        report = certify(qmodel, scratch, [entry.name for entry in layers], calibration)
        (scratch / PARITY_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        files = {p.name: p.read_bytes() for p in sorted(scratch.iterdir()) if p.is_file()}
    kind = "lowbit compressed-tensors export"
    write_directory(target, files, force=force, markers=(PARITY_FILE,), kind=kind)
    return report
