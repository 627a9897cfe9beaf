"""Byte counts as people read them: one formatter for the store's summary and the magic's reports."""

from __future__ import annotations

_BINARY = (1024, ("B", "KiB", "MiB", "GiB", "TiB"))
_DECIMAL = (1000, ("B", "kB", "MB", "GB", "TB"))


def format_bytes(n: float, *, binary: bool = True) -> str:
    """``n`` bytes with one decimal in the largest unit below it: "12.3 MiB" (``binary``, powers of
    1024), or "12.3 MB" (powers of 1000); whole bytes below the first unit ("512 B")."""
    base, units = _BINARY if binary else _DECIMAL
    n = float(n)
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= base
    return f"{n:.1f} {units[-1]}"
