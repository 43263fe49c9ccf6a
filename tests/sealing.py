"""Test helper: re-seal an artifact after editing it, as anyone could (the digests then match, so
the schema and consistency checks are what must catch the edit)."""

from __future__ import annotations

from pathlib import Path

from lowbit.export.seal import SEAL_FILE, seal_text


def reseal(directory: Path) -> None:
    """Rewrite ``lowbit.sha256`` over the files now in ``directory``."""
    directory = Path(directory)
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != SEAL_FILE}
    (directory / SEAL_FILE).write_text(seal_text(files))
