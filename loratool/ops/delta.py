"""The delta of one module in the layout of its base weight."""

from __future__ import annotations

import torch

from loratool.adapter import LoraModule


def weight_delta(module: LoraModule, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """scale * B @ A, transposed for Conv1D and embeddings (their weights are (in, out)).

    Returns:
        A tensor of ``module.weight_shape`` in ``dtype`` on ``device``.
    """
    delta = module.delta(dtype=dtype, device=device)  # (out, in)
    return delta.T if module.kind.transposed else delta
