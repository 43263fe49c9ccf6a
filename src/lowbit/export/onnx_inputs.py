"""How ``export_onnx`` calls the model: example inputs as users have them, outputs as flat tensors.

Users export what they run: a tensor, a tuple of tensors, or a dict / ``BatchEncoding`` of named
inputs for a Hugging Face model whose ``forward`` also takes flags (``use_cache``,
``logits_to_keep``, ``past_key_values``) and returns a ``ModelOutput``. The TorchScript exporter
only takes positional tensors and flat outputs, so the model is wrapped in ``CallAdapter``: the
graph's inputs are exactly the example's tensors, by name; every other argument keeps its
default (``logits_to_keep=0``: logits for every position), except the key / value cache, which
is switched off (a graph input and output per layer would be needed to carry it).

>>> import torch
>>> spec = CallSpec.of(torch.nn.Bilinear(3, 3, 2), (torch.ones(1, 3), torch.ones(1, 3)))
>>> spec.names, spec.keyword
(['input1', 'input2'], False)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.batches import call_args

# Flags set for export when ``forward`` has them and the example does not: no cache in or out.
EXPORT_FLAGS = {"use_cache": False}
DYNAMIC_CHOICES = ("auto", "batch", "none")


def _forward_params(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@dataclass
class CallSpec:
    """The example's tensors in call order, their graph names, and how they reach ``forward``."""

    tensors: tuple[torch.Tensor, ...]
    names: list[str]
    keyword: bool  # passed by name (a dict example) or by position
    flags: dict[str, Any] = field(default_factory=dict)
    # Masks the example lacks, derived in the graph as all ones: {mask argument: its token input}.
    masks_from: dict[str, str] = field(default_factory=dict)
    # Positional calls: per argument, ``None`` (a tensor) or the length of a list of tensors.
    lists: list[int | None] | None = None

    @classmethod
    def of(cls, model: nn.Module, example: Any) -> CallSpec:
        """Read an example: a tensor, a tuple / list of tensors, or a dict / ``BatchEncoding``."""
        params = _forward_params(model)
        flags = {k: v for k, v in EXPORT_FLAGS.items() if k in params}
        if isinstance(example, Mapping):
            unknown = [k for k in example if k not in params]
            if unknown and params:
                raise ValueError(
                    f"example inputs {unknown} are not arguments of {type(model).__name__}.forward "
                    f"(it takes {params})"
                )
            order = [p for p in params if p in example] or list(example)
            for name in order:
                if not isinstance(example[name], torch.Tensor):
                    raise ValueError(
                        f"example input {name!r} is a {type(example[name]).__name__}; ONNX graph inputs "
                        "are tensors (leave flags out: they keep their defaults)"
                    )
                flags.pop(name, None)
            # Without a mask, transformers checks position ids for packed sequences with torch.diff,
            # which ONNX lacks; an all-ones mask computed in the graph means the same and exports.
            # Each ``<prefix>attention_mask`` argument pairs with ``<prefix>input_ids`` (encoder-decoder
            # models: ``decoder_attention_mask`` with ``decoder_input_ids``).
            masks_from = {
                p: p[: -len("attention_mask")] + "input_ids"
                for p in params
                if p.endswith("attention_mask") and p not in order
                and p[: -len("attention_mask")] + "input_ids" in order
            }  # fmt: skip
            return cls(tuple(example[n] for n in order), order, True, flags, masks_from)
        args, _ = call_args(model, example) if isinstance(example, list) else (example, {})
        args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
        tensors: list[torch.Tensor] = []
        names: list[str] = []
        lists: list[int | None] = []
        for i, arg in enumerate(args):
            pname = params[i] if i < len(params) else f"input_{i}"
            if isinstance(arg, list | tuple):  # a list of images (detectors): one graph input each
                if not arg or not all(isinstance(t, torch.Tensor) for t in arg):
                    raise ValueError(
                        f"example argument {pname!r} is a list; ONNX export takes a non-empty list of "
                        "tensors (one graph input per element)"
                    )
                tensors += arg
                names += [f"{pname}_{j}" for j in range(len(arg))]
                lists.append(len(arg))
            elif isinstance(arg, torch.Tensor):
                tensors.append(arg)
                names.append(pname if len(params) >= len(args) else f"input_{i}")
                lists.append(None)
            else:
                raise ValueError(
                    f"example argument {pname!r} is a {type(arg).__name__}; ONNX graph inputs are tensors "
                    "or lists of tensors (leave flags out: they keep their defaults)"
                )
        flags = {k: v for k, v in flags.items() if k not in params[: len(args)]}
        return cls(tuple(tensors), names, False, flags, lists=lists)

    def grouped(self, tensors: tuple[torch.Tensor, ...]) -> list[Any]:
        """The positional arguments: flat ``tensors`` regrouped into the example's lists."""
        if self.lists is None:
            return list(tensors)
        args: list[Any] = []
        at = 0
        for n in self.lists:
            args.append(tensors[at] if n is None else list(tensors[at : at + n]))
            at += 1 if n is None else n
        return args

    @property
    def has_lists(self) -> bool:
        return any(n is not None for n in self.lists or [])

    def _per_tensor_list(self) -> list[bool]:
        """For every flat tensor: whether it is an element of a list argument."""
        if self.lists is None:
            return [False] * len(self.tensors)
        return [n is not None for n in self.lists for _ in range(n or 1)]

    def call(self, model: nn.Module, tensors: tuple[torch.Tensor, ...]) -> Any:
        """``model``'s raw output for ``tensors`` (in ``names`` order), called as the example was."""
        if not self.keyword:
            return model(*self.grouped(tensors), **self.flags)
        named = dict(zip(self.names, tensors, strict=True))
        for mask, tokens in self.masks_from.items():
            named[mask] = torch.ones_like(named[tokens])
        return model(**named, **self.flags)

    def dynamic_axes(self, dynamic: str | Mapping[str, Mapping[int, str]]) -> dict[str, dict[int, str]]:
        """Input axes left free: ``auto`` (batch, and the sequence of token inputs), ``batch``,
        ``none`` (all static), or an explicit ``{input_name: {axis: label}}``."""
        if isinstance(dynamic, Mapping):
            unknown = [k for k in dynamic if k not in self.names]
            if unknown:
                raise ValueError(f"dynamic axes name {unknown}, which are not inputs {self.names}")
            return {k: dict(v) for k, v in dynamic.items()}
        if dynamic not in DYNAMIC_CHOICES:
            raise ValueError(f"dynamic must be one of {list(DYNAMIC_CHOICES)} or a dict, got {dynamic!r}")
        if dynamic == "none":
            return {}
        # A list of images is the batch itself: its elements (C, H, W) have no batch axis, and the
        # list's length is fixed by the graph (one input per element). Free axes: pass a dict.
        listed = {n for n, ln in zip(self.names, self._per_tensor_list(), strict=True) if ln}
        text = dynamic == "auto" and any(_is_tokens(t) for t in self.tensors)
        axes: dict[str, dict[int, str]] = {}
        for name, t in zip(self.names, self.tensors, strict=True):
            if t.dim() == 0 or name in listed:
                continue
            axes[name] = {0: "batch"}
            if text and t.dim() >= 2:
                axes[name][1] = "sequence"
        return axes

    def sequence_length(self) -> int | None:
        tokens = [t for t in self.tensors if _is_tokens(t)]
        return tokens[0].shape[1] if tokens else None


def _is_tokens(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and t.dim() == 2


def flat_outputs(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a model's output with a name: ``ModelOutput`` / dict keys (``logits``),
    ``output_i`` for top-level tuples and plain tensors, dotted paths below that (``0.boxes`` for a
    detector's list of dicts, ``hidden_states.1``); ``None`` entries are left out.

    >>> [n for n, _ in flat_outputs([{"boxes": torch.zeros(2, 4), "scores": torch.zeros(2)}])]
    ['0.boxes', '0.scores']
    """
    if isinstance(out, torch.Tensor):
        return [(prefix or "output_0", out)]
    if isinstance(out, Mapping):
        items = [(f"{prefix}{k}", v) for k, v in out.items() if v is not None]
    elif isinstance(out, tuple | list):
        items = [
            (f"{prefix}{i}" if prefix or not isinstance(v, torch.Tensor) else f"output_{i}", v)
            for i, v in enumerate(out)
            if v is not None
        ]
    else:
        raise ValueError(
            f"the model returns a {type(out).__name__}; ONNX export needs tensors, tuples, lists or dicts "
            "of them"
        )
    flat: list[tuple[str, torch.Tensor]] = []
    for name, value in items:
        if isinstance(value, torch.Tensor):
            flat.append((name, value))
        else:
            flat.extend(flat_outputs(value, f"{name}."))
    return flat


def output_structure(out: Any) -> Any:
    """The shape of a model's output as JSON: ``"t"`` for a tensor, lists and dicts of those (``None``
    entries dropped, as ``flat_outputs`` does), so a runner can rebuild it from the flat outputs."""
    if isinstance(out, torch.Tensor):
        return "t"
    if isinstance(out, Mapping):
        return {str(k): output_structure(v) for k, v in out.items() if v is not None}
    return [output_structure(v) for v in out if v is not None]


def rebuild(structure: Any, flat: list[Any]) -> Any:
    """``flat`` (in ``flat_outputs`` order) regrouped as ``structure`` says (see ``output_structure``).

    >>> rebuild([{"boxes": "t", "scores": "t"}], [1, 2])
    [{'boxes': 1, 'scores': 2}]
    """
    items = iter(flat)

    def build(node: Any) -> Any:
        if node == "t":
            return next(items)
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        return [build(v) for v in node]

    return build(structure)


class CallAdapter(nn.Module):
    """``forward(*tensors)``: calls the wrapped model as ``spec`` says; returns its tensors flat."""

    def __init__(self, model: nn.Module, spec: CallSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in flat_outputs(self.spec.call(self.model, tensors)))
