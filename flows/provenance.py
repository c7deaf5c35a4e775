"""What a Ray task's result depends on besides its input, computed without importing torch or ray:
the digest of this checkout's ``diffusion`` and ``flows`` sources."""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_digest() -> str:
    """sha256 (16 hex digits) over the ``diffusion/*.py`` and ``flows/*.py`` files this process
    imports, names included."""
    h = hashlib.sha256()
    for package in ("diffusion", "flows"):
        root = Path(__file__).resolve().parents[1] / package
        for path in sorted(root.glob("*.py")):
            h.update(f"{package}/{path.name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
