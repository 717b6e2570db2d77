"""Where each side of the layer-streamed output check gets its weights, one parameter at a time.

Five ways of running the same model (the "paths"), all in float32:

    unmerged        BASE's weights, the adapter applied on the fly by forward hooks
                    (x @ W.T + scale * (x @ A.T) @ B.T, DoRA, lora_bias, embedding LoRA; several adapters
                    merged together: x @ D.T with D their combined delta, ``engine.combine``), fused MoE
                    experts held as W + dW: the reference
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
from torch import nn

from loratool.base import BaseModel
from loratool.engine.combine import combined_delta
from loratool.engine.delta import F32, DeltaKernel, dense_delta, dora_merged
from loratool.errors import InputError
from loratool.io.source import TensorSource
from loratool.io.store import TensorStore
from loratool.names import EXPERT_PATH_RENAMES, EXPERT_SOURCES
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
    """Parameter values by path for the skeleton's parameter names (see the module docstring).

    A parameter the adapter changes is either hooked (a module's ``weight``: Linear, Conv1D,
    Embedding, whose unmerged output ``AdapterHooks`` adds) or, with no such module forward to hook
    (a fused MoE experts parameter, a router's weight), held ``in_place`` as W + dW on the unmerged
    path: applying W + dW is x W^T + x dW^T per expert, the unmerged model to float32 rounding (PEFT's
    ParamWrapper adds the delta to the parameter the same way). A fused parameter the checkpoint stores one expert at a time
    (transformers 5's Qwen-MoE, Mixtral...) is assembled from its per-expert tensors.
    """

    def __init__(self, sk, base: BaseModel, merged: BaseModel, targets, device: torch.device, main_dtype: torch.dtype):
        self.sk, self.base, self.merged, self.targets = sk, base, merged, targets
        self.device, self.main_dtype = device, main_dtype
        self.base_reader, self.merged_reader = _Reader(base), _Reader(merged)
        self._requant: dict[str, Callable] = {}
        self._kernels: dict[str, DeltaKernel] = {}
        self._deltas: dict[str, torch.Tensor] = {}  # base key -> this layer's combined delta D (out, in)
        self._parts: dict[tuple[int, str], list[list[str]] | None] = {}
        self.in_place = self._in_place_params()

    def close(self) -> None:
        self.base_reader.close()
        self.merged_reader.close()

    def _in_place_params(self) -> set[str]:
        """The changed parameters no forward hook covers: fused experts, a router's weight (PEFT wraps
        both as a ParamWrapper, W + dW)."""
        changed = set(self.targets.by_key) | set(self.targets.combined)
        out = set()
        for name, _ in self.sk.model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if leaf == "weight" and hookable(self.sk.model.get_submodule(owner)):
                continue
            key = self.base_key(name)
            keys = [key] if key is not None else [k for ks in (self.expert_keys(self.base, name) or []) for k in ks]
            if any(k in changed for k in keys):
                out.add(name)
        return out

    # -- names

    def _key(self, model: BaseModel, name: str, *, tie: bool = True) -> str | None:
        key = _stored_name(model, name)
        if key is None and tie and name in self.sk.tied:
            key = _stored_name(model, self.sk.tied[name])
        return key

    def base_key(self, name: str, *, tie: bool = True) -> str | None:
        return self._key(self.base, name, tie=tie)

    def expert_keys(self, model: BaseModel, name: str) -> list[list[str]] | None:
        """The per-expert tensors ``model`` stores for the fused parameter ``name``, expert by expert
        (each expert's in the order its (out, in) slice concatenates them); None when it stores none."""
        cache = (id(model), name)
        if cache not in self._parts:
            shape = self._param_shape(name)
            self._parts[cache] = _expert_keys(model, name, shape[0]) if len(shape) == 3 else None
        return self._parts[cache]

    # -- values

    def base_value(self, name: str, *, delta: bool = False) -> torch.Tensor:
        """BASE's tensor for a parameter (an adapter's modules_to_save copy replaces it), float32;
        with ``delta``, an ``in_place`` parameter is W + dW."""
        key = self.base_key(name)
        saved = self.targets.to_save.get(key) if key is not None else self._pending(name)
        if saved is not None:
            t = saved[1].load().detach().to(device=self.device, dtype=F32, copy=True)
            return self._plus_delta(key, t) if delta and name in self.in_place and key is not None else t
        return self._read(self.base, self.base_reader, name, key, delta=delta and name in self.in_place)

    def unmerged_value(self, name: str) -> torch.Tensor:
        """The parameter on the unmerged path: BASE's, fused experts with their delta added."""
        return self.base_value(name, delta=True)

    def _read(self, model: BaseModel, reader: _Reader, name: str, key: str | None, *, delta: bool) -> torch.Tensor:
        """``model``'s float32 tensor for a parameter (+ the adapter's delta of each stored tensor, ``delta``)."""
        if key is not None:
            t = reader.get(key).to(device=self.device, dtype=F32, copy=True)
            return self._plus_delta(key, t) if delta else t
        parts = self.expert_keys(model, name)
        if parts is None:
            raise InputError(f"{model.path}: no tensor for the model's parameter {name}")
        shape = self._param_shape(name)
        read = [[self._plus_delta(k, reader.get(k).to(device=self.device, dtype=F32, copy=True)) if delta
                 else reader.get(k).to(device=self.device, dtype=F32) for k in ks] for ks in parts]
        t = torch.stack([torch.cat(ts) for ts in read])  # (E, out, in)
        return t if tuple(t.shape) == shape else t.transpose(1, 2).contiguous()  # (E, in, out)

    def _plus_delta(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """t (a stored tensor of BASE, float32) + the adapter's delta of it, in the stored layout."""
        mod = self.targets.by_key.get(key)
        if mod is not None:
            return t.add_(dense_delta(mod, device=self.device, layout="stored").reshape(t.shape))
        if key in self.targets.combined:
            return t.add_(self.combined(key, layout="stored").reshape(t.shape))
        return t

    def _pending(self, name: str):
        """A modules_to_save tensor the base lacks (a new head), by the parameter it fills."""
        for tname, lazy in self.targets.save_pending.items():
            if tname == name or tname.endswith("." + name) or name.endswith("." + tname):
                return tname, lazy
        return None

    def merged_value(self, name: str) -> torch.Tensor:
        """MERGED's tensor for a parameter, float32 (dequantized when stored by bitsandbytes)."""
        key = self._key(self.merged, name)
        if key is not None and _quant_kind(self.merged, key) is not None:
            decoded = _dequantize(self.merged, key, self.device)
            self._requant[key] = decoded.requantize
            shape = self._param_shape(name)
            w = decoded.weight.to(F32)
            return (w if tuple(w.shape) == shape else w.reshape(shape)).contiguous()
        return self._read(self.merged, self.merged_reader, name, key, delta=False)

    def _param_shape(self, name: str) -> tuple[int, ...]:
        owner, _, leaf = name.rpartition(".")
        return tuple(self.sk.model.get_submodule(owner)._parameters[leaf].shape)

    def kernel(self, key: str) -> DeltaKernel:
        k = self._kernels.get(key)
        if k is None:
            k = self._kernels[key] = DeltaKernel.of(self.targets.by_key[key], device=self.device)
        return k

    def combined(self, key: str, *, layout: str = "out_in") -> torch.Tensor:
        """The combined delta D of several adapters on one base tensor, float32, drawn once per layer
        (``engine.combine.combined_delta``, the merge's own spec: DARE's masks come from the seed)."""
        term = self.targets.combined[key]
        D = self._deltas.get(key)
        if D is None:
            D = self._deltas[key] = combined_delta(term, device=self.device, layout="out_in")[0]  # (out, in) / (E, out, in)
        if layout == "out_in" or not term.transposed:
            return D
        return D.transpose(1, 2) if D.dim() == 3 else D.T  # the stored (in, out)

    def drop_kernels(self) -> None:
        self._kernels.clear()
        self._deltas.clear()

    def merge_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t (the parameter's unmerged value) with the adapter merged in float32, as merge_and_unload does."""
        if name in self.in_place:
            return t  # the unmerged value is W + dW already
        key = self.base_key(name)
        mod = self.targets.by_key.get(key) if key is not None else None
        if mod is not None and mod.magnitude is not None:
            return dora_merged(t, mod, device=self.device)  # m / ||W + dW||_row * (W + dW)
        if mod is not None:
            return self.kernel(key).add_(t, 0)  # W += scale * B @ A in the stored layout
        if key is not None and key in self.targets.combined:
            return t.add_(self.combined(key, layout="stored"))  # W += D
        for bias_mod in _listed(self.targets.bias_of.get(key) if key is not None else None):
            t.add_(bias_mod.bias.load().to(device=self.device, dtype=F32), alpha=float(bias_mod.scale))  # bias += scale * lora_B.bias
        return t

    def _merged_dtype(self, name: str) -> torch.dtype | None:
        key = self._key(self.merged, name)
        if key is None:
            parts = self.expert_keys(self.merged, name)
            key = parts[0][0] if parts else None
        return self.merged.store.dtype(key) if key is not None else None

    def round_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t stored the way MERGED stores the parameter: re-quantized with its scheme, or rounded to its dtype."""
        key = self._key(self.merged, name)
        if key is not None and _quant_kind(self.merged, key) is not None:
            return self.requant_(name, t)
        dtype = self._merged_dtype(name) or self.main_dtype
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

    def adapter_hooks(self) -> "AdapterHooks":
        """The forward hooks that apply the adapter on the unmerged path."""
        return AdapterHooks(self.sk, self)

    def values(self, path: str) -> Callable[[str], torch.Tensor]:
        """name -> the parameter's value on ``path``, from scratch (for modules outside the layer stack)."""
        chains = {
            UNMERGED: lambda n: self.unmerged_value(n),
            MERGED: lambda n: self.merged_value(n),
            MERGE32: lambda n: self.merge_(n, self.unmerged_value(n)),
            ROUNDED: lambda n: self.round_(n, self.merge_(n, self.unmerged_value(n))),
            QBASE: lambda n: self.requant_(n, self.base_value(n)),
        }
        return chains[path]


def hookable(module: nn.Module) -> bool:
    """A module whose unmerged LoRA output a forward hook adds (PEFT's LoRA Linear, Conv1D, Embedding);
    any other adapted parameter (an experts module's, a router's) is held as W + dW."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"


def _listed(x) -> list:
    return [] if x is None else x if isinstance(x, list) else [x]


def _stored_name(model: BaseModel, name: str) -> str | None:
    """The checkpoint key of a model parameter: as named, or under a name transformers renames on
    loading (Mixtral's ``block_sparse_moe.gate`` for ``mlp.gate``: its conversion mapping's renamings)."""
    key = model.tensor_name(name)
    for other in _renamed(model, name) if key is None else ():
        key = model.tensor_name(other)
        if key is not None:
            break
    return key


_RENAMINGS: dict[str, list[tuple[str, str]]] = {}


def _renamed(model: BaseModel, name: str) -> list[str]:
    """``name`` under each literal renaming (checkpoint -> model) of transformers' conversion mapping, undone."""
    mtype = str(model.model_type or "")
    if mtype not in _RENAMINGS:
        _RENAMINGS[mtype] = _literal_renamings(mtype)
    return [name.replace(target, source) for source, target in _RENAMINGS[mtype] if target in name]


def _literal_renamings(model_type: str) -> list[tuple[str, str]]:
    """(checkpoint substring, model substring) of the model type's plain-text renamings (not regexes)."""
    import re

    try:
        from transformers.conversion_mapping import (
            WeightRenaming,
            get_checkpoint_conversion_mapping,
        )

        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # an older transformers, an unknown type: names as stored
        return []
    plain = re.compile(r"[\w.]+")
    return [(src, tgt) for r in mapping if isinstance(r, WeightRenaming)
            for src, tgt in zip(r.source_patterns, r.target_patterns)
            if isinstance(src, str) and isinstance(tgt, str) and plain.fullmatch(src) and plain.fullmatch(tgt)]


def _expert_keys(model: BaseModel, name: str, experts: int) -> list[list[str]] | None:
    """Per expert, the stored tensors of the fused parameter ``name`` (``experts.<e>.gate_proj.weight``
    and ``experts.<e>.up_proj.weight`` for ``experts.gate_up_proj``: ``names.EXPERT_SOURCES``, also
    under Mixtral's ``block_sparse_moe``), as transformers' conversion concatenates them; None if absent."""
    paths = [name] + [name.replace(fused, stored) for fused, stored in EXPERT_PATH_RENAMES if fused in name]
    for path in dict.fromkeys(paths + _renamed(model, name)):
        experts_path, _, param = path.rpartition(".")
        for leaves in EXPERT_SOURCES.get(param, ()):
            keys = [[model.tensor_name(f"{experts_path}.{e}.{leaf}.weight") for leaf in leaves] for e in range(experts)]
            if all(k is not None for ks in keys for k in ks):
                return keys
    return None


# ----------------------------------------------------------------------------- the adapter on the fly


class AdapterHooks:
    """Forward hooks adding each adapted module's unmerged LoRA output (the unmerged path); for several
    adapters merged together, their combined delta's x D^T (and their lora_B biases)."""

    def __init__(self, sk, weights: Weights):
        self.sk, self.weights = sk, weights
        self.handles: list = []
        self.adapted: dict[str, str] = {}  # skeleton module -> base key of its weight
        t = weights.targets
        for mname, mod in sk.model.named_modules():
            if "weight" not in mod._parameters or not hookable(mod):
                continue
            key = weights.base_key(f"{mname}.weight" if mname else "weight", tie=False)
            if key is not None and (key in t.by_key or key in t.combined):
                self.adapted[mname] = key

    def __enter__(self) -> "AdapterHooks":
        for mname, key in self.adapted.items():
            mod = self.sk.model.get_submodule(mname)
            hook = self._hook(key) if key in self.weights.targets.by_key else self._combined_hook(mname, key)
            self.handles.append(mod.register_forward_hook(hook))
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

    def _combined_hook(self, mname: str, key: str):
        """out + x D^T (an embedding: out + D[ids]) + sum_i w_i * scale_i * lora_B_i.bias."""
        import torch.nn.functional as F

        w = self.weights
        embedding = w.targets.combined[key].parts[0][1].kind.value == "embedding"
        bias_key = w.base_key(f"{mname}.bias" if mname else "bias", tie=False)
        biases = _listed(w.targets.bias_of.get(bias_key)) if bias_key is not None else []

        def hook(module, args, out):
            D = w.combined(key)  # (out, in); an embedding's (dim, num)
            x = args[0]
            y = out + (F.embedding(x, D.T) if embedding else F.linear(x, D))  # (..., out)
            for m in biases:  # scale already carries the adapter's weight
                y = y + m.bias.load().to(device=y.device, dtype=F32) * float(m.scale)
            return y

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
