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


def may_overflow(stored: torch.dtype, out: torch.dtype, delta_bound: float) -> bool:
    """Whether W + dW, W stored in ``stored`` and |dW| <= ``delta_bound``, can reach Inf (or NaN)
    when rounded to ``out``; when not, the result needs no check of its own.

    A value rounds to Inf once it reaches the output's largest finite value plus half a unit in
    the last place there (float16: 65504 + 16, bfloat16: ~3.39e38 + 2^119, float32: ~3.40e38 +
    2^103). The largest |W| is the stored dtype's largest finite value, so a same-dtype merge
    can overflow only when the delta bound reaches that half unit; a narrowing cast always can.
    """
    if not out.is_floating_point:
        return False
    limit = torch.finfo(out)
    half_ulp = limit.eps * (limit.max / (2 - limit.eps)) / 2
    largest_w = torch.finfo(stored).max if stored.is_floating_point else 0.0
    return not (largest_w + delta_bound < limit.max + half_ulp)
