"""Reading files from strangers: bounded, regular files only, digests streamed, JSON and LZMA capped.

Every artifact file goes through here before anything in it is interpreted:

- ``regular_file`` refuses symlinks, directories, devices and FIFOs (``lstat``, never following a
  link: a link to ``/proc/self/mem`` or ``/dev/zero`` is refused, not read);
- ``read_bounded`` checks the size on disk before reading and reads at most that many bytes;
- ``sha256_file`` hashes in chunks (the file is never held whole for the digest);
- ``lzma_bounded`` decompresses as a stream with an output cap and a decoder memory limit, so a
  small file cannot inflate to gigabytes;
- ``json_bounded`` parses JSON refusing non-finite numbers and nesting deeper than a limit.

Each failure raises ``ArtifactError`` naming the file and what was expected.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
>>> _ = p.write_text('{"a": [1, 2]}')
>>> json_bounded(read_bounded(p, 100), p)
{'a': [1, 2]}
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import stat
from pathlib import Path
from typing import Any

from lowbit.errors import ArtifactError

CHUNK = 1 << 20
MAX_JSON_DEPTH = 64  # the manifest nests 6 levels; recipes and metrics a few more
LZMA_MEMLIMIT = 1 << 28  # decoder memory: our writer uses dictionaries of at most 64 MiB


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """``lstat`` of ``path``, which must be a regular file (not a link, directory or device)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; the artifact is incomplete") from None
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"{path} is a symbolic link; artifact files must be regular files")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is not a regular file; the {what} must be a plain file")
    return st


def _open_regular(path: Path) -> Any:
    # O_NOFOLLOW closes the gap between the lstat check and the open (a link swapped in meanwhile).
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ArtifactError(f"{path}: cannot open ({err.strerror}); artifact files must be regular") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of regular file ``path``, refused before reading if it is larger than ``limit``."""
    size = regular_file(path, what).st_size
    if size > limit:
        raise ArtifactError(f"{path} is {size:,} bytes; a {what} is at most {limit:,} bytes")
    with _open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) != size:
        raise ArtifactError(f"{path} changed size while being read ({size:,} -> {len(data):,} bytes)")
    return data


def sha256_file(path: Path, expected_size: int) -> str:
    """Hex sha256 of ``path``, streamed; its size must be ``expected_size`` (checked first)."""
    size = regular_file(path).st_size
    if size != expected_size:
        raise ArtifactError(
            f"{path} is {size:,} bytes but the manifest says {expected_size:,}: truncated or replaced"
        )
    digest = hashlib.sha256()
    read = 0
    with _open_regular(path) as f:
        while chunk := f.read(CHUNK):
            read += len(chunk)
            if read > expected_size:
                break
            digest.update(chunk)
    if read != expected_size:
        raise ArtifactError(f"{path} changed size while being read")
    return digest.hexdigest()


def lzma_bounded(data: bytes, cap: int, path: Path) -> bytes:
    """Decompress one LZMA/XZ stream in ``data``, refusing output beyond ``cap`` bytes."""
    decoder = lzma.LZMADecompressor(memlimit=LZMA_MEMLIMIT)
    try:
        out = decoder.decompress(data, max_length=cap + 1)
    except lzma.LZMAError as err:
        raise ArtifactError(f"{path} does not decompress: {err}") from None
    if len(out) > cap:
        raise ArtifactError(f"{path} decompresses to more than the {cap:,} bytes it may hold")
    if not decoder.eof or decoder.unused_data:
        raise ArtifactError(f"{path} is not one complete LZMA stream (truncated or trailing bytes)")
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def json_bounded(data: bytes, path: Path, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON, refusing NaN/Infinity and nesting deeper than ``max_depth``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path} is not UTF-8 text (byte {err.start}); the artifact is corrupt") from None
    # Nesting is measured before parsing: the stdlib parser recurses and a deep file would blow the stack.
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > max_depth:
                    raise ArtifactError(
                        f"{path} nests deeper than {max_depth} levels; the manifest is corrupt"
                    )
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); the artifact is corrupt") from None
