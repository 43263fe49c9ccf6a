"""The error types for bad input: each names the file, key or layer at fault and what was expected.

All are ``ValueError`` subclasses, so ``except ValueError`` keeps catching them; the CLI reports each
as one line (exit code 2 for bad input, 1 for an artifact that fails verification).

>>> import lowbit
>>> lowbit.Recipe.from_dict({"weight": {"symmetric": "no"}})
Traceback (most recent call last):
...
lowbit.errors.RecipeError: recipe.weight.symmetric: expected true or false, got 'no' (str)
"""

from __future__ import annotations

__all__ = ["ArtifactError", "BudgetError", "CheckpointError", "DataError", "ModelError", "RecipeError"]


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, tampered with, or does not fit the given model; names the
    file and the field, tensor or layer at fault."""


class RecipeError(ValueError):
    """A recipe (dict, YAML file or ``Recipe(...)`` call) is invalid; names the key path."""


class DataError(ValueError):
    """Calibration or evaluation data cannot be used; names the file (and line) or the reason."""


class ModelError(ValueError):
    """The model cannot be quantized as it is (NaN/Inf, meta device, overflow); names the layer."""


class CheckpointError(ModelError):
    """A model checkpoint directory is incomplete or corrupt (a shard missing or truncated, a tensor
    absent or of the wrong shape); names the file and the tensor."""


class BudgetError(ValueError):
    """A memory budget (``max_memory``) is below what the work needs; names the bytes needed and
    what they are for."""
