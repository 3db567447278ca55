"""Argument checks shared by the package's modules (pure Python: imports nothing)."""

from __future__ import annotations

from typing import Any

__all__ = ["positive_int"]


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is a positive integer, else raise a ``ValueError``.

    Integers of any kind are accepted (``int``, NumPy and 0-d integer tensors: anything with
    ``__index__``); ``bool`` and ``float`` are refused even when integral (``True``, ``2.0``).
    """
    if isinstance(value, (bool, float)) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    out = int(value.__index__())
    if out < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return out
