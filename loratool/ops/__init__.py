"""Pure tensor operations on canonical adapters: deltas, merge, unmerge, rank surgery, quantization."""

from loratool.ops.delta import weight_delta

__all__ = ["weight_delta"]
