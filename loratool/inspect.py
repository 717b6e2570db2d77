"""``inspect``: an audit of an adapter from its files alone, never instantiating a model."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loratool.adapter import Adapter
from loratool.errors import ModuleMismatchError
from loratool.io.store import LazyTensor

if TYPE_CHECKING:
    from loratool.base import BaseModel


def inspect_adapter(adapter: Adapter, *, base: BaseModel | None = None, scan: bool = True) -> dict[str, Any]:
    """Describe an adapter: per-module rank/alpha/scale/shape, totals, flags and warnings.

    Args:
        adapter: the adapter, as read by ``read_adapter``.
        base: optional base model, for base naming, kinds, base_params and missing-module checks.
        scan: read each module's tensors to warn about all-zero B and NaN/Inf.
    Returns:
        A JSON-ready dict (the ``inspect --json`` object).
    """
    if base is not None:  # a base brings torch with it; a plain inspect reads only the files
        from loratool.base import bound_module, module_names_matching
    warnings = list(adapter.warnings)
    names: dict[str, str] = {}
    modules_seen = dict(adapter.modules)  # as the base lays them out, when there is one
    if base is not None:
        for name, mod in adapter.modules.items():
            if mod.experts:
                modules_seen[name] = _bound_experts(base, mod, warnings)
                continue
            key = base.weight_name(name)
            if key is None:
                warnings.append(f"{name}: not in the base model")
                continue
            names[name] = key[: -len(".weight")]
            try:
                modules_seen[name] = bound_module(base, mod, key)
            except ModuleMismatchError as exc:
                modules_seen[name] = replace(mod, kind=base.module_kind(name, mod.kind))
                warnings.append(str(exc))
        for tname in adapter.modules_to_save:
            if base.tensor_name(tname) is None:
                warnings.append(f"{tname}: modules_to_save tensor has no counterpart in the base (it will be added)")
        targets = adapter.target_modules
        if isinstance(targets, list):
            for t in targets:
                if not module_names_matching(base, [t]):
                    warnings.append(f"target_modules entry {t!r} matches nothing in the base")
        elif isinstance(targets, str) and targets != "all-linear" and not module_names_matching(base, targets):
            warnings.append(f"target_modules {targets!r} matches nothing in the base")

    modules = []
    for name, mod in modules_seen.items():
        modules.append(
            {
                "name": names.get(name, name),
                "rank": mod.rank,
                "alpha": mod.alpha,
                "scale": mod.scale,
                "in_features": mod.in_features,
                "out_features": mod.out_features,
                "params": mod.lora_params,
                "kind": mod.kind.value,
                "dora": mod.magnitude is not None,
                "bias": mod.bias is not None,
                **_experts_fields(mod),
            }
        )
        if scan:
            warnings.extend(_scan_module(name, mod))
    if scan:
        for tname, t in adapter.modules_to_save.items():
            if not _finite_and_zero(t)[0]:
                warnings.append(f"{tname}: modules_to_save tensor holds NaN or Inf")

    report: dict[str, Any] = {
        "format": adapter.format,
        "path": str(adapter.path) if adapter.path else None,
        "base_model": adapter.base_model,
        "variant": adapter.variant,
        "modules": modules,
        "modules_to_save": {n: list(t.shape) for n, t in adapter.modules_to_save.items()},
        "lora_params": adapter.lora_params,
        "total_params": adapter.total_params,
        "target_modules": adapter.target_modules,
        "rslora": adapter.use_rslora,
        "dora": adapter.use_dora,
        "bias": adapter.lora_bias,
        "dtype": adapter.dtype_name,
        "file_size": adapter.file_size(),
        "rank_histogram": dict(sorted(Counter(m["rank"] for m in modules).items())),
        "warnings": warnings,
    }
    if base is not None:
        base_params = base.unique_params()
        report["base"] = str(base.path)
        report["base_params"] = base_params
        report["percent_of_base"] = 100.0 * adapter.lora_params / base_params if base_params else None
    return report


def _bound_experts(base: BaseModel, mod, warnings: list[str]):
    """A fused experts module with the orientation its base stores (a warning when it does not fit)."""
    from loratool.experts import bind_experts

    try:
        return bind_experts(base, mod)[0]
    except ModuleMismatchError as exc:
        warnings.append(str(exc))
        return mod


def _experts_fields(mod) -> dict[str, Any]:
    """For a fused experts module: E, the stored orientation (known with a base), LoRA params per expert."""
    if not mod.experts:
        return {}
    orientation = {"experts": "(E, out, in)", "experts_t": "(E, in, out)"}[mod.kind.value]
    return {"experts": mod.experts, "orientation": orientation, "params_per_expert": mod.lora_params // mod.experts}


def _scan_module(name: str, mod) -> list[str]:
    (a_finite, _), (b_finite, b_zero) = _finite_and_zero(mod.A), _finite_and_zero(mod.B)
    if not (a_finite and b_finite):
        return [f"{name}: NaN or Inf in lora_A/lora_B"]
    if b_zero:
        return [f"{name}: lora_B is all zeros (an untrained adapter: its delta is zero)"]
    return []


def _finite_and_zero(t: LazyTensor, chunk: int = 1 << 20) -> tuple[bool, bool]:
    """(all finite, all zero): from the stored bits when ``t`` is a stored tensor as it is (a
    safetensors tensor, or a pickled one that is a byte range of its torch zip entry: no torch
    needed, pages dropped block by block, ``io/bitscan.py``), else from the loaded tensor (a
    legacy pickle, a strided view, a transform)."""
    if t.source is not None:
        summary = t.source[0].value_summary(t.source[1])
        if summary is not None:
            return summary
    import torch

    flat = t.load().reshape(-1)  # a view when contiguous (a strided view is copied once here)
    finite, zero = True, True
    for i in range(0, flat.numel(), chunk):
        block = flat[i : i + chunk]
        finite = finite and bool(torch.isfinite(block.float()).all())
        zero = zero and not bool(block.any())
    return finite, zero
