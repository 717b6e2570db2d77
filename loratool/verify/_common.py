"""What the weight and output checks share: rounding constants, norms, model opening, tensor views."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from loratool.adapter import Adapter
from loratool.base import BaseModel
from loratool.io.source import TensorSource
from loratool.io.store import TensorStore

Progress = Callable[..., None]

U32 = torch.finfo(torch.float32).eps / 2  # unit roundoff of float32, where every check computes

# companions of a bitsandbytes-quantized weight in a transformers checkpoint


# ----------------------------------------------------------------------------- helpers


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating dtype: the relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term dot product."""
    nu = n * u
    return nu / (1 - nu) if nu < 1 else float("inf")


def _subnormal(dtype: torch.dtype) -> float:
    """Absolute error of rounding a value into the subnormal range of ``dtype``."""
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps / 2


def _coarser(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype with the largest epsilon (non-floating ones are ignored)."""
    floats = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps) if floats else torch.float32


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


def _norm(t: torch.Tensor) -> float:
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.float32)  # an integer or bool tensor in a (broken) checkpoint
    return float(torch.linalg.vector_norm(t, dtype=torch.float32)) if t.numel() else 0.0


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _num(x: float | None) -> float | None:
    """JSON-friendly float (inf and nan become None)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def _open_model(model: BaseModel | str | Path) -> BaseModel:
    return model if isinstance(model, BaseModel) else BaseModel.open(model)


def _open_adapter(adapter: Adapter | str | Path) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    from loratool.formats import read_adapter

    return read_adapter(adapter)


class _Views:
    """Read-only whole-tensor views of the base and merged checkpoints (one ``TensorSource`` each)."""

    def __init__(self):
        self._sources: dict[int, TensorSource] = {}

    def get(self, store: TensorStore, name: str) -> torch.Tensor:
        source = self._sources.get(id(store))
        if source is None:
            source = self._sources[id(store)] = TensorSource(store)
        return source.tensor(name)

    def close(self) -> None:
        sources, self._sources = self._sources, {}
        for source in sources.values():
            source.close()


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaNs with the same payload count as equal)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.dtype == torch.bool or x.element_size() == 0:
        return torch.equal(x, y)
    return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
