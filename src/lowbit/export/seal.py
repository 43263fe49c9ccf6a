"""``lowbit.sha256``: the digest list that covers every file of an artifact, the manifest included.

One line per file, ``<sha256 hex>  <file name>``, sorted by name: the format ``sha256sum`` writes,
so ``sha256sum -c lowbit.sha256`` run inside the artifact directory verifies it with no lowbit at
all, and a user who wants authenticity signs this one small file with their own tool (``gpg
--detach-sign``, ``minisign``, ``ssh-keygen -Y sign``) and checks the signature before loading
(``lowbit.load(..., verify_seal=...)`` calls a function of theirs with its path first).

>>> text = seal_text({"lowbit.json": b"{}", "model.safetensors": b"x"})
>>> print(text, end="")
44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a  lowbit.json
2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881  model.safetensors
>>> parse_seal(text.encode(), "lowbit.sha256")["lowbit.json"][:8]
'44136fa3'
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lowbit.errors import ArtifactError

SEAL_FILE = "lowbit.sha256"
MAX_SEAL_BYTES = 4096  # a handful of lines
_LINE = re.compile(r"([0-9a-f]{64})  ([A-Za-z0-9._-]{1,64})")


def seal_text(files: dict[str, bytes]) -> str:
    """The ``lowbit.sha256`` text for ``files`` (name -> content)."""
    return seal_from_digests({n: hashlib.sha256(data).hexdigest() for n, data in files.items()})


def seal_from_digests(digests: dict[str, str]) -> str:
    """The ``lowbit.sha256`` text from each file's sha256 hex (for files hashed as they were written)."""
    return "".join(f"{digests[n]}  {n}\n" for n in sorted(digests))


def parse_seal(data: bytes, path: Path | str) -> dict[str, str]:
    """File name -> sha256 hex from a ``lowbit.sha256`` file, strictly in the format ``seal_text`` writes."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not an ASCII digest list; the artifact is corrupt") from None
    if not text.endswith("\n"):
        raise ArtifactError(f"{path} is truncated (no final newline)")
    out: dict[str, str] = {}
    for number, line in enumerate(text[:-1].split("\n"), 1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise ArtifactError(f"{path} line {number} is not '<sha256>  <file name>'")
        digest, name = match.groups()
        if name in out or (out and name < max(out)) or name in (".", "..") or name == SEAL_FILE:
            raise ArtifactError(f"{path} line {number}: {name!r} is repeated, out of order or not allowed")
        out[name] = digest
    return out
