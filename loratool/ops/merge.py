"""Merging one LoRA module into its base weight, and taking it out again.

All arithmetic is float32 (on any device) and the result is rounded to the output dtype once:

    linear        W (out, in)   W' = W + s * scale * (B @ A)
    Conv1D / emb  W (in, out)   W' = W + s * scale * (B @ A).T
    DoRA          V = W + dW,   W' = m / ||V||_row * V   (norm over ``in`` for each ``out``)
    lora_bias     b' = b + s * scale * bias

with ``s`` = +1 to merge and -1 to unmerge. The whole-tensor functions (``merge_weight``,
``unmerge_weight``, ``merge_bias``, ``dora_merge_weight``) are the reference; ``Factors``
applies the same update to a block of rows of the stored weight, which is what the streaming
engine (``loratool.merge``) uses so that no more than a block is ever expanded to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratool.adapter import LoraModule
from loratool.ops.delta import weight_delta

F32 = torch.float32


def _out_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return weight.dtype if dtype is None else dtype


def merge_weight(
    weight: torch.Tensor,
    module: LoraModule,
    *,
    sign: int = 1,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """W + sign * dW in the layout of ``weight``, computed in float32, rounded once.

    Args:
        weight: the base weight, ``module.weight_shape``.
        module: the LoRA module (its ``kind`` decides the layout).
        sign: +1 merges, -1 unmerges.
        dtype: output dtype (default: ``weight.dtype``).
        device: where the float32 math runs.
    Returns:
        The new weight on the CPU.
    """
    w = weight.to(device=device, dtype=F32)
    w = w.add_(weight_delta(module, dtype=F32, device=device), alpha=float(sign))
    return w.to(_out_dtype(weight, dtype)).cpu()


def unmerge_weight(weight: torch.Tensor, module: LoraModule, **options) -> torch.Tensor:
    """W - dW: the inverse of ``merge_weight`` (exact up to float32 / output-dtype rounding)."""
    return merge_weight(weight, module, sign=-1, **options)


def merge_bias(
    bias: torch.Tensor,
    module: LoraModule,
    *,
    sign: int = 1,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """b + sign * scale * lora_B.bias (PEFT's lora_bias), float32 math, rounded once.

    Raises:
        ValueError: the module has no lora bias.
    """
    if module.bias is None:
        raise ValueError(f"{module.name}: no lora_B bias")
    b = bias.to(device=device, dtype=F32)
    extra = module.bias.load().to(device=device, dtype=F32).reshape(b.shape)
    b = b.add_(extra, alpha=float(sign) * module.scale)
    return b.to(_out_dtype(bias, dtype)).cpu()


def dora_weight_norm(weight: torch.Tensor, module: LoraModule, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """||W + dW|| for each output feature, in float32: PEFT's ``get_weight_norm``.

    PEFT takes the L2 norm over the input dimension of the (out, in) view, i.e. over rows of
    a linear weight and over columns of a Conv1D / embedding weight.
    """
    v = weight.to(device=device, dtype=F32) + weight_delta(module, dtype=F32, device=device)
    dim = 0 if module.kind.transposed else 1
    return torch.linalg.vector_norm(v, dim=dim)


def dora_merge_weight(
    weight: torch.Tensor,
    module: LoraModule,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """DoRA's merge: m / ||W + dW|| * (W + dW), the norm per output feature (see module doc).

    Raises:
        ValueError: the module has no magnitude vector.
    """
    if module.magnitude is None:
        raise ValueError(f"{module.name}: not a DoRA module (no magnitude vector)")
    v = weight.to(device=device, dtype=F32) + weight_delta(module, dtype=F32, device=device)
    dim = 0 if module.kind.transposed else 1
    factor = module.magnitude.load().to(device=device, dtype=F32) / torch.linalg.vector_norm(v, dim=dim)
    v = v * (factor.view(1, -1) if module.kind.transposed else factor.view(-1, 1))
    return v.to(_out_dtype(weight, dtype)).cpu()


@dataclass
class Factors:
    """A module's factors in float32 on a device, applied to row blocks of the stored weight.

    Rows of the stored weight are ``out`` features for a linear weight and ``in`` features
    for Conv1D / embedding weights, so a row block needs rows of B or columns of A.
    """

    name: str
    A: torch.Tensor  # (r, in) float32
    B: torch.Tensor  # (out, r) float32
    scale: float
    transposed: bool
    magnitude: torch.Tensor | None = None  # (out,) float32, DoRA
    bias: torch.Tensor | None = None  # (out,) float32, lora_bias

    @classmethod
    def of(cls, module: LoraModule, *, device: str | torch.device = "cpu") -> "Factors":
        """Load a module's tensors once, as float32 on ``device``."""

        def load(t):
            return None if t is None else t.load().to(device=device, dtype=F32)

        return cls(
            name=module.name,
            A=load(module.A),
            B=load(module.B),
            scale=float(module.scale),
            transposed=module.kind.transposed,
            magnitude=load(module.magnitude).reshape(-1) if module.magnitude is not None else None,
            bias=load(module.bias).reshape(-1) if module.bias is not None else None,
        )

    @property
    def rows(self) -> int:
        """Rows of the stored weight."""
        return self.A.shape[1] if self.transposed else self.B.shape[0]

    def add_delta_(self, block: torch.Tensor, start: int, *, sign: int = 1) -> torch.Tensor:
        """block += sign * dW[start:start+len(block)] in place (block: float32 rows of the stored weight)."""
        stop = start + block.shape[0]
        alpha = float(sign) * self.scale
        if self.transposed:
            # rows [start:stop] of (B @ A).T are (B @ A[:, start:stop]).T = A[:, start:stop].T @ B.T
            return block.addmm_(self.A[:, start:stop].T, self.B.T, alpha=alpha)
        return block.addmm_(self.B[start:stop], self.A, alpha=alpha)

    def row_factors(self, *, sign: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with sign * dW[rows] = L[rows] @ R in the stored layout, the scale folded into L.

        Linear: L = s * B (out, r), R = A (r, in). Conv1D / embedding: L = s * A.T (in, r), R = B.T (r, out).
        """
        s = float(sign) * self.scale
        if self.transposed:
            return (self.A.T * s).contiguous(), self.B.T.contiguous()
        return (self.B * s).contiguous(), self.A.contiguous()

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """dW rows [start:stop] in the stored layout, float32."""
        if self.transposed:
            return (self.A[:, start:stop].T @ self.B.T) * self.scale
        return (self.B[start:stop] @ self.A) * self.scale

    def delta_norm_sq(self) -> float:
        """||scale * B @ A||_F^2 without forming B @ A: trace((B^T B)(A A^T)) * scale^2."""
        gram = (self.B.T @ self.B) * (self.A @ self.A.T)
        return max(float(gram.sum()), 0.0) * self.scale * self.scale
