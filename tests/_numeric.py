"""Numeric comparisons shared by the tests (one convention: relative to the reference)."""

from __future__ import annotations

import torch


def rel_diff(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - reference||_F / ||reference||_F in float64 (||x|| when the reference is zero)."""
    x, reference = x.double(), reference.double()
    n = float(reference.norm())
    return float((x - reference).norm()) / n if n > 0 else float(x.norm())
