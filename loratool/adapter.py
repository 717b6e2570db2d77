"""The canonical adapter model every format reads into and writes from.

A ``LoraModule`` describes the low-rank update of one base module, named as in the
transformers model's state dict without the ``.weight`` suffix (e.g.
``model.layers.0.self_attn.q_proj``):

    dW = scale * B @ A            A: (r, in)   B: (out, r)

``dW`` is in ``(out, in)`` orientation. The base weight stores it transposed for GPT-2's
Conv1D (weight is (in, out)) and for embeddings (weight is (num_embeddings, dim), where
``in`` = num_embeddings and ``out`` = dim, as PEFT's lora_embedding_A/B define it).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from loratool.io.store import LazyTensor


class ModuleKind(str, enum.Enum):
    """How a module's weight is laid out relative to ``dW`` (out, in)."""

    LINEAR = "linear"  # weight (out, in)
    CONV1D = "conv1d"  # GPT-2 Conv1D / fan_in_fan_out: weight (in, out)
    EMBEDDING = "embedding"  # weight (num_embeddings, dim) = (in, out)

    @property
    def transposed(self) -> bool:
        """True when the base weight holds dW transposed."""
        return self is not ModuleKind.LINEAR


@dataclass
class LoraModule:
    """One adapted base module. ``A``/``B`` and optional tensors are read lazily."""

    name: str
    kind: ModuleKind
    A: LazyTensor  # (r, in)
    B: LazyTensor  # (out, r)
    alpha: float
    scale: float
    bias: LazyTensor | None = None  # (out,) lora_bias: the merged bias gains scale * bias
    magnitude: LazyTensor | None = None  # DoRA magnitude, (out,)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape the base weight of this module must have."""
        if self.kind.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def lora_params(self) -> int:
        n = self.A.numel + self.B.numel
        if self.bias is not None:
            n += self.bias.numel
        if self.magnitude is not None:
            n += self.magnitude.numel
        return n

    def delta(self, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """dW = scale * B @ A in (out, in) orientation, computed in ``dtype``."""
        a = self.A.load().to(device=device, dtype=dtype)
        b = self.B.load().to(device=device, dtype=dtype)
        return (b @ a) * self.scale

    def with_factors(self, A: torch.Tensor, B: torch.Tensor, *, alpha: float | None = None, scale: float | None = None) -> "LoraModule":
        """A copy with new in-memory factors (and optionally alpha/scale)."""
        return replace(
            self,
            A=LazyTensor.of(A),
            B=LazyTensor.of(B),
            alpha=self.alpha if alpha is None else alpha,
            scale=self.scale if scale is None else scale,
        )


@dataclass
class Adapter:
    """An adapter in canonical form.

    ``modules`` maps module names to their LoRA pairs; ``modules_to_save`` maps full tensor
    names (e.g. ``classifier.weight``) to replacement tensors.
    """

    format: str
    modules: dict[str, LoraModule]
    modules_to_save: dict[str, LazyTensor] = field(default_factory=dict)
    base_model: str | None = None
    target_modules: Any = None
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    variant: str = "lora"  # "lora" or "adalora" (as read)
    task_type: str | None = None
    path: Path | None = None
    files: list[Path] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the source's own config, as read
    warnings: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # non-tensor entries a format carried

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def dtype(self) -> torch.dtype | None:
        """The storage dtype of the LoRA factors (None for an empty adapter)."""
        for m in self.modules.values():
            return m.A.dtype
        for t in self.modules_to_save.values():
            return t.dtype
        return None

    @property
    def lora_params(self) -> int:
        return sum(m.lora_params for m in self.modules.values())

    @property
    def total_params(self) -> int:
        return self.lora_params + sum(t.numel for t in self.modules_to_save.values())

    def file_size(self) -> int:
        return sum(Path(f).stat().st_size for f in self.files if Path(f).exists())

    def replace_modules(self, modules: dict[str, LoraModule], **changes: Any) -> "Adapter":
        """A copy of this adapter with other modules (and optionally other fields)."""
        return replace(self, modules=modules, **changes)


def lora_scale(alpha: float, rank: int, *, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
