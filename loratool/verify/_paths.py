"""Where each side of the layer-streamed output check gets its weights, one parameter at a time.

Five ways of running the same model (the "paths"), all in float32:

    unmerged        BASE's weights, the adapter applied on the fly by forward hooks
                    (x @ W.T + scale * (x @ A.T) @ B.T, DoRA, lora_bias, embedding LoRA): the reference
    merged          MERGED's weights as stored (bitsandbytes weights dequantized)
    merge32         BASE + the delta merged in float32 (what PEFT's merge_and_unload holds in memory)
    rounded         merge32 rounded to MERGED's dtype of each tensor, or re-quantized with MERGED's
                    own scheme when MERGED stores it quantized: what a correct merge into MERGED's
                    storage gives, the noise floor MERGED is judged against
    quantized_base  (a quantized MERGED) BASE re-quantized without the delta: for the retention

Every value is a fresh float32 tensor on the device; the layer stage derives merge32 and rounded
in place from the unmerged tensors (one read of BASE per layer).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from loratool.base import BaseModel
from loratool.engine.delta import F32, DeltaKernel, dora_merged
from loratool.errors import InputError
from loratool.io.source import TensorSource
from loratool.io.store import TensorStore
from loratool.verify.weights import _dequantize, _quant_kind

UNMERGED, MERGED, MERGE32, ROUNDED, QBASE = "unmerged", "merged", "merge32", "rounded", "quantized_base"


class _Reader:
    """Whole tensors of one model, read-only: memory-mapped views, or the store's own tensors."""

    def __init__(self, model: BaseModel):
        self.model = model
        self.source = TensorSource(model.store) if isinstance(model.store, TensorStore) else None

    def get(self, key: str) -> torch.Tensor:
        return self.source.tensor(key) if self.source is not None else self.model.store.get(key)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


class Weights:
    """Parameter values by path for the skeleton's parameter names (see the module docstring)."""

    def __init__(self, sk, base: BaseModel, merged: BaseModel, targets, device: torch.device, main_dtype: torch.dtype):
        self.sk, self.base, self.merged, self.targets = sk, base, merged, targets
        self.device, self.main_dtype = device, main_dtype
        self.base_reader, self.merged_reader = _Reader(base), _Reader(merged)
        self._requant: dict[str, Callable] = {}
        self._kernels: dict[str, DeltaKernel] = {}

    def close(self) -> None:
        self.base_reader.close()
        self.merged_reader.close()

    # -- names

    def _key(self, model: BaseModel, name: str, *, tie: bool = True) -> str | None:
        key = model.tensor_name(name)
        if key is None and tie and name in self.sk.tied:
            key = model.tensor_name(self.sk.tied[name])
        return key

    def base_key(self, name: str, *, tie: bool = True) -> str | None:
        return self._key(self.base, name, tie=tie)

    def merged_key(self, name: str) -> str:
        key = self._key(self.merged, name)
        if key is None:
            raise InputError(f"{self.merged.path}: no tensor for the model's parameter {name}")
        return key

    # -- values

    def base_value(self, name: str) -> torch.Tensor:
        """BASE's tensor for a parameter (an adapter's modules_to_save copy replaces it), float32."""
        key = self.base_key(name)
        saved = self.targets.to_save.get(key) if key is not None else self._pending(name)
        if saved is not None:
            return saved[1].load().detach().to(device=self.device, dtype=F32, copy=True)
        if key is None:
            raise InputError(f"{self.base.path}: no tensor for the model's parameter {name}")
        return self.base_reader.get(key).to(device=self.device, dtype=F32, copy=True)

    def _pending(self, name: str):
        """A modules_to_save tensor the base lacks (a new head), by the parameter it fills."""
        for tname, lazy in self.targets.save_pending.items():
            if tname == name or tname.endswith("." + name) or name.endswith("." + tname):
                return tname, lazy
        return None

    def merged_value(self, name: str) -> torch.Tensor:
        """MERGED's tensor for a parameter, float32 (dequantized when stored by bitsandbytes)."""
        key = self.merged_key(name)
        if _quant_kind(self.merged, key) is not None:
            decoded = _dequantize(self.merged, key, self.device)
            self._requant[key] = decoded.requantize
            shape = self._param_shape(name)
            w = decoded.weight.to(F32)
            return (w if tuple(w.shape) == shape else w.reshape(shape)).contiguous()
        return self.merged_reader.get(key).to(device=self.device, dtype=F32, copy=True)

    def _param_shape(self, name: str) -> tuple[int, ...]:
        owner, _, leaf = name.rpartition(".")
        return tuple(self.sk.model.get_submodule(owner)._parameters[leaf].shape)

    def kernel(self, key: str) -> DeltaKernel:
        k = self._kernels.get(key)
        if k is None:
            k = self._kernels[key] = DeltaKernel.of(self.targets.by_key[key], device=self.device)
        return k

    def drop_kernels(self) -> None:
        self._kernels.clear()

    def merge_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t (the parameter's unmerged value) with the adapter merged in float32, as merge_and_unload does."""
        key = self.base_key(name)
        mod = self.targets.by_key.get(key) if key is not None else None
        if mod is not None and mod.magnitude is not None:
            return dora_merged(t, mod, device=self.device)  # m / ||W + dW||_row * (W + dW)
        if mod is not None:
            return self.kernel(key).add_(t, 0)  # W += scale * B @ A in the stored layout
        bias_mod = self.targets.bias_of.get(key) if key is not None else None
        if bias_mod is not None:  # lora_bias: bias += scale * lora_B.bias
            return t.add_(bias_mod.bias.load().to(device=self.device, dtype=F32), alpha=float(bias_mod.scale))
        return t

    def round_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t stored the way MERGED stores the parameter: re-quantized with its scheme, or rounded to its dtype."""
        key = self._key(self.merged, name)
        if key is not None and _quant_kind(self.merged, key) is not None:
            return self.requant_(name, t)
        dtype = self.merged.store.dtype(key) if key is not None else self.main_dtype
        if not dtype.is_floating_point:
            dtype = self.main_dtype
        return t.copy_(t.to(dtype)) if dtype != F32 else t

    def requant_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Q(t) with MERGED's own quantization of this parameter (unchanged when MERGED stores it unquantized)."""
        key = self._key(self.merged, name)
        if key is None or _quant_kind(self.merged, key) is None:
            return self.round_(name, t)
        if key not in self._requant:
            self._requant[key] = _dequantize(self.merged, key, self.device).requantize
        q = self._requant[key](t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t)
        return t.copy_(q.reshape(t.shape).to(F32))

    def values(self, path: str) -> Callable[[str], torch.Tensor]:
        """name -> the parameter's value on ``path``, from scratch (for modules outside the layer stack)."""
        chains = {
            UNMERGED: lambda n: self.base_value(n),
            MERGED: lambda n: self.merged_value(n),
            MERGE32: lambda n: self.merge_(n, self.base_value(n)),
            ROUNDED: lambda n: self.round_(n, self.merge_(n, self.base_value(n))),
            QBASE: lambda n: self.requant_(n, self.base_value(n)),
        }
        return chains[path]


# ----------------------------------------------------------------------------- the adapter on the fly


class AdapterHooks:
    """Forward hooks adding each adapted module's unmerged LoRA output (the unmerged path)."""

    def __init__(self, sk, weights: Weights):
        self.sk, self.weights = sk, weights
        self.handles: list = []
        self.adapted: dict[str, str] = {}  # skeleton module -> base key of its weight
        for mname, mod in sk.model.named_modules():
            if "weight" not in mod._parameters:
                continue
            key = weights.base_key(f"{mname}.weight" if mname else "weight", tie=False)
            if key is not None and key in weights.targets.by_key:
                self.adapted[mname] = key

    def __enter__(self) -> "AdapterHooks":
        for mname, key in self.adapted.items():
            mod = self.sk.model.get_submodule(mname)
            self.handles.append(mod.register_forward_hook(self._hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, key: str):
        lora = self.weights.targets.by_key[key]

        def hook(module, args, out):
            k = self.weights.kernel(key)
            x = args[0]
            if lora.kind.value == "embedding":
                return out + k.embedding_term(x)
            if lora.magnitude is not None:
                return _dora_output(module, lora, k, x, out)
            bias = lora.bias.load().to(device=x.device, dtype=F32) if lora.bias is not None else None
            return out + k.lora_term(x, bias)

        return hook


def _dora_output(module: Any, lora, k: DeltaKernel, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """PEFT's unmerged DoRA: out + (m / ||W + dW||_row - 1) * (x W^T) + m / ||W + dW||_row * scale * (x A^T) B^T.

    ``out`` is the base layer's output x W^T + b; the bias is taken off before scaling (as PEFT does).
    """
    W = module.weight.data
    W = W.T if k.transposed else W  # (out, in)
    mag = lora.magnitude.load().to(device=W.device, dtype=F32)
    mns = (mag.reshape(-1) / torch.linalg.vector_norm(W + k.dense(layout="out_in"), dim=1)).view(1, -1)  # (1, out)
    base = out - module.bias if getattr(module, "bias", None) is not None else out
    return out + (mns - 1) * base + mns * k.lora_term(x)
