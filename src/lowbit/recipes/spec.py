"""Recipes: what to quantize and how, as frozen dataclasses that round-trip to dict / YAML.

>>> r = Recipe(name="mine", weight=WeightSpec(format="int4", granularity="group:64"))
>>> Recipe.from_dict(r.to_dict()) == r
True
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit import formats
from lowbit import granularity as gran
from lowbit.codecs import codec_for
from lowbit.recipes import schema

RECIPE_VERSION = 1
MODULE_KINDS = ("linear", "conv", "embedding", "rnn")
ACTIVATION_MODES = ("none", "dynamic", "static")
WEIGHT_ALGORITHMS = ("rtn", "mse", "gptq", "awq", "autoround", "smoothquant", "bias_correction")
EDGE_POLICIES = ("recipe", "int8", "float")
SHORT_ROW_POLICIES = ("recipe", "int8")
ACTIVATION_PLANS = ("fixed", "measured")
ROTATIONS = ("none", "hadamard")
GPTQ_OBSERVERS = ("minmax", "mse")
AWQ_SEARCHES = ("layer", "module", "parent", "stage")
AUTOROUND_TARGETS = ("float", "quantized")


@dataclass(frozen=True)
@schema.validated
class WeightSpec:
    """How weights are stored.

    Attributes:
        format: a ``lowbit.formats`` name (``int8``, ``int4``, ``nf4``, ``kmeans_4``, ``fp16`` ...).
        granularity: ``tensor``, ``channel`` (per output channel), ``group:G`` (G inputs per scale).
        symmetric: integer formats: zero point fixed at 0 (True) or fitted (False). Left out, it is
            True for signed formats and False for unsigned ones (``uint4``: an unsigned grid with
            its zero point at 0 cannot hold a weight's negative half, so that pair is refused).
        algorithm: ``rtn`` (round to nearest, full range), ``mse`` (clip range searched per block
            to minimise the weight's squared error), ``gptq``, ``awq`` or ``autoround`` (data-aware:
            need calibration; ``autoround`` learns rounding and clipping per calibration stage),
            or a sequence applied in order inside each calibration stage, such as
            ``("awq", "gptq")`` or ``("smoothquant", "gptq")`` (see ``lowbit.ptq.modifiers``).
    """

    format: str = "int8"
    granularity: str = "channel"
    symmetric: bool | None = None
    algorithm: str | tuple[str, ...] = "rtn"

    def __post_init__(self) -> None:
        fmt = formats.get(self.format)
        gran.parse(self.granularity)
        unsigned = fmt.family == "int" and fmt.qmin == 0
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", not unsigned)
        elif self.symmetric and unsigned:
            signed = fmt.name[1:] if fmt.name[1:] in formats.names() else "binary"
            raise ValueError(
                f"weight format {fmt.name} with symmetric: true would fix the zero point at code 0 and "
                f"clamp every negative weight to 0; use symmetric: false (a fitted zero point) or the "
                f"signed {signed}"
            )
        if isinstance(self.algorithm, list | tuple):  # YAML / JSON give lists; one step is a plain name
            steps = tuple(self.algorithm)
            if not steps:
                raise ValueError("weight algorithm is an empty list; give at least one, e.g. [gptq]")
            object.__setattr__(self, "algorithm", steps[0] if len(steps) == 1 else steps)
        for step in self.steps:
            _check_choice("weight algorithm", step, WEIGHT_ALGORITHMS)

    @property
    def steps(self) -> tuple[str, ...]:
        """``algorithm`` as a tuple of steps (``("gptq",)`` for ``"gptq"``)."""
        return self.algorithm if isinstance(self.algorithm, tuple) else (self.algorithm,)


@dataclass(frozen=True)
@schema.validated
class ActivationSpec:
    """How module inputs are quantized at run time.

    Attributes:
        mode: ``none``; ``dynamic`` (range measured on every call); ``static`` (range calibrated
            once on representative data, then frozen).
        format: an integer format (``uint8``, ``int8``) or ``fp8_e4m3``.
        granularity: ``tensor`` or ``token`` (one scale per row of the last dimension; dynamic only).
        symmetric: zero point fixed at 0 or fitted.
        observer: static mode: a ``lowbit.observers`` name (``minmax``, ``percentile``, ``mse``, ...).
    """

    mode: str = "none"
    format: str = "uint8"
    granularity: str = "tensor"
    symmetric: bool = False
    observer: str = "minmax"

    def __post_init__(self) -> None:
        _check_choice("activation mode", self.mode, ACTIVATION_MODES)
        if self.mode == "none":
            return
        fmt = formats.get(self.format)
        if not codec_for(fmt).takes_range:  # activations are calibrated as ranges
            raise ValueError(f"activations can use integer or fp8 formats, not {self.format!r}")
        g = gran.parse(self.granularity)
        if not isinstance(g, (gran.PerTensor, gran.PerToken)):
            raise ValueError(f"activation granularity must be 'tensor' or 'token', got {self.granularity!r}")
        if self.mode == "static" and isinstance(g, gran.PerToken):
            raise ValueError("static activations are per tensor (per-token ranges only exist at run time)")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
@schema.validated
class LayerRule:
    """A per-layer override: modules whose qualified name matches ``pattern`` (fnmatch) get
    ``weight`` / ``activation`` instead of the recipe's defaults, or stay float with ``skip``."""

    pattern: str
    weight: WeightSpec | None = None
    activation: ActivationSpec | None = None
    skip: bool = False

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True)
@schema.validated
class GPTQOptions:
    """How GPTQ quantizes the layers whose algorithm includes ``gptq`` (the defaults are the
    GPTQ paper's and lowbit's behaviour before these options existed).

    Attributes:
        act_order: quantize input columns in order of decreasing Hessian diagonal (the inputs
            with the most energy first). Needs ``static_groups: true``: lowbit stores no column
            permutation, so groups must stay contiguous in the original column order.
        static_groups: take every group's scale up front from the original weight, instead of
            when GPTQ reaches the group's first column, from the weights as updated so far.
        damping: added to the Hessian's diagonal, as a fraction of its mean (AutoGPTQ's
            ``damp_percent``); grows tenfold on its own while the Hessian is not positive definite.
        block_size: columns per lazy-update block (speed and memory; the result is the same up to
            float rounding).
        observer: how each group's scale is chosen inside GPTQ: ``minmax`` (the full range) or
            ``mse`` (the clip ratio with the smallest squared weight error, as AutoGPTQ's ``mse``).

    >>> GPTQOptions(act_order=True, static_groups=True).observer
    'minmax'
    """

    act_order: bool = False
    static_groups: bool = False
    damping: float = 0.01
    block_size: int = 128
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.act_order and not self.static_groups:
            raise ValueError(
                "gptq.act_order needs gptq.static_groups: true; act-order with groups taken as the "
                "columns are reached would need a stored column permutation, which lowbit's weight "
                "format does not have"
            )
        if not 0.0 <= self.damping <= 1.0:
            raise ValueError(
                f"gptq.damping must be in [0, 1] (a fraction of the mean diagonal), got {self.damping}"
            )
        if self.block_size < 1:
            raise ValueError(f"gptq.block_size must be >= 1, got {self.block_size}")
        _check_choice("gptq observer", self.observer, GPTQ_OBSERVERS)


@dataclass(frozen=True)
@schema.validated
class AWQOptions:
    """How AWQ searches the per-input-channel scales of the layers whose algorithm includes ``awq``.

    Attributes:
        search: where a candidate scale is judged. ``layer``: at each linear layer's output, from
            the input's ``X^T X`` over all calibration rows. ``module``: at the output of the
            smallest module of the stage that contains every layer sharing the input (q / k / v
            at the attention output, gate / up at the MLP output; one layer alone is judged at
            its own output, as ``layer``), rerunning that module on recorded inputs.
            ``parent``: as ``module``, but a layer alone is judged at its parent module's output
            (a fused qkv projection at the attention output). ``stage``: at the stage's output.
        duo_scaling: candidates ``mean|x|^a / mean|w|^(1-a)`` (AutoAWQ's default) instead of the
            paper's ``mean|x|^a``; ``s = 1`` (round to nearest) stays a candidate.
        search_batches: calibration batches the module is rerun on for every candidate (the first
            ones; bounds the cost and the memory of the recorded inputs).
    """

    search: str = "layer"
    duo_scaling: bool = False
    search_batches: int = 8

    def __post_init__(self) -> None:
        _check_choice("awq search", self.search, AWQ_SEARCHES)
        if self.search_batches < 1:
            raise ValueError(f"awq.search_batches must be >= 1, got {self.search_batches}")


@dataclass(frozen=True)
@schema.validated
class AutoRoundOptions:
    """How AutoRound (``lowbit.algorithms.autoround``) tunes the layers quantized with ``autoround``.

    Attributes:
        steps: signed-gradient steps per calibration stage (one calibration batch each; the
            paper's 200). More steps: lower error, proportionally more time.
        lr: the step size at the start, falling linearly to 0 (``None``: ``1 / steps``).
        seed: the order the calibration batches are visited in.
        time_budget_s: seconds for all stages together (``None``: no limit); each stage gets an
            equal share of what is left and keeps its best step so far when its share runs out.
        target: what a stage's output is pulled towards: ``float`` (the float model's stage output,
            so a stage also learns to undo the error reaching it from earlier ones: the paper's
            default) or ``quantized`` (the float stage run on the quantized model's inputs: GPTQ's
            objective, one stage at a time; no second activation stream is kept).

    >>> AutoRoundOptions(steps=100).lr is None
    True
    """

    steps: int = 200
    lr: float | None = None
    seed: int = 0
    time_budget_s: float | None = None
    target: str = "float"

    def __post_init__(self) -> None:
        _check_choice("autoround target", self.target, AUTOROUND_TARGETS)
        if self.steps < 1:
            raise ValueError(f"autoround.steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"autoround.lr must be > 0, got {self.lr}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"autoround.time_budget_s must be > 0 seconds, got {self.time_budget_s}")


@dataclass(frozen=True)
@schema.validated
class Recipe:
    """A complete quantization plan for a model.

    Attributes:
        name, description: for reports.
        weight: default weight spec (``None``: weights stay float).
        activation: default activation spec.
        modules: which module kinds are quantized (``linear``, ``conv``, ``embedding``, ``rnn``).
        include / exclude: fnmatch patterns on qualified module names (exclude wins).
        overrides: per-layer rules, the last matching one wins.
        smoothquant_alpha: migrate activation outliers into the weights (SmoothQuant) with this
            alpha before quantizing (``None``: off). Needs calibration data.
        smoothquant_exclude: fnmatch patterns of layers SmoothQuant leaves unscaled (for example
            per-token layers that measure better without it).
        bias_correction: remove the expected output shift that weight quantization causes
            (static recipes, measured on the calibration data).
        sequential_targets: fnmatch patterns (module names or class names) of the stages that
            data-aware algorithms calibrate one after another; empty: found from the model's structure.
        embeddings_and_head: ``recipe`` (quantized like every other layer), ``int8`` or ``float``:
            what embeddings and the output head (found from the model's structure) get instead.
        short_rows: ``recipe`` or ``int8``: linear / conv layers whose weight rows hold fewer than
            16 values (depthwise 3x3 convs, a first conv on one or two channels) keep int8 per
            output channel instead of a format below 8 bits. Such rows have few values to spread
            a 4-bit grid over and no long dot product to average the error out; they cost almost
            no bytes (an SSD-style detector's depthwise convs at int4 cost 7.8 mAP@0.5 points, at
            int8 0.6; issue 19).
        allow_saturation: float weight formats (``fp16``, ``bf16``) clip values beyond their range
            (``fp16`` stores 1e6 as 65504); ``False`` refuses such a model with a ``ModelError``
            naming each layer and its count of saturated values, ``True`` quantizes it with a
            warning that gives the counts.
        gptq: ``GPTQOptions`` for every layer quantized with ``gptq`` (act-order, static groups,
            damping, block size, the observer choosing the scales).
        awq: ``AWQOptions`` for every layer whose algorithm includes ``awq`` (where candidate
            scales are judged, duo scaling, how many batches the search reruns).
        autoround: ``AutoRoundOptions`` for every layer quantized with ``autoround`` (steps,
            step size, batch order, time budget).
        activation_plan: ``fixed`` (every layer as written) or ``measured``: with calibration
            data, each group of linear layers with per-token dynamic activations is measured and
            switched to the faster per-tensor form on a SmoothQuant-ed input where that costs at
            most 1.5x the per-token error (``lowbit.ptq.activation_plan``); without data, as written.
        rotation: ``none`` or ``hadamard``: every quantized linear layer's input is rotated by a
            random Hadamard matrix ``R`` drawn from ``rotation_seed`` (``lowbit.ptq.rotate``), its
            weight stored as ``W R``: the same function in float, with activation and weight
            outliers spread over all channels (QuaRot; for W4A4 / W4A8). No data needed; composes
            with every weight algorithm (GPTQ's Hessian is of the rotated inputs).
            With ``activation_plan: measured`` the activations stay as written (the plan is not
            measured on rotated inputs yet).
        rotation_seed: the seed the rotations are drawn from.

    Every field is type-checked (strictly: ``symmetric: 'no'`` is not ``False``, a string is not a
    list); any problem raises ``lowbit.errors.RecipeError`` (a ``ValueError``) naming the key.
    """

    name: str = "custom"
    description: str = ""
    weight: WeightSpec | None = field(default_factory=WeightSpec)
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    modules: tuple[str, ...] = MODULE_KINDS
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[LayerRule, ...] = ()
    smoothquant_alpha: float | None = None
    smoothquant_exclude: tuple[str, ...] = ()
    bias_correction: bool = False
    allow_saturation: bool = False
    sequential_targets: tuple[str, ...] = ()
    embeddings_and_head: str = "recipe"
    short_rows: str = "recipe"
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    awq: AWQOptions = field(default_factory=AWQOptions)
    autoround: AutoRoundOptions = field(default_factory=AutoRoundOptions)
    activation_plan: str = "fixed"
    rotation: str = "none"
    rotation_seed: int = 0
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        for kind in self.modules:
            _check_choice("module kind", kind, MODULE_KINDS)
        _check_choice("embeddings_and_head", self.embeddings_and_head, EDGE_POLICIES)
        _check_choice("short_rows", self.short_rows, SHORT_ROW_POLICIES)
        _check_choice("activation_plan", self.activation_plan, ACTIVATION_PLANS)
        _check_choice("rotation", self.rotation, ROTATIONS)
        if self.version != RECIPE_VERSION:
            raise ValueError(
                f"recipe version {self.version} is not supported (this lowbit reads {RECIPE_VERSION})"
            )

    @property
    def needs_calibration(self) -> bool:
        specs = [self.activation] + [r.activation for r in self.overrides if r.activation]
        return any(s.mode == "static" for s in specs)

    def specs_for(self, name: str) -> tuple[WeightSpec | None, ActivationSpec] | None:
        """The (weight, activation) specs for the module called ``name``; ``None`` if not selected."""
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return None
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return None
        weight, act = self.weight, self.activation
        for rule in self.overrides:
            if rule.matches(name):
                if rule.skip:
                    return None
                weight = rule.weight or weight
                act = rule.activation or act
        return weight, act

    # --- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-ready) with a ``version`` field."""
        d = dataclasses.asdict(self)
        for key in _LIST_FIELDS:
            d[key] = list(getattr(self, key))
        d["overrides"] = [{k: v for k, v in o.items() if v not in (None, False)} for o in d["overrides"]]
        for w in [d["weight"]] + [o.get("weight") for o in d["overrides"]]:
            if w and isinstance(w["algorithm"], tuple):
                w["algorithm"] = list(w["algorithm"])  # YAML's safe dumper has no tuples
        # Algorithm options only when set: a recipe that leaves them alone keeps the dict (and the
        # artifact manifests that carry it) it had before they existed; reading fills the defaults.
        for key, default in (
            ("gptq", GPTQOptions()),
            ("awq", AWQOptions()),
            ("autoround", AutoRoundOptions()),
        ):
            if getattr(self, key) == default:
                del d[key]
        if self.activation_plan == "fixed":
            del d["activation_plan"]
        if self.rotation == "none":  # as for the options above: old recipes keep their dict
            del d["rotation"], d["rotation_seed"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Build from a dict; unknown keys and wrong types raise ``RecipeError`` naming the key path."""
        return schema.from_dict(cls, data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        """Build from YAML text (safe: no Python tags; a key given twice is an error)."""
        return cls.from_dict(schema.parse_yaml(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


_LIST_FIELDS = ("modules", "include", "exclude", "smoothquant_exclude", "sequential_targets")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
