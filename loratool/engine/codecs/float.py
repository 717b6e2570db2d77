"""The plain float codec: a stored float tensor is its own float32 decoding, and encoding rounds
once to the output dtype (round to nearest even, what ``Tensor.to`` does)."""

from __future__ import annotations

import torch

NAME = "float"
# the float dtypes a merge may convert between (--dtype); anything else is stored as it is
CONVERTIBLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
HALF = frozenset({torch.float16, torch.bfloat16})


def output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: ``requested`` for convertible floats, else as stored."""
    return requested if requested is not None and stored in CONVERTIBLE else stored


def decode(rows: torch.Tensor, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """Stored rows as a float32 copy on ``device``, free to be modified in place."""
    return rows.to(device=device, dtype=torch.float32, copy=True)


def encode(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 rows rounded once to ``dtype``, on the CPU."""
    return rows.to(dtype).cpu() if rows.dtype != dtype or rows.device.type != "cpu" else rows
