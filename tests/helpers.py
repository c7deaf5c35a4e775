"""Shared test data: scikit-learn's 8x8 digits, prepared once per test session."""

import tempfile
from pathlib import Path

from diffusion.prepare import packaged_records, prepare

_DIGITS: Path | None = None


def digits_dir() -> Path:
    """A prepared copy of the packaged 8x8 digits (1,797 real images), made on first use."""
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = Path(tempfile.mkdtemp(prefix="ddpm-test-digits-")) / "prepared"
        prepare(packaged_records("digits"), _DIGITS, resolution=8, channels=1, heldout_fraction=0.1,
                source="digits")
    return _DIGITS
