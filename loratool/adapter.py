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
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from loratool.errors import UnsupportedError
from loratool.io.store import LazyTensor

if TYPE_CHECKING:  # an adapter is read and inspected without torch; computing with it imports it
    import torch


class ModuleKind(str, enum.Enum):
    """How a module's weight is laid out relative to ``dW`` (out, in)."""

    LINEAR = "linear"  # weight (out, in)
    CONV1D = "conv1d"  # GPT-2 Conv1D / fan_in_fan_out: weight (in, out)
    EMBEDDING = "embedding"  # weight (num_embeddings, dim) = (in, out)
    EXPERTS = "experts"  # fused MoE experts (PEFT target_parameters): weight (E, out, in)
    EXPERTS_T = "experts_t"  # fused experts stored the other way round (gpt-oss): weight (E, in, out)

    @property
    def transposed(self) -> bool:
        """True when the base weight holds dW transposed (for experts: each expert's slice)."""
        return self not in (ModuleKind.LINEAR, ModuleKind.EXPERTS)

    @property
    def is_experts(self) -> bool:
        return self in (ModuleKind.EXPERTS, ModuleKind.EXPERTS_T)


@dataclass(frozen=True)
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
    folded_params: int = 0  # stored LoRA parameters folded into A on reading (AdaLoRA's lora_E, (r, 1))
    # fused MoE experts (PEFT's ParamWrapper): A is (E * r, in) expert-major, B is (out, r * E)
    # rank-major (B[:, j * E + e] is expert e's column j); 0 for an ordinary module
    experts: int = 0

    @property
    def rank(self) -> int:
        """The rank (per expert for an experts module)."""
        return self.A.shape[0] // self.experts if self.experts else self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape the base weight of this module must have."""
        if self.experts:
            inner = (self.in_features, self.out_features) if self.kind.transposed else (self.out_features, self.in_features)
            return (self.experts, *inner)
        if self.kind.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def lora_params(self) -> int:
        """Every stored LoRA parameter of this module: A, B, and bias, magnitude, lora_E when present."""
        n = self.A.numel + self.B.numel + self.folded_params
        if self.bias is not None:
            n += self.bias.numel
        if self.magnitude is not None:
            n += self.magnitude.numel
        return n

    def delta(self, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """dW = scale * B @ A in (out, in) orientation, computed in ``dtype`` (default float32; ``engine.delta.dense_delta``)."""
        import torch

        from loratool.engine.delta import dense_delta

        return dense_delta(self, dtype=dtype or torch.float32, device=device)

    def with_factors(self, A: torch.Tensor, B: torch.Tensor, *, alpha: float | None = None, scale: float | None = None) -> "LoraModule":
        """A copy with new in-memory factors (and optionally alpha/scale)."""
        return replace(
            self,
            A=LazyTensor.of(A),
            B=LazyTensor.of(B),
            alpha=self.alpha if alpha is None else alpha,
            scale=self.scale if scale is None else scale,
            folded_params=0,  # new factors hold everything: nothing stays folded
        )


@dataclass(frozen=True)
class Adapter:
    """An adapter in canonical form.

    ``modules`` maps module names to their LoRA pairs; ``modules_to_save`` maps full tensor
    names (e.g. ``classifier.weight``) to the tensors that replace the base's when the adapter
    is applied.

    Those are of two kinds, told apart by ``base_layer_copies`` (a set of names in
    ``modules_to_save``):

    - trained replacements (PEFT ``modules_to_save``, a head kept whole...);
    - saved copies of a base layer: the full embedding / ``lm_head`` weight PEFT writes beside
      the LoRA (``save_embedding_layers``, ``<module>.base_layer.weight``). They are not
      trained; they equal the base's tensor unless the vocabulary was resized or the base
      changed. ``saved_copies`` and ``trained_to_save`` give each kind.

    Both stay in ``modules_to_save`` because merging applies both the same way (the tensor
    replaces the base's); only a writer whose format cannot hold full tensors needs to tell
    them apart (a copy equal to the base can be dropped, see ``without_saved_copies``).
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
    base_layer_copies: frozenset[str] = frozenset()  # names in modules_to_save that are saved base-layer copies

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
    def dtype_name(self) -> str | None:
        """``"float32"``... of the LoRA factors, without importing torch for stored tensors."""
        for m in self.modules.values():
            return m.A.dtype_name
        for t in self.modules_to_save.values():
            return t.dtype_name
        return None

    @property
    def lora_params(self) -> int:
        return sum(m.lora_params for m in self.modules.values())

    @property
    def total_params(self) -> int:
        return self.lora_params + sum(t.numel for t in self.modules_to_save.values())

    def file_size(self) -> int:
        return sum(Path(f).stat().st_size for f in self.files if Path(f).exists())

    def without_warnings(self) -> "Adapter":
        """A copy whose warnings were already reported (this one keeps its own)."""
        return replace(self, warnings=[])

    def replace_modules(self, modules: dict[str, LoraModule], **changes: Any) -> "Adapter":
        """A copy of this adapter with other modules (and optionally other fields)."""
        return replace(self, modules=modules, **changes)

    @property
    def saved_copies(self) -> dict[str, LazyTensor]:
        """The modules_to_save entries that are saved copies of a base layer (not trained)."""
        return {n: t for n, t in self.modules_to_save.items() if n in self.base_layer_copies}

    @property
    def trained_to_save(self) -> dict[str, LazyTensor]:
        """The modules_to_save entries that are trained replacements (not saved copies)."""
        return {n: t for n, t in self.modules_to_save.items() if n not in self.base_layer_copies}

    def without_saved_copies(self, names: Iterable[str], *, warnings: Iterable[str] = ()) -> "Adapter":
        """A copy of this adapter without the saved base-layer copies ``names``, with ``warnings`` added.

        This adapter is left as it is.

        Raises:
            ValueError: a name is not a saved copy of this adapter (a trained tensor is never dropped).
        """
        names = set(names)
        stray = sorted(names - set(self.saved_copies))
        if stray:
            raise ValueError(f"not saved base-layer copies: {', '.join(stray)}")
        return replace(
            self,
            modules_to_save={n: t for n, t in self.modules_to_save.items() if n not in names},
            base_layer_copies=frozenset(self.base_layer_copies - names),
            warnings=[*self.warnings, *warnings],
        )


def refuse_saved_copies(adapter: Adapter, holder: str) -> None:
    """Refuse saved base-layer copies for a format (``holder``) that holds only LoRA factors.

    ``loratool convert`` drops a copy identical to the base before writing; one that reaches a
    writer was not checked against a base.

    Raises:
        UnsupportedError: naming the first copy.
    """
    copies = sorted(adapter.saved_copies)
    if copies:
        more = f" (and {len(copies) - 1} more)" if len(copies) > 1 else ""
        raise UnsupportedError(
            f"{holder} cannot hold {copies[0]}{more}, the adapter's saved copy of a base layer (PEFT save_embedding_layers); "
            "convert with --base so a copy identical to the base can be dropped"
        )


def lora_scale(alpha: float, rank: int, *, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
