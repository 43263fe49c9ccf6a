"""Atomic, locked directory writes: how ``lowbit.save`` (and the report writer) replace a directory.

At every instant the target path holds either the previous complete directory or the new complete
one, never a mix, a half-written file or nothing:

1. A lock file ``.{name}.lock`` beside the target (``filelock``, an ``flock`` the kernel drops
   when its holder dies) serialises saves to one path. Under it, leftovers of killed saves
   (``.{name}.tmp-*``, and ``.{name}.old-*`` from the older two-rename scheme) are removed first.
2. Every file is written into a staging directory ``.{name}.tmp-XXXXXXXX`` in the same parent, so
   the renames below stay on one filesystem; each file and then the staging directory are fsynced.
3. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the staging directory and the existing one in
   one step; the staging name then holds the old directory, which is deleted, and the parent is
   fsynced. Where the exchange is unavailable (another OS, a C library without ``renameat2``, a
   filesystem answering EINVAL), the old directory is renamed aside and the new one renamed in:
   then there is a short window between the two renames in which the path is missing (a crash
   there leaves the old directory as ``.{name}.old-*``, removed by the next save).

The target stays a real directory (not a symlink), so every reader that opens the path keeps
working. The lock file stays in place after the save (deleting it would race with a waiter).

>>> import tempfile
>>> out = Path(tempfile.mkdtemp()) / "art"
>>> _ = write_directory(out, {"lowbit.json": b"{}", "model.safetensors": b"1"})
>>> _ = write_directory(out, {"lowbit.json": b"{}", "model.safetensors": b"2"})
>>> (out / "model.safetensors").read_bytes(), sorted(p.name for p in out.parent.iterdir())
(b'2', ['.art.lock', 'art'])
"""

from __future__ import annotations

import errno
import functools
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from filelock import FileLock

from lowbit.export.compact import MANIFEST_FILE, ArtifactError

# A directory holding one of these is a lowbit artifact, which a save may replace without force.
ARTIFACT_MARKERS = (MANIFEST_FILE, MANIFEST_FILE + ".xz")

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100  # fcntl.h: paths relative to the working directory
# The kernel, the filesystem or a sandbox cannot exchange: fall back to two renames.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM}


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step; False where this system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory is synced; Windows cannot open directories.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def leftovers(directory: str | Path) -> list[Path]:
    """Staging and backup directories that killed saves to ``directory`` left in its parent.

    >>> leftovers("/nonexistent/art")
    []
    """
    directory = Path(directory)
    # The random part is 8 characters (ours: hex; the older scheme's tempfile.mkdtemp: [a-z0-9_]),
    # so a sibling that merely starts with the same name is never taken for a leftover.
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.(?:tmp|old)-[a-z0-9_]{{8}}")
    try:
        names = os.listdir(directory.parent)
    except OSError:
        return []
    return sorted(directory.parent / n for n in names if pattern.fullmatch(n))


def _check_target(directory: Path, markers: Sequence[str], kind: str, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"cannot save to {directory}: it is a file, not a directory; give a folder path")
    if force or not markers or not directory.is_dir():
        return
    entries = sorted(p.name for p in directory.iterdir())
    if entries and not any((directory / m).is_file() for m in markers):
        raise ArtifactError(
            f"{directory} exists and is not a {kind} (it has no {' or '.join(markers)} but holds "
            f"{entries[0]!r}{' and more' if len(entries) > 1 else ''}); choose another directory, or "
            "pass force=True to replace it and everything in it"
        )


def _make_parent(directory: Path) -> None:
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in directory.parents if p.exists() and not p.is_dir()), directory.parent)
        raise ArtifactError(
            f"cannot save to {directory}: {blocker} is a file, not a directory; give a path under a directory"
        ) from None


def _make_staging(directory: Path) -> Path:
    for _ in range(100):
        staging = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
        try:
            staging.mkdir()  # mode 0o777 less the umask, like any new directory (mkdtemp's is 0o700)
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(f"no free staging name beside {directory}")


def _swap_in(staging: Path, directory: Path) -> None:
    """Put ``staging`` at ``directory``; afterwards ``staging`` is gone or holds the old directory."""
    if not directory.exists():
        os.rename(staging, directory)
        return
    if _exchange(staging, directory):
        return
    # Fallback: the path is missing between these two renames.
    backup = directory.parent / f".{directory.name}.old-{secrets.token_hex(4)}"
    os.rename(directory, backup)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(backup, directory)
        raise
    os.rename(backup, staging)  # so the caller's clean-up of ``staging`` removes the old directory


def write_directory(
    directory: str | Path,
    files: Mapping[str, bytes],
    *,
    force: bool = False,
    markers: Sequence[str] = ARTIFACT_MARKERS,
    kind: str = "lowbit artifact",
    writer: Callable[[Path], None] | None = None,
) -> Path:
    """Replace ``directory`` by one holding exactly ``files`` (name -> bytes), atomically.

    ``writer(staging)``, when given, runs after ``files`` are written and writes more files into
    the staging directory itself (a large file streamed to disk rather than held as bytes); every
    file it leaves there is fsynced and swapped in with the rest.

    An existing non-empty directory holding none of ``markers`` (by default: not a lowbit
    artifact) is refused with ``ArtifactError`` unless ``force=True``; ``markers=()`` replaces
    any directory. A path that is a file, or lies under a file, raises ``ArtifactError``. A
    symlink at the path is followed (the directory it points to is replaced). Returns the
    resolved directory. See the module docstring for the guarantees.
    """
    directory = Path(directory).expanduser().resolve()
    _check_target(directory, markers, kind, force)  # refuse before creating anything
    _make_parent(directory)
    with FileLock(directory.parent / f".{directory.name}.lock"):
        for old in leftovers(directory):
            _remove(old)
        _check_target(directory, markers, kind, force)  # again: another process may have been first
        staging = _make_staging(directory)
        try:
            for name, data in files.items():
                with open(staging / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            if writer is not None:
                writer(staging)
                for path in staging.iterdir():
                    if path.name not in files:
                        with open(path, "rb") as f:
                            os.fsync(f.fileno())
            _fsync_dir(staging)
            _swap_in(staging, directory)
            _fsync_dir(directory.parent)
        finally:
            # Before the swap: the unfinished new files; after it: the old directory.
            _remove(staging)
    return directory
