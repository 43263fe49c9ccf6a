"""Read a compressed-tensors checkpoint (lowbit's or compressed-tensors' own) into a lowbit model.

The architecture comes from ``config.json`` through ``AutoConfig`` / ``AutoModelForCausalLM.from_config``
(local files only, no remote code); which layers are quantized, and how, from its
``quantization_config``, matched by compressed-tensors' own ``match_named_modules``. Each quantized
``nn.Linear`` becomes a lowbit ``QuantizedLinear`` holding the stored codes, scales and zero points
as they are (unpacked by compressed-tensors' ``unpack_from_int32``): nothing is re-quantized.
Everything is checked before it is used (scheme fields, formats, every tensor's presence, dtype
and shape); anything else raises one ``ArtifactError`` naming the file or tensor and what is
supported. Tensors are read with safetensors only, never pickle.

>>> is_compressed_tensors_dir("/nonexistent")
False
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import ArtifactError
from lowbit.export.safe_read import json_bounded, read_bounded, regular_file
from lowbit.interop import ct_schemes
from lowbit.nn.layers import QuantizedLinear
from lowbit.nn.qweight import QuantizedWeight

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_JSON_BYTES = 64 << 20
FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")


def is_compressed_tensors_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory with a compressed-tensors ``config.json`` and safetensors weights.

    >>> import tempfile
    >>> is_compressed_tensors_dir(tempfile.mkdtemp())
    False
    """
    path = Path(path)
    try:
        if not path.is_dir() or not ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()):
            return False
        config = _read_json(path / CONFIG_FILE)
    except (ArtifactError, OSError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _read_json(path: Path) -> Any:
    st = regular_file(path, "JSON file")
    if st.st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"{path} is {st.st_size} bytes; a config is at most {MAX_JSON_BYTES}")
    return json_bounded(read_bounded(path, MAX_JSON_BYTES), path)


def _quantization_config(directory: Path) -> Any:
    """compressed-tensors' validated ``QuantizationConfig`` of ``directory``'s ``config.json``."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from pydantic import ValidationError

    path = directory / CONFIG_FILE
    config = _read_json(path)
    raw = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(raw, dict) or raw.get("quant_method") != "compressed-tensors":
        raise ArtifactError(f"{path}: no quantization_config with quant_method 'compressed-tensors'")
    for key in ("sparsity_config", "transform_config", "moe_sparsity_config"):
        if raw.get(key):
            raise ArtifactError(
                f"{path}: quantization_config.{key} is set; lowbit reads dense quantized weights only"
            )
    try:
        qc = QuantizationConfig.model_validate(raw)
    except (ValidationError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()
        raise ArtifactError(
            f"{path}: quantization_config is not a valid compressed-tensors config ({' '.join(first[:3])})"
        ) from None
    if qc.kv_cache_scheme is not None:
        raise ArtifactError(f"{path}: kv_cache_scheme is set; lowbit does not quantize the kv cache")
    if qc.quantization_status != QuantizationStatus.COMPRESSED:
        raise ArtifactError(
            f"{path}: quantization_status is {qc.quantization_status!r}; "
            "lowbit reads 'compressed' checkpoints"
        )
    if qc.format not in (*FORMATS, "mixed-precision"):
        raise ArtifactError(
            f"{path}: quantization_config.format is {qc.format!r}; lowbit reads {', '.join(FORMATS)} "
            "(or mixed-precision of them)"
        )
    for group, scheme in qc.config_groups.items():
        fmt = scheme.format or qc.format
        if fmt not in FORMATS and not (scheme.format is None and qc.format == "mixed-precision"):
            raise ArtifactError(
                f"{path}: config group {group!r} has format {fmt!r}; lowbit reads {', '.join(FORMATS)}"
            )
        if scheme.weights is None or scheme.output_activations is not None:
            raise ArtifactError(
                f"{path}: config group {group!r} must quantize weights (optionally inputs), not outputs"
            )
    return qc


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX_FILE).is_file():
        index = _read_json(directory / INDEX_FILE)
        names = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if not names or bad:
            raise ArtifactError(f"{directory / INDEX_FILE}: weight_map must name files in the directory")
        return [directory / n for n in names]
    return [directory / WEIGHTS_FILE]


class _Tensors:
    """Every tensor of the checkpoint's safetensors files, read on demand, consumption tracked."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        from safetensors import SafetensorError, safe_open

        self.where: dict[str, tuple[Any, Path]] = {}
        self.used: set[str] = set()
        for path in files:
            regular_file(path, "safetensors file")
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError, ValueError) as err:
                raise ArtifactError(f"{path}: not a readable safetensors file ({err})") from None
            for key in handle.keys():
                if key in self.where:
                    raise ArtifactError(f"{path}: tensor {key} is also in {self.where[key][1].name}")
                self.where[key] = (handle, path)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(
        self, key: str, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...] | str, need: str
    ) -> torch.Tensor:
        """Tensor ``key``, which must exist with ``shape`` (``None``: any) and a dtype in ``dtypes``
        (``"float"``: any floating dtype)."""
        if key not in self.where:
            raise ArtifactError(f"tensor {key} is missing from the checkpoint ({need})")
        handle, path = self.where[key]
        try:
            tensor = handle.get_tensor(key)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ArtifactError(f"{path}: tensor {key} cannot be read ({err})") from None
        ok = tensor.is_floating_point() if dtypes == "float" else tensor.dtype in dtypes
        if not ok:
            raise ArtifactError(f"{path}: tensor {key} is {tensor.dtype}, expected {dtypes} ({need})")
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ArtifactError(
                f"{path}: tensor {key} has shape {list(tensor.shape)}, expected {list(shape)} ({need})"
            )
        floating = tensor.is_floating_point() and tensor.dtype != torch.float8_e4m3fn
        if floating and not bool(tensor.isfinite().all()):
            raise ArtifactError(f"{path}: tensor {key} holds NaN or Inf values")
        self.used.add(key)
        return tensor


def _skeleton(directory: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the layers are lowbit's: transformers must not quantize
        dtype = getattr(config, "dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        where = directory / CONFIG_FILE
        raise ArtifactError(f"{where}: transformers cannot build the model ({err})") from None


def _zero_point(
    tensors: _Tensors, prefix: str, args: Any, scale_shape: tuple[int, ...], fmt: str, need: str
) -> torch.Tensor | None:
    """The (signed, unpacked) weight zero point, ``None`` for symmetric weights."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    key = f"{prefix}.weight_zero_point"
    if args.symmetric:
        if key in tensors and bool(tensors.get(key, None, (torch.int8, torch.int32), need).any()):
            raise ArtifactError(f"tensor {key} is non-zero although the scheme is symmetric")
        return None
    if fmt == "pack-quantized" and args.strategy in ("group", "channel"):
        out_f, groups = scale_shape
        packed_rows = -(-out_f * args.num_bits // 32)
        packed = tensors.get(key, (packed_rows, groups), (torch.int32,), need)
        return unpack_from_int32(packed, args.num_bits, torch.Size((out_f, groups)), packed_dim=0)
    return tensors.get(key, scale_shape, (torch.int8,), need)


def _weight(tensors: _Tensors, name: str, module: nn.Linear, args: Any, fmt: str) -> QuantizedWeight:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = (module.out_features, module.in_features)
    what = f"layer {name}"
    layout = ct_schemes.weight_layout(args, shape, what)
    need = f"{fmt} {args.num_bits}-bit {args.type} {args.strategy} weight of shape {list(shape)}"
    stores = {"pack-quantized": ("int",), "int-quantized": ("int",), "float-quantized": ("float",)}
    if args.type not in stores.get(fmt, ("int", "float")):
        raise ArtifactError(f"{what}: format {fmt} does not store {args.type} weights")
    scale = tensors.get(f"{name}.weight_scale", layout.scale_shape, "float", need)
    if fmt == "pack-quantized":
        packed_cols = -(-shape[1] * args.num_bits // 32)
        packed = tensors.get(f"{name}.weight_packed", (shape[0], packed_cols), (torch.int32,), need)
        stored = tensors.get(f"{name}.weight_shape", (2,), (torch.int32, torch.int64), need)
        if tuple(int(s) for s in stored) != shape:
            raise ArtifactError(
                f"tensor {name}.weight_shape is {stored.tolist()}, the model's layer is {list(shape)}"
            )
        codes = unpack_from_int32(packed, args.num_bits, torch.Size(shape))
    else:
        dtype = torch.float8_e4m3fn if args.type == "float" else torch.int8
        codes = tensors.get(f"{name}.weight", shape, (dtype,), need)
    zp = _zero_point(tensors, name, args, tuple(scale.shape), fmt, need)
    qparams = layout.qparams(scale, zp)
    if qparams.zero_point is not None:
        lo, hi = ct_schemes.formats.get(layout.format).qmin, ct_schemes.formats.get(layout.format).qmax
        if int(qparams.zero_point.min()) < lo or int(qparams.zero_point.max()) > hi:
            raise ArtifactError(f"tensor {name}.weight_zero_point lies outside the {args.num_bits}-bit range")
    lowbit_codes = ct_schemes.lowbit_codes(codes, layout, what)
    return QuantizedWeight.from_codes(
        lowbit_codes, layout.format, qparams, layout.granularity, layout.symmetric, shape
    )


def _layer(tensors: _Tensors, name: str, module: nn.Linear, scheme: Any, fmt: str) -> QuantizedLinear:
    qw = _weight(tensors, name, module, scheme.weights, fmt)
    bias = None
    if module.bias is not None:
        value = tensors.get(f"{name}.bias", (module.out_features,), "float", "the layer's bias")
        bias = nn.Parameter(value.to(module.bias.dtype).clone(), requires_grad=False)
    layer = QuantizedLinear(module.in_features, module.out_features, qw, bias)._adopt_linear(module)
    args = scheme.input_activations
    if args is not None:
        spec = ct_schemes.activation_spec(args, f"layer {name}")
        layer.set_activation(spec, name)
        if spec.mode == "static":
            need = f"static {args.num_bits}-bit input range"
            scale = tensors.get(f"{name}.input_scale", None, "float", need).reshape(-1)
            key = f"{name}.input_zero_point"
            zp = None
            if key in tensors:
                zp = tensors.get(key, None, (torch.int8, torch.int32), need).reshape(-1)
            if scale.numel() != 1 or (zp is not None and zp.numel() != 1):
                raise ArtifactError(f"tensor {name}.input_scale: static inputs need one scale per tensor")
            if args.symmetric:
                if zp is not None and bool(zp.any()):
                    raise ArtifactError(f"tensor {key} is non-zero although the inputs are symmetric")
                zp = None
            elif zp is None:
                raise ArtifactError(f"tensor {key} is missing from the checkpoint (asymmetric static inputs)")
            else:
                zp = zp.to(torch.int32) + (1 << (args.num_bits - 1))
            layer.input_quant.set_qparams(scale, zp)
    return layer


def _quantized_modules(model: nn.Module, qc: Any) -> list[tuple[str, nn.Linear, Any, str]]:
    """(name, float module, scheme, format) of every layer the config quantizes (compressed-tensors'
    own matching: targets, then ``ignore``)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.utils.match import match_named_modules, match_targets

    target_to_scheme: OrderedDict[str, Any] = OrderedDict()
    for scheme in qc.config_groups.values():
        for target in scheme.targets:
            target_to_scheme[target] = scheme
    out = []
    for name, module in match_named_modules(model, target_to_scheme, qc.ignore):
        scheme = target_to_scheme[match_targets(name, module, target_to_scheme)[0]]
        if type(module) is not nn.Linear:
            raise ArtifactError(
                f"layer {name} ({type(module).__name__}) is quantized in the checkpoint; lowbit reads "
                "quantized torch.nn.Linear layers only"
            )
        fmt = scheme.format or qc.format
        if fmt == "mixed-precision":
            fmt = infer_module_format(nn.Linear, scheme).value
        if fmt not in FORMATS:
            raise ArtifactError(
                f"layer {name}: format {fmt!r} is not supported; lowbit reads {', '.join(FORMATS)}"
            )
        out.append((name, module, scheme, fmt))
    if not out:
        raise ArtifactError("the quantization_config's targets match no Linear layer of the model")
    return out


def _load_float(model: nn.Module, tensors: _Tensors, skip: tuple[str, ...]) -> None:
    """Copy every float tensor into the model; tied parameters need one stored copy."""
    groups: dict[int, list[str]] = {}
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(skip)}
    for key, value in state.items():
        groups.setdefault(id(value), []).append(key)
    with torch.no_grad():
        for keys in groups.values():
            present = [k for k in keys if k in tensors]
            if not present:
                raise ArtifactError(f"tensor {keys[0]} is missing from the checkpoint")
            for key in present:
                target = state[key]
                value = tensors.get(key, tuple(target.shape), "float", "a float parameter")
                target.copy_(value.to(target.dtype))
    extra = sorted(set(tensors.where) - tensors.used)
    if extra:
        raise ArtifactError(
            f"the checkpoint holds {len(extra)} tensor(s) the model does not use, e.g. {extra[0]}; "
            "it was not written for this config"
        )


def load_compressed_tensors(directory: str | Path, *, kernels: str = "auto") -> nn.Module:
    """A lowbit quantized model from a compressed-tensors checkpoint directory (no download).

    ``kernels`` picks what runs each layer, as for ``lowbit.quantize``. Raises ``ArtifactError``
    for an unknown scheme or format, a missing, truncated or misshapen tensor, or a layer kind
    lowbit cannot hold (see ``lowbit.interop.ct_schemes.SUPPORTED``).

    >>> model = load_compressed_tensors("out-ct")  # doctest: +SKIP
    >>> type(model.model.layers[0].mlp.up_proj).__name__  # doctest: +SKIP
    'QuantizedLinear'
    """
    from lowbit.backends import use_kernels
    from lowbit.ptq.convert import set_submodule

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory; give a Hugging Face checkpoint folder")
    qc = _quantization_config(directory)
    model = _skeleton(directory)
    layers = _quantized_modules(model, qc)
    with ExitStack() as stack:
        tensors = _Tensors(_weight_files(directory), stack)
        for name, module, scheme, fmt in layers:
            set_submodule(model, name, _layer(tensors, name, module, scheme, fmt))
        _load_float(model, tensors, tuple(name + "." for name, *_ in layers))
    model.lowbit_source = {"format": "compressed-tensors", "path": str(directory)}
    use_kernels(model, kernels)
    return model.eval()
