"""Documented input limits and how the environment raises them (docs/guarantees.md lists them)."""

from __future__ import annotations

import os

from loratool.errors import FormatError


def size_limit(name: str, default: int) -> int:
    """A documented input limit, raised by the environment variable ``LORATOOL_<NAME>`` for a
    genuinely huge file (docs/guarantees.md lists them)."""
    value = os.environ.get(f"LORATOOL_{name}")
    if value is None:
        return default
    try:
        return max(0, int(value))
    except ValueError:
        raise FormatError(f"LORATOOL_{name}", f"not a number of bytes: {value!r}") from None
