"""Turning command-line arguments into objects: recipes, models, data, the output directory and the
quantized model; each bad input becomes a one-line ``CliError``."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from lowbit.cli.common import BAD_INPUT, CliError, _progress

# What lowbit.save writes; --force may replace a directory holding only these.
ARTIFACT_FILES = (
    "lowbit.json",
    "lowbit.json.xz",
    "lowbit.sha256",
    "model.safetensors",
    "model.safetensors.xz",
)


def _recipe(spec: str) -> Any:
    from lowbit.recipes import names, resolve

    try:
        return resolve(spec)
    except (ValueError, OSError) as err:
        msg = str(err)
        if msg.startswith("unknown recipe"):
            msg = (
                f"unknown recipe {spec!r}; choose one of: {', '.join(names())} (or a recipe YAML file); "
                "list them with 'lowbit recipes'"
            )
        raise CliError(msg, 2) from None


def _model(spec: str) -> Any:
    from lowbit.zoo import load_model

    try:
        return load_model(spec)
    except ImportError as err:
        raise CliError(str(err), 1) from None
    except ValueError as err:
        raise CliError(str(err), 2) from None


def _data(path: str | None, zm: Any, batch_size: int, what: str) -> Any:
    from lowbit.eval.datafile import load_data

    if path is None:
        return None
    try:
        return load_data(path, batch_size=batch_size, tokenizer=zm.tokenizer)
    except ValueError as err:
        raise CliError(f"{what}: {err}", 2) from None


def _check_output_dir(path: str, force: bool) -> Path:
    """Refuse to overwrite a non-empty directory without ``--force``, and never replace a
    directory that is not a lowbit artifact (saving replaces the whole directory).

    ``--force`` only lets an existing artifact be replaced: ``lowbit.save`` is called without
    ``force=True``, so it refuses a non-artifact directory too (checked again under its lock)."""
    from lowbit.export.atomic import ARTIFACT_MARKERS

    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"output {out} exists and is a file; give a directory path with -o", 2)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CliError(f"output directory {out} exists and is not empty; pass --force to replace it", 2)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ARTIFACT_FILES)
        if foreign:
            raise CliError(
                f"refusing to replace {out}: it holds files that are not a lowbit artifact "
                f"(e.g. {foreign[0]}); choose another -o directory",
                2,
            )
        if not any((out / m).is_file() for m in ARTIFACT_MARKERS):
            raise CliError(
                f"refusing to replace {out}: it is not a lowbit artifact (no {ARTIFACT_MARKERS[0]}); "
                "choose another -o directory",
                2,
            )
    return out


def _save(qmodel: Any, out: Path) -> dict[str, Any]:
    """``lowbit.save`` with its refusals (a file at the path, a directory that became a non-artifact
    after ``_check_output_dir``) as one-line errors."""
    from lowbit.export.artifact import ArtifactError, save

    try:
        return save(qmodel, out)
    except ArtifactError as err:
        raise CliError(str(err), 2) from None


def _calibration(args: argparse.Namespace, zm: Any) -> list[Any] | None:
    data = _data(getattr(args, "calib", None), zm, args.batch_size, "--calib")
    if data is not None:
        return data.inputs()
    return list(zm.calibration) or None


def _checkpoint_calibration(args: argparse.Namespace, path: Path) -> list[Any] | None:
    """Calibration for onloading ``path``: ``--calib``, else the built-in sentences through the
    directory's own tokenizer (as a loaded causal LM gets them), else none; the model itself is
    not loaded."""
    from lowbit.eval.datafile import load_data
    from lowbit.zoo.loading import _load_tokenizer
    from lowbit.zoo.text import sentence_batches

    try:
        tokenizer = _load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise CliError(f"{path}: cannot load its tokenizer ({err})", 2) from None
    if getattr(args, "calib", None):
        try:
            return load_data(args.calib, batch_size=args.batch_size, tokenizer=tokenizer).inputs()
        except ValueError as err:
            raise CliError(f"--calib: {err}", 2) from None
    if tokenizer is None:
        return None
    if tokenizer.pad_token is None:  # as load_hf_causal_lm: padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return sentence_batches(tokenizer)[0]


def _eval_data(args: argparse.Namespace, zm: Any) -> tuple[list[Any] | None, str | None]:
    """``--data`` (labelled -> accuracy, else cosine fidelity), else the model's own data."""
    data = _data(getattr(args, "data", None), zm, args.batch_size, "--data")
    if data is not None:
        return data.batches, ("accuracy" if data.labelled else "cosine")
    from lowbit.eval.compare import evaluation_data

    try:
        return evaluation_data(zm)
    except ValueError as err:
        raise CliError(str(err), 2) from None


def _quantized(args: argparse.Namespace, zm: Any) -> Any:
    """The quantized model from ``--recipe`` (quantize now) or ``--artifact`` (load)."""
    if getattr(args, "artifact", None):
        from lowbit.export.artifact import ArtifactError, load

        if not Path(args.artifact).is_dir():
            raise CliError(f"artifact directory {args.artifact} does not exist", 2)
        try:
            unsealed = getattr(args, "allow_unsealed", False)
            return load(args.artifact, model=copy.deepcopy(zm.model), allow_unsealed=unsealed)
        except ArtifactError as err:
            raise CliError(str(err), 1) from None
    if not getattr(args, "recipe", None):
        raise CliError("give --recipe R (quantize now) or --artifact DIR (a saved artifact)", 2)
    return _quantize(zm, _recipe(args.recipe), _calibration(args, zm))


def _quantize(zm: Any, recipe: Any, calibration: list[Any] | None) -> Any:
    from lowbit.api import quantize

    needs_data = recipe.activation is not None and getattr(recipe.activation, "mode", None) == "static"
    if needs_data and not calibration:
        raise CliError(f"recipe {recipe.name!r} needs calibration data; pass --calib DATA", 2)
    try:
        return quantize(zm.model, recipe, calibration=calibration, progress=_progress())
    except BAD_INPUT as err:  # the model, the data or the recipe is at fault, not the work
        raise CliError(str(err), 2) from None
    except ValueError as err:
        raise CliError(f"quantization failed: {err}", 1) from None
