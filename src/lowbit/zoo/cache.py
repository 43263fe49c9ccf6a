"""On-disk cache for trained zoo weights: safetensors plus a sha256 checksum, written atomically.

Layout, for a model ``digits-cnn`` trained with recipe version 1::

    <cache dir>/digits-cnn-v1.safetensors
    <cache dir>/digits-cnn-v1.json        {"sha256": "...", ...}

The cache dir is ``$LOWBIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``.
Weights are only ever read with safetensors (no pickle), and only after the checksum matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file


def cache_dir() -> Path:
    """Directory holding cached weights (not created here).

    >>> import os
    >>> os.environ["LOWBIT_CACHE"] = "/tmp/lowbit-doctest"
    >>> str(cache_dir())
    '/tmp/lowbit-doctest'
    >>> del os.environ["LOWBIT_CACHE"]
    """
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lowbit"
    return Path.home() / ".cache" / "lowbit"


def weight_paths(name: str, version: int) -> tuple[Path, Path]:
    """``(weights, checksum json)`` paths for a model name and training-recipe version.

    >>> w, j = weight_paths("digits-cnn", 1)
    >>> (w.name, j.name)
    ('digits-cnn-v1.safetensors', 'digits-cnn-v1.json')
    """
    stem = f"{name}-v{version}"
    folder = cache_dir()
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one, never half
    (a temp file in the same directory, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(name: str, version: int, state: dict[str, torch.Tensor], info: dict) -> Path | None:
    """Cache ``state`` atomically with its sha256; returns the path, or ``None`` (with a warning) on failure.

    A read-only or full disk must not break the caller: the model is still usable, just not cached.

    >>> import os, tempfile, torch
    >>> os.environ["LOWBIT_CACHE"] = tempfile.mkdtemp()
    >>> save_weights("toy", 1, {"w": torch.ones(2)}, {}).name
    'toy-v1.safetensors'
    >>> load_weights("toy", 1)["w"].tolist()
    [1.0, 1.0]
    >>> del os.environ["LOWBIT_CACHE"]
    """
    weights, meta = weight_paths(name, version)
    try:
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        # Serialise to a temp file first, then hash exactly the bytes that will be published.
        fd, tmp = tempfile.mkstemp(dir=weights.parent, prefix=f".{weights.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(state, tmp)
            digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
            os.replace(tmp, weights)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        record = {"name": name, "recipe_version": version, "sha256": digest, **info}
        atomic_write(meta, (json.dumps(record, indent=2) + "\n").encode())
    except OSError as err:
        warnings.warn(f"lowbit.zoo: could not cache {name} weights in {weights.parent}: {err}", stacklevel=2)
        return None
    return weights


def load_weights(name: str, version: int) -> dict[str, torch.Tensor] | None:
    """Cached weights if present and their checksum matches, else ``None``.

    Missing files return ``None`` quietly (first use); a missing checksum, a mismatch or an
    unreadable file also return ``None`` but warn, because the caller will retrain.

    >>> import os, tempfile
    >>> os.environ["LOWBIT_CACHE"] = tempfile.mkdtemp()
    >>> load_weights("never-trained", 1) is None
    True
    >>> del os.environ["LOWBIT_CACHE"]
    """
    weights, meta = weight_paths(name, version)
    if not weights.exists():
        return None
    problem = None
    try:
        # Hash and deserialise the same bytes, so the file cannot change between check and load.
        data = weights.read_bytes()
        expected = json.loads(meta.read_text())["sha256"] if meta.exists() else None
        if expected is None:
            problem = f"checksum file {meta} is missing"
        elif hashlib.sha256(data).hexdigest() != expected:
            problem = f"{weights} does not match its sha256 checksum"
        else:
            return load_safetensors_bytes(data)
    except Exception as err:  # OSError, bad JSON, or safetensors' own error type for a corrupt file
        problem = f"could not read {weights}: {err}"
    warnings.warn(f"lowbit.zoo: cached {name} weights unusable ({problem}); retraining", stacklevel=2)
    return None
