"""Rank and scale surgery on whole adapters: rescale, rerank, combine, extract.

Each function returns ``(Adapter, report)``: a new adapter in canonical form (write it with
``loratool.formats.write_adapter``) and a JSON-ready dict describing what was done per module.
No function forms a module's (out, in) matrix except ``extract``, whose input is two dense models
(read one tensor pair at a time).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind, lora_scale
from loratool.base import BaseModel, is_conv1d
from loratool.engine.combine import CombinedTerm, combined_delta
from loratool.engine.delta import factor_product
from loratool.engine.methods import SPARSIFYING, CombineSpec
from loratool.errors import InputError, ModuleMismatchError, UnsupportedError
from loratool.io.store import LazyTensor
from loratool.names import TASK_HEAD_ROOTS
from loratool.ops.lowrank import (
    LowRankSVD,
    choose_rank,
    dense_svd,
    factored_svd,
    factors_from_svd,
    pad_factors,
    rescale_factors,
    stack_factors,
    validate_rule,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"float16"`` -> ``torch.float16`` (None stays None).

    Raises:
        InputError: unknown name.
    """
    if name is None:
        return None
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r} (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


def _check_alpha(alpha: float | None, what: str = "alpha") -> None:
    if alpha is not None and (isinstance(alpha, bool) or not math.isfinite(alpha) or alpha == 0):
        raise InputError(f"{what} must be a finite nonzero number, got {alpha}")


def _out_scale(alpha: float, rank: int, rslora: bool) -> float:
    return lora_scale(alpha, rank, rslora=rslora)


def _refuse_dora(adapter: Adapter, op: str, label: str = "") -> None:
    if adapter.use_dora or any(m.magnitude is not None for m in adapter.modules.values()):
        where = f" ({label})" if label else ""
        raise UnsupportedError(
            f"{op} refuses DoRA adapters{where}: DoRA normalizes W + dW per column, so changing dW's rank "
            "or summing adapters does not give the same model; merge it or use a LoRA adapter"
        )


def _rescaled_bias(module: LoraModule, factor: float, dtype: torch.dtype) -> LazyTensor | None:
    """PEFT adds ``scale * lora_B.bias``: keep that product when the scale changes by 1/factor."""
    if module.bias is None:
        return None
    b = module.bias.load()
    return LazyTensor.of((b.double() * factor).to(dtype if b.dtype.is_floating_point else b.dtype))


def _histogram(ranks: Iterable[int]) -> dict[int, int]:
    return dict(sorted(Counter(ranks).items()))


# --------------------------------------------------------------------------- rescale


def rescale(adapter: Adapter, *, alpha: float | None = None, rslora: bool | None = None, split: str = "b",
            dtype: torch.dtype | None = None) -> tuple[Adapter, dict[str, Any]]:
    """Change lora_alpha and/or the scaling rule, keeping every module's ``dW`` (and bias term).

    Args:
        alpha: the new lora_alpha of every module (None keeps each module's alpha).
        rslora: the new rule (True: alpha / sqrt(r), False: alpha / r, None: unchanged).
        split: ``"b"`` rescales B only (A kept bit for bit) or ``"balanced"`` (both by sqrt).
        dtype: storage dtype of the output factors (default: the input's).
    Returns:
        (adapter, report) with per-module alpha and scale before and after.
    Raises:
        InputError: nothing to change, alpha zero or not finite, unknown split, overflow.
    """
    if alpha is None and rslora is None:
        raise InputError("nothing to change: give a new alpha and/or a scaling rule (rslora on or off)")
    _check_alpha(alpha)
    if split not in ("b", "balanced"):
        raise InputError(f"unknown split {split!r} (use 'b' or 'balanced')")
    new_rslora = adapter.use_rslora if rslora is None else bool(rslora)
    modules: dict[str, LoraModule] = {}
    rows = []
    for name, m in adapter.modules.items():
        new_alpha = m.alpha if alpha is None else float(alpha)
        if new_alpha == 0:
            raise InputError(f"{name}: alpha 0 cannot keep the module's update; give --alpha")
        new_scale = _out_scale(new_alpha, m.rank, new_rslora)
        factor = m.scale / new_scale
        out_dtype = dtype or m.B.dtype
        try:
            A, B = rescale_factors(m.A.load(), m.B.load(), factor, split=split, dtype=out_dtype)
        except InputError as exc:  # the rescaled factors overflow the storage dtype
            raise InputError(f"{name}: {exc}") from None
        new = m.with_factors(A, B, alpha=new_alpha, scale=new_scale)
        new = replace(new, bias=_rescaled_bias(m, factor, out_dtype),
                      magnitude=None if m.magnitude is None else LazyTensor.of(m.magnitude.load().to(out_dtype)))
        modules[name] = new
        rows.append({
            "name": name, "rank": m.rank, "alpha_before": m.alpha, "alpha_after": new_alpha,
            "scale_before": m.scale, "scale_after": new_scale, "factor": factor,
        })
    out = adapter.replace_modules(modules, use_rslora=new_rslora, variant="lora")
    report = {
        "operation": "rescale",
        "source": str(adapter.path) if adapter.path else None,
        "alpha": alpha,
        "rslora_before": adapter.use_rslora,
        "rslora_after": new_rslora,
        "split": split,
        "modules": rows,
        "warnings": list(adapter.warnings),
    }
    return out, report


# --------------------------------------------------------------------------- rerank


def module_svd(module: LoraModule) -> LowRankSVD:
    """The exact SVD of ``module.delta()`` from its factors (float64).

    Raises:
        InputError: a factor holds NaN or infinity.
    """
    B, A = module.B.load(), module.A.load()
    if not (torch.isfinite(A.double()).all() and torch.isfinite(B.double()).all()):
        raise InputError(f"{module.name}: lora_A or lora_B holds NaN or infinite values")
    return factored_svd(B, A, module.scale)


def rerank(adapter: Adapter, *, rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
           fro_error: float | None = None, max_rank: int | None = None, pad: bool = False,
           dtype: torch.dtype | None = None) -> tuple[Adapter, dict[str, Any]]:
    """The optimal low-rank approximation of every module's ``dW`` (truncated SVD, Eckart-Young).

    Exactly one rule: ``rank`` (every module at that rank; a module already at or below it is
    kept as it is, or zero-padded to it with ``pad``), ``energy`` (per module the smallest rank
    keeping that fraction of ``||dW||_F^2``), ``sv_ratio`` (keep singular values within that
    ratio of the largest) or ``fro_error`` (the smallest rank with at most that relative
    Frobenius error). ``max_rank`` caps the rank any rule picks. Each module keeps its alpha
    (its scale follows the new rank); the factors absorb the difference. lora_bias terms and
    modules_to_save are carried over unchanged in effect.

    Returns:
        (adapter, report); the report lists per module the rank before and after, the kept
        energy, the relative error and the singular values.
    Raises:
        InputError: bad rule values; UnsupportedError: a DoRA adapter.
    """
    validate_rule(rank=rank, energy=energy, sv_ratio=sv_ratio, fro_error=fro_error, max_rank=max_rank)
    if sum(x is not None for x in (rank, energy, sv_ratio, fro_error)) != 1:
        raise InputError("give exactly one of --rank, --energy, --sv-ratio, --fro-error")
    if pad and rank is None:
        raise InputError("--pad needs --rank")
    _refuse_dora(adapter, "rerank")
    rslora = adapter.use_rslora
    modules: dict[str, LoraModule] = {}
    rows = []
    for name, m in adapter.modules.items():
        rule = dict(rank=rank, energy=energy, sv_ratio=sv_ratio, fro_error=fro_error, max_rank=max_rank)
        rerank_one = _rerank_experts if m.experts else _rerank_module
        modules[name], row = rerank_one(m, rule, pad=pad, rslora=rslora, out_dtype=dtype or m.B.dtype, cast=dtype is not None)
        rows.append(row)
    out = adapter.replace_modules(modules, variant="lora")
    criterion = {k: v for k, v in (("rank", rank), ("energy", energy), ("sv_ratio", sv_ratio), ("fro_error", fro_error)) if v is not None}
    if max_rank is not None:
        criterion["max_rank"] = max_rank
    report = {
        "operation": "rerank",
        "source": str(adapter.path) if adapter.path else None,
        "criterion": criterion,
        "pad": pad,
        "modules": rows,
        "rank_histogram_before": _histogram(r["rank_before"] for r in rows),
        "rank_histogram": _histogram(r["rank"] for r in rows),
        "lora_params_before": adapter.lora_params,
        "lora_params": out.lora_params,
        "counts": dict(Counter(r["action"] for r in rows)),
        "warnings": list(adapter.warnings),
    }
    return out, report


def _rerank_module(m: LoraModule, rule: dict, *, pad: bool, rslora: bool, out_dtype: torch.dtype, cast: bool) -> tuple[LoraModule, dict]:
    """One module at its new rank: unchanged, zero-padded, or its optimal truncation (QR-reduced SVD)."""
    svd = module_svd(m)
    rank = rule["rank"]
    if rank is not None and m.rank <= rank:
        k = rank if pad else m.rank
        action = "padded" if pad and rank > m.rank else "unchanged"
    else:
        k = choose_rank(svd, **rule)
        k = min(k, m.rank) if rank is None else k
        action = "truncated" if k < m.rank else "unchanged"
    kept = min(k, m.rank)
    if action == "unchanged":
        new = _cast_module(m, out_dtype) if cast else m
    else:
        alpha, new_scale = _keep_alpha(m.alpha, k, rslora)
        factor = m.scale / new_scale
        if action == "padded":
            A, B = rescale_factors(m.A.load(), m.B.load(), factor, dtype=out_dtype)
            A, B = pad_factors(A, B, k)
        else:
            A, B = factors_from_svd(svd, k, new_scale, dtype=out_dtype)
        new = m.with_factors(A, B, alpha=alpha, scale=new_scale)
        new = replace(new, bias=_rescaled_bias(m, factor, out_dtype))
    return new, _rerank_row(m, new, action, svd.kept_energy(kept), svd.relative_error(kept), svd.S.tolist())


def _rerank_row(m: LoraModule, new: LoraModule, action: str, kept_energy: float, relative_error: float, singular_values: list) -> dict:
    return {"name": m.name, "rank_before": m.rank, "rank": new.rank, "action": action, "kept_energy": kept_energy,
            "relative_error": relative_error, "alpha": new.alpha, "scale": new.scale, "singular_values": singular_values}


def _rerank_experts(m: LoraModule, rule: dict, *, pad: bool, rslora: bool, out_dtype: torch.dtype, cast: bool) -> tuple[LoraModule, dict]:
    """A fused experts module: each expert's delta truncated optimally (QR-reduced SVD of its own
    factors, never an (out, in) matrix, one expert at a time) to one rank for all experts (PEFT keeps
    one r per module): the rule's rank, or the largest any expert needs under the rule."""
    from loratool.engine.delta import expert_factors, join_experts

    A, B = m.A.load(), m.B.load()  # (E * r, in), (out, r * E)
    svds = [factored_svd(*reversed(expert_factors(A, B, m.experts, e)), m.scale) for e in range(m.experts)]
    rank = rule["rank"]
    if rank is not None and m.rank <= rank and not pad:
        new = _cast_module(m, out_dtype) if cast else m
        return new, _experts_row(m, new, "unchanged", svds, m.rank)
    if rank is not None:
        k = rank
    else:
        k = min(m.rank, max(choose_rank(svd, **rule) for svd in svds))
    if k == m.rank and not pad:
        new = _cast_module(m, out_dtype) if cast else m
        return new, _experts_row(m, new, "unchanged", svds, k)
    alpha, new_scale = _keep_alpha(m.alpha, k, rslora)
    A2, B2 = join_experts([factors_from_svd(svd, k, new_scale, dtype=out_dtype) for svd in svds])
    new = replace(m.with_factors(A2, B2, alpha=alpha, scale=new_scale), experts=m.experts)
    action = "padded" if k > m.rank else "truncated"
    return new, _experts_row(m, new, action, svds, min(k, m.rank))


def _experts_row(m: LoraModule, new: LoraModule, action: str, svds: list, kept: int) -> dict:
    """The report row of an experts module: energy and error over all experts, the worst expert's error."""
    total = sum(s.total for s in svds)
    tail = sum((s.relative_error(kept) ** 2) * s.total for s in svds)
    row = _rerank_row(m, new, action, 1.0 - tail / total if total > 0 else 1.0, (tail / total) ** 0.5 if total > 0 else 0.0,
                      sorted((float(x) for s in svds for x in s.S), reverse=True))
    row.update(experts=m.experts, max_expert_error=max(s.relative_error(kept) for s in svds))
    return row


def _keep_alpha(alpha: float, rank: int, rslora: bool) -> tuple[float, float]:
    """(alpha, scale) of a module that keeps its alpha at a new rank; alpha 0 becomes scale 1."""
    scale = _out_scale(alpha, rank, rslora) if alpha else 0.0
    if scale == 0 or not math.isfinite(scale):
        return (math.sqrt(rank) if rslora else float(rank)), 1.0
    return alpha, scale


def _cast_module(m: LoraModule, dtype: torch.dtype) -> LoraModule:
    new = m.with_factors(m.A.load().to(dtype), m.B.load().to(dtype))
    return replace(new, bias=None if m.bias is None else LazyTensor.of(m.bias.load().to(dtype)))


# --------------------------------------------------------------------------- combine


def _norm_base(name: str | None) -> str | None:
    return name.rstrip("/") if isinstance(name, str) and name.strip() else None


def check_same_base(adapters: Sequence[Adapter], *, labels: Sequence[str] | None = None, ignore_base_name: bool = False) -> None:
    """Refuse adapters made for different bases: different base model names or module shapes.

    Raises:
        InputError: different ``base_model_name_or_path`` (unless ``ignore_base_name``).
        ModuleMismatchError: a module with different shapes or kinds.
    """
    labels = list(labels or [str(a.path or i) for i, a in enumerate(adapters)])
    first_name, first_label = None, None
    for a, label in zip(adapters, labels):
        n = _norm_base(a.base_model)
        if n is None:
            continue
        if first_name is None:
            first_name, first_label = n, label
        elif n != first_name and not ignore_base_name:
            raise InputError(
                f"adapters for different bases: {first_label} is for {first_name!r}, {label} for {n!r} "
                "(pass --ignore-base-name if they are the same model)"
            )
    seen: dict[str, tuple[LoraModule, str]] = {}
    for a, label in zip(adapters, labels):
        for name, m in a.modules.items():
            if name not in seen:
                seen[name] = (m, label)
                continue
            ref, ref_label = seen[name]
            if (ref.out_features, ref.in_features) != (m.out_features, m.in_features):
                raise ModuleMismatchError(
                    name, f"adapters for different bases: {ref_label} has dW {ref.out_features}x{ref.in_features}, "
                    f"{label} has {m.out_features}x{m.in_features}",
                )
            if (ref.kind is ModuleKind.EMBEDDING) != (m.kind is ModuleKind.EMBEDDING):
                raise ModuleMismatchError(name, f"{ref_label} adapts it as {ref.kind.value}, {label} as {m.kind.value}")
        for tname, t in a.modules_to_save.items():
            other = next((b.modules_to_save[tname] for b in adapters if b is not a and tname in b.modules_to_save), None)
            if other is not None and tuple(other.shape) != tuple(t.shape):
                raise ModuleMismatchError(tname, f"adapters for different bases: modules_to_save shapes {tuple(other.shape)} and {tuple(t.shape)}")


COMBINE_METHODS = ("cat", "svd", "linear", *SPARSIFYING)


def combine(adapters: Sequence[Adapter], *, weights: Sequence[float] | None = None, method: str = "cat",
            rank: int | None = None, alpha: float | None = None, dtype: torch.dtype | None = None,
            ignore_base_name: bool = False, labels: Sequence[str] | None = None, density: float | None = None,
            majority_sign: str = "total", seed: int = 0) -> tuple[Adapter, dict[str, Any]]:
    """The combination of adapters for the same base, as one adapter.

    ``cat`` (and ``linear`` without ``rank``) stacks the factors: the exact weighted sum
    ``sum_i w_i * dW_i``, ranks add. ``svd`` (and ``linear`` with ``rank``) gives the optimal
    rank-``rank`` approximation of that sum from the stacked factors, never forming an (out, in)
    matrix. ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` combine the whole
    deltas of each module as ``engine.combine`` defines them (``density``, ``majority_sign``,
    ``seed``), then truncate the result optimally to ``rank`` (default for svd and these: the
    largest input rank of the module); the report gives the truncation error per module.
    Each input's own scale (alpha, rank, rsLoRA) is applied first. A module missing from some
    inputs is combined over those that have it. lora_bias terms add (linear methods only).
    modules_to_save tensors are carried over (linear methods only); the same name with different
    contents is refused.

    Returns:
        (adapter, report).
    Raises:
        InputError, ModuleMismatchError: different bases, bad weights/rank/method/density.
        UnsupportedError: DoRA inputs, conflicting modules_to_save, modules_to_save or lora_bias
            with a sparsifying method.
    """
    adapters = list(adapters)
    labels = list(labels or [str(a.path) if a.path else f"adapter {i + 1}" for i, a in enumerate(adapters)])
    method, spec = _combine_method(adapters, weights, method, rank, alpha, density, majority_sign, seed)
    for a, label in zip(adapters, labels):
        _refuse_dora(a, "combine", label)
        if spec.sparsifying:
            refuse_unprunable(a, label, method)
    check_same_base(adapters, labels=labels, ignore_base_name=ignore_base_name)
    first = adapters[0]
    dtypes = {a.dtype for a in adapters if a.dtype is not None}
    out_dtype = dtype or (next(iter(dtypes)) if len(dtypes) == 1 else torch.float32)
    names: list[str] = []
    for a in adapters:
        names.extend(n for n in a.modules if n not in names)
    modules: dict[str, LoraModule] = {}
    rows = []
    for name in names:
        present = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
        modules[name], row = _combine_module(name, present, spec, method, rank=rank, alpha=alpha,
                                             rslora=first.use_rslora, out_dtype=out_dtype)
        rows.append(row)
    out = _combined_adapter(first, adapters, labels, modules, set(names))
    report = {
        "operation": "combine", "method": method, "inputs": labels, "weights": list(spec.weights), "rank": rank,
        "dtype": _dtype_name(out_dtype), "rslora": first.use_rslora, "modules": rows,
        "modules_to_save": sorted(out.modules_to_save), "rank_histogram": _histogram(r["rank"] for r in rows),
        "lora_params": out.lora_params, "warnings": list(out.warnings),
    }
    if spec.sparsifying:
        report["combination"] = spec.as_dict()
    return out, report


def _combine_method(adapters, weights, method, rank, alpha, density, majority_sign, seed) -> tuple[str, CombineSpec]:
    """The method as combine runs it (``linear`` is cat, or svd with a rank) and the checked spec."""
    if not adapters:
        raise InputError("combine needs at least one adapter")
    if method not in COMBINE_METHODS:
        raise InputError(f"unknown method {method!r} (use {', '.join(COMBINE_METHODS)})")
    if method == "linear":
        method = "svd" if rank is not None else "cat"
    if rank is not None:
        validate_rule(rank=rank)
        if method == "cat":
            raise InputError("--rank applies to --method svd and the sparsifying methods (cat is exact: ranks add)")
    _check_alpha(alpha)
    spec = CombineSpec.checked(len(adapters), method=method if method in SPARSIFYING else "linear", weights=weights,
                               density=density, majority_sign=majority_sign, seed=seed)
    return method, spec


def refuse_unprunable(adapter: Adapter, label: str, method: str) -> None:
    """A sparsifying method (TIES, DARE, magnitude pruning) prunes and elects signs of weight deltas:
    trained modules_to_save and lora_bias terms are refused (used by ``combine`` and ``merge``)."""
    if adapter.trained_to_save:
        raise UnsupportedError(
            f"{label}: has modules_to_save ({', '.join(sorted(adapter.trained_to_save))}); --method {method} prunes "
            "and elects signs of deltas, and a replacement tensor is not a delta (use --method linear)"
        )
    if any(m.bias is not None for m in adapter.modules.values()):
        raise UnsupportedError(f"{label}: has lora_bias terms; --method {method} applies to weight deltas only (use --method linear)")


def _combine_module(name: str, present: list[tuple[int, LoraModule]], spec: CombineSpec, method: str, *, rank: int | None,
                    alpha: float | None, rslora: bool, out_dtype: torch.dtype) -> tuple[LoraModule, dict[str, Any]]:
    """One output module: its rank, alpha and scale, then the factors by the method."""
    ref = present[0][1]
    if ref.experts:
        return _combine_experts(name, present, spec, method, rank=rank, alpha=alpha, rslora=rslora, out_dtype=out_dtype)
    k = sum(m.rank for _, m in present) if method == "cat" else (rank if rank is not None else max(m.rank for _, m in present))
    m_alpha = float(alpha) if alpha is not None else ref.alpha
    if not m_alpha:
        m_alpha = math.sqrt(k) if rslora else float(k)
    scale = _out_scale(m_alpha, k, rslora)
    row: dict[str, Any] = {"name": name, "inputs": len(present), "rank": k, "alpha": m_alpha, "scale": scale}
    if spec.sparsifying:
        A, B = _sparsified_factors(name, present, spec, k, scale, out_dtype, row)
    else:
        terms = [(m.A.load(), m.B.load(), spec.weights[i] * m.scale) for i, m in present]
        A, B = _linear_factors(name, terms, method, k, scale, out_dtype, row)
    bias = _combined_bias(present, spec.weights, scale, out_dtype)
    return LoraModule(name, ref.kind, LazyTensor.of(A), LazyTensor.of(B), alpha=m_alpha, scale=scale, bias=bias), row


def _combine_experts(name: str, present: list[tuple[int, LoraModule]], spec: CombineSpec, method: str, *, rank: int | None,
                     alpha: float | None, rslora: bool, out_dtype: torch.dtype) -> tuple[LoraModule, dict[str, Any]]:
    """A fused experts module: each expert combined on its own (its parts are ordinary modules,
    ``experts.expert_part``), then the experts joined back into PEFT's fused factors."""
    from loratool.engine.delta import join_experts
    from loratool.experts import expert_part

    ref = present[0][1]
    counts = {m.experts for _, m in present}
    if len(counts) != 1:
        raise ModuleMismatchError(name, f"adapters for different bases: expert counts {sorted(counts)}")
    pairs, rows = [], []
    for e in range(ref.experts):
        parts = [(i, expert_part(m, e, 0, m.out_features, name)) for i, m in present]
        mod, row = _combine_module(f"{name}[{e}]", parts, spec, method, rank=rank, alpha=alpha, rslora=rslora, out_dtype=out_dtype)
        pairs.append((mod.A.load(), mod.B.load()))
        rows.append(row)
    A, B = join_experts(pairs)  # (E * k, in), (out, k * E)
    row = {k: rows[0][k] for k in ("inputs", "rank", "alpha", "scale")}
    row.update(name=name, experts=ref.experts)
    if "relative_error" in rows[0]:
        row["max_expert_error"] = max(r["relative_error"] for r in rows)
        row["relative_error"] = row["max_expert_error"]
        row["kept_energy"] = min(r["kept_energy"] for r in rows)
        row["singular_values"] = sorted((x for r in rows for x in r["singular_values"]), reverse=True)
    return LoraModule(name, ref.kind, LazyTensor.of(A), LazyTensor.of(B), alpha=row["alpha"], scale=row["scale"], experts=ref.experts), row


def _linear_factors(name: str, terms: list, method: str, k: int, scale: float, out_dtype: torch.dtype, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """cat: the stacked factors (exact); svd: the optimal rank-k truncation of their product (QR-reduced)."""
    if method == "cat":
        A, B = stack_factors(terms, scale)
        A, B = A.to(out_dtype), B.to(out_dtype)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise InputError(f"{name}: combined factors overflow {_dtype_name(out_dtype)}; use --dtype float32")
        return A, B
    A64, B64 = stack_factors(terms, 1.0)
    if not (torch.isfinite(A64).all() and torch.isfinite(B64).all()):
        raise InputError(f"{name}: lora_A or lora_B holds NaN or infinite values (or the weighted sum overflows)")
    svd = factored_svd(B64, A64, 1.0)
    kept = min(k, svd.rank)
    row.update(kept_energy=svd.kept_energy(kept), relative_error=svd.relative_error(kept), singular_values=svd.S.tolist())
    return factors_from_svd(svd, k, scale, dtype=out_dtype)


def _sparsified_factors(name: str, present: list[tuple[int, LoraModule]], spec: CombineSpec, k: int, scale: float,
                        out_dtype: torch.dtype, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's combined delta D (out, in) by the method, then its optimal rank-k truncation
    (Eckart-Young; the report's relative_error is ||D - D_k|| / ||D||)."""
    D, st = combined_delta(CombinedTerm(f"{name}.weight", tuple(present), spec), layout="out_in")  # (out, in)
    if not bool(torch.isfinite(D).all()):
        raise InputError(f"{name}: the combined delta holds NaN or infinite values")
    svd = dense_svd(D, rank=k)
    kept = min(k, svd.rank)
    row.update(kept_energy=svd.kept_energy(kept), relative_error=svd.relative_error(kept), singular_values=svd.S[:k].tolist(),
               **{key: v for key, v in st.as_dict().items() if key in ("delta_norms", "kept_fraction", "dropped_norms", "outvoted", "combined_norm")})
    return factors_from_svd(svd, k, scale, dtype=out_dtype)


def _combined_bias(present: list[tuple[int, LoraModule]], weights: Sequence[float], scale: float, out_dtype: torch.dtype) -> LazyTensor | None:
    """sum_i w_i * scale_i * bias_i, stored divided by the output scale (PEFT multiplies it back)."""
    with_bias = [(i, m) for i, m in present if m.bias is not None]
    if not with_bias:
        return None
    total = torch.zeros(present[0][1].out_features, dtype=torch.float64)
    for i, m in with_bias:
        total += m.bias.load().double() * (weights[i] * m.scale)
    return LazyTensor.of((total / scale).to(out_dtype))


def shared_modules_to_save(adapters: Sequence[Adapter], labels: Sequence[str], *, what: str) -> dict[str, LazyTensor]:
    """The union of the adapters' modules_to_save; the same name with different contents is refused
    (used by ``combine`` and by ``merge`` of several adapters, ``what`` names the command).

    Raises:
        UnsupportedError: naming the tensor and the input that differs.
    """
    to_save: dict[str, LazyTensor] = {}
    for a, label in zip(adapters, labels):
        for tname, t in a.modules_to_save.items():
            if tname not in to_save:
                to_save[tname] = t
            elif not torch.equal(to_save[tname].load(), t.load()):
                raise UnsupportedError(
                    f"{tname}: modules_to_save differs between inputs ({label}); a weighted sum of replacement "
                    f"tensors is not a LoRA combination, so {what} refuses it"
                )
    return to_save


def _combined_adapter(first: Adapter, adapters: list[Adapter], labels: list[str], modules: dict[str, LoraModule],
                      names: set[str]) -> Adapter:
    """The output adapter: the first input's settings, the combined modules, the shared modules_to_save."""
    to_save = shared_modules_to_save(adapters, labels, what="combine")
    extras = dict(first.extras)
    if names != set(first.modules):
        extras.pop("peft_modules", None)
    return first.replace_modules(
        modules,
        modules_to_save=to_save,
        use_dora=False,
        lora_bias=any(m.bias is not None for m in modules.values()),
        variant="lora",
        extras=extras,
        warnings=[w for a in adapters for w in a.warnings],
        # the first adapter's target_modules rule names its modules only when the set is the same
        target_modules=first.target_modules if names == set(first.modules) else None,
    )


# --------------------------------------------------------------------------- extract


_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _task_type(architecture: str | None) -> str | None:
    if not architecture:
        return None
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if architecture.endswith(suffix):
            return task
    return None


class ModelLayout:
    """What each module of a base model is, from the model class on the meta device (no memory).

    ``kinds`` maps module names (as PEFT sees them) to "linear", "conv1d", "embedding", "norm" or
    "other"; ``heads`` are modules outside the base model (lm_head, classifiers). When the class
    cannot be built, names and shapes are used instead and ``guessed`` is True.
    """

    def __init__(self, base: BaseModel):
        self.base = base
        self.kinds: dict[str, str] = {}
        self.heads: set[str] = set()
        self.params: set[str] = set()
        self.prefix: str | None = None
        self.guessed = False
        try:
            self._from_class()
        except Exception:  # any failure to build the class: fall back to names
            self.guessed = True
            self.kinds.clear()
            self.heads.clear()
            self.params.clear()

    def _from_class(self) -> None:
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(self.base.path))
        archs = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, archs[0]) if archs and hasattr(transformers, archs[0]) else transformers.AutoModel
        with torch.device("meta"):
            model = cls._from_config(config) if cls is not transformers.AutoModel else cls.from_config(config)
        self.prefix = getattr(model, "base_model_prefix", None) or None
        conv1d = None
        try:
            from transformers.pytorch_utils import Conv1D as conv1d
        except ImportError:
            pass
        for name, mod in model.named_modules():
            if not name:
                continue
            if isinstance(mod, torch.nn.Linear):
                kind = "linear"
            elif conv1d is not None and isinstance(mod, conv1d):
                kind = "conv1d"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "embedding"
            elif "norm" in type(mod).__name__.lower():
                kind = "norm"
            else:
                kind = "other"
            self.kinds[name] = kind
            if self.prefix and hasattr(model, self.prefix) and not (name == self.prefix or name.startswith(self.prefix + ".")):
                self.heads.add(name)
        self.params = set(model.state_dict().keys())

    def param_name(self, key: str) -> str:
        """The model's parameter name for a checkpoint key (adding or removing the base prefix)."""
        if self.guessed or key in self.params:
            return key
        if self.prefix:
            if f"{self.prefix}.{key}" in self.params:
                return f"{self.prefix}.{key}"
            if key.startswith(self.prefix + ".") and key[len(self.prefix) + 1:] in self.params:
                return key[len(self.prefix) + 1:]
        return key

    def kind(self, module: str, shape: tuple[int, ...]) -> str:
        if not self.guessed and module in self.kinds:
            return self.kinds[module]
        leaf = module.rsplit(".", 1)[-1].lower()
        if len(shape) == 2:
            if "embed" in leaf or leaf in ("wte", "wpe") or module.endswith("embeddings"):
                return "embedding"
            return "conv1d" if is_conv1d(self.base.model_type, module) else "linear"
        if len(shape) == 1 and ("norm" in leaf or leaf.startswith("ln")):
            return "norm"
        return "other"

    def is_head(self, module: str) -> bool:
        if not self.guessed:
            return module in self.heads or any(module.startswith(h + ".") for h in self.heads)
        return module.split(".")[0] in TASK_HEAD_ROOTS


def _check_extract_args(base: BaseModel, finetuned: BaseModel, *, rank, energy, alpha, niter: int) -> None:
    if (rank is None) == (energy is None):
        raise InputError("give exactly one of --rank or --energy")
    validate_rule(rank=rank, energy=energy)
    _check_alpha(alpha)
    if niter < 0:
        raise InputError(f"niter must be >= 0, got {niter}")
    if base.model_type and finetuned.model_type and base.model_type != finetuned.model_type:
        raise InputError(f"BASE is a {base.model_type} model but FINETUNED is a {finetuned.model_type} model")


def _extract_targets(modules: Sequence[str] | str | None) -> Sequence[str] | str:
    """``modules`` as PEFT target_modules; nothing given, or ``["all-linear"]``, is "all-linear"."""
    targets = "all-linear" if modules is None or (not isinstance(modules, str) and len(modules) == 0) else modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return targets


def _group_by_module(finetuned: BaseModel, layout: ModelLayout) -> dict[str, dict[str, str]]:
    """FINETUNED's checkpoint keys grouped by module as PEFT names them: {module: {leaf: key}}."""
    groups: dict[str, dict[str, str]] = {}
    for key in finetuned.keys():
        pname = layout.param_name(key)
        module, _, leaf = pname.rpartition(".")
        groups.setdefault(module, {})[leaf] = key
    return groups


class _Extraction:
    """One ``extract`` run: its inputs, and what it gathers module by module.

    ``lora_modules`` and ``rows`` hold the extracted LoRA and its report rows; ``other`` the
    changed tensors the LoRA does not represent; ``saved`` the modules_to_save tensors;
    ``head_roots`` the heads saved whole at their root (PEFT's task types keep heads whole).
    """

    def __init__(self, base: BaseModel, finetuned: BaseModel, layout: ModelLayout, targets, *, svd_args: dict[str, Any],
                 dtype: torch.dtype | None, modules_to_save: bool, progress: Callable[[int, str], None] | None):
        self.base, self.finetuned, self.layout, self.targets = base, finetuned, layout, targets
        self.svd_args = svd_args  # rank, energy, alpha, exact, niter, seed of _extract_module
        self.dtype = dtype
        self.modules_to_save = modules_to_save
        self.progress = progress
        self.lora_modules: dict[str, LoraModule] = {}
        self.rows: list[dict[str, Any]] = []
        self.other: list[dict[str, Any]] = []
        self.saved: dict[str, LazyTensor] = {}
        self.unchanged = 0
        self.head_roots: set[str] = set()
        self.ft_dtypes: Counter = Counter()

    def add_module(self, module: str, leaves: dict[str, str]) -> None:
        """Compare one module's tensors; extract its LoRA, or report (and maybe save) what changed."""
        shape = self.finetuned.store.shape
        layout = self.layout
        changed_leaves, module_is_new = self._compare_leaves(leaves)
        wkey = leaves.get("weight")
        kind = layout.kind(module, tuple(shape(wkey)) if wkey else ())
        is_linear = wkey is not None and kind in ("linear", "conv1d") and "weight" not in changed_leaves and len(shape(wkey)) == 2
        selected = is_linear and self._selected(module)
        lora_done = False
        if wkey is not None and "weight" not in changed_leaves and len(shape(wkey)) == 2:
            lora_done = self._extract_weight(module, wkey, kind, selected, changed_leaves)
        if self.progress is not None:
            self.progress(sum(_nbytes(self.finetuned.store.entry(k)) for k in leaves.values()), module)
        if changed_leaves:
            self._report_changed(module, leaves, changed_leaves, kind, module_is_new,
                                 unselected=is_linear and not selected, lora_done=lora_done)
            deselected = is_linear and not selected and not layout.is_head(module)
            if self.modules_to_save and not deselected:
                self.save_whole(module, leaves)
                if layout.is_head(module):
                    self.head_roots.add(module.split(".")[0])

    def _selected(self, module: str) -> bool:
        from loratool.formats.peft import target_matches

        targets = self.targets
        return (targets == "all-linear" and not self.layout.is_head(module)) or (targets != "all-linear" and target_matches(targets, module))

    def _compare_leaves(self, leaves: dict[str, str]) -> tuple[dict[str, str], bool]:
        """({leaf: "new"|"shape"|"changed"}, whether the module is new); 2-D weights are compared later."""
        base, ft_store = self.base, self.finetuned.store
        changed_leaves: dict[str, str] = {}
        module_is_new = False
        for leaf, key in leaves.items():
            ft_shape = tuple(ft_store.shape(key))
            base_key = base.tensor_name(key)
            if base_key is None:
                changed_leaves[leaf] = "new"
                module_is_new = True
                continue
            if tuple(base.store.shape(base_key)) != ft_shape:
                changed_leaves[leaf] = "shape"
                continue
            if leaf == "weight" and len(ft_shape) == 2:
                continue  # compared in _extract_weight, only once
            if not _same(ft_store.get(key), base.store.get(base_key)):
                changed_leaves[leaf] = "changed"
            else:
                self.unchanged += 1
        return changed_leaves, module_is_new

    def _extract_weight(self, module: str, wkey: str, kind: str, selected: bool, changed_leaves: dict[str, str]) -> bool:
        """Factor a changed, selected 2-D weight's difference into a LoRA; True when one was extracted.

        A changed weight that is not selected is marked in ``changed_leaves`` instead.
        """
        ft_w = self.finetuned.store.get(wkey)
        base_w = self.base.store.get(self.base.tensor_name(wkey))
        if _same(ft_w, base_w):
            self.unchanged += 1
            return False
        if not selected:
            changed_leaves["weight"] = "changed"
            return False
        self.ft_dtypes[ft_w.dtype] += 1
        mod_dtype = self.dtype or (ft_w.dtype if ft_w.dtype.is_floating_point else torch.float32)
        work = torch.float64 if torch.float64 in (ft_w.dtype, base_w.dtype) else torch.float32
        D = ft_w.to(work) - base_w.to(work)
        del ft_w, base_w
        if kind == "conv1d":
            D = D.T  # Conv1D stores (in, out)
        self.lora_modules[module], row = _extract_module(module, D, kind, dtype=mod_dtype, **self.svd_args)
        self.rows.append(row)
        return True

    def _report_changed(self, module: str, leaves: dict[str, str], changed_leaves: dict[str, str], kind: str,
                        module_is_new: bool, *, unselected: bool, lora_done: bool) -> None:
        """Add the changed tensors the LoRA does not represent to ``other``, each with what it is."""
        head = self.layout.is_head(module)
        what = _describe_kind(kind, head, module_is_new)
        for leaf, how in changed_leaves.items():
            if lora_done and leaf == "bias":
                what_leaf = "bias"
            elif leaf == "weight" and unselected and how == "changed":
                what_leaf = "head" if head else "unselected linear"
            else:
                what_leaf = what if leaf == "weight" else (what if what in ("norm", "embedding", "new") else leaf)
            self.other.append({"tensor": f"{module}.{leaf}", "kind": what_leaf, "change": how,
                               "shape": list(self.finetuned.store.shape(leaves[leaf]))})

    def save_whole(self, module: str, leaves: dict[str, str]) -> None:
        """Store a module's tensors as modules_to_save, dropping any LoRA extracted for it."""
        self.lora_modules.pop(module, None)
        self.rows[:] = [r for r in self.rows if r["name"] != module]
        for leaf, key in leaves.items():
            self.saved[f"{module}.{leaf}"] = self.finetuned.store.lazy(key)

    def save_heads(self, groups: dict[str, dict[str, str]]) -> None:
        """Save every module under each head root whole (PEFT's task types add e.g. "classifier" to modules_to_save)."""
        for root in sorted(self.head_roots):
            for module, leaves in groups.items():
                if module == root or module.startswith(root + "."):
                    self.save_whole(module, leaves)


def _extract_warnings(layout: ModelLayout, other: list[dict[str, Any]], modules_to_save: bool) -> list[str]:
    warnings = []
    if layout.guessed:
        warnings.append("the model class could not be built on the meta device; module kinds were guessed from names")
    deselected_n = sum(o["kind"] == "unselected linear" for o in other)
    rest = [o for o in other if o["kind"] != "unselected linear"]
    if deselected_n:
        warnings.append(f"{deselected_n} changed linear modules are not represented by the adapter (not selected by --modules)")
    if rest and not modules_to_save:
        warnings.append(
            f"{len(rest)} changed tensors are not represented by the adapter "
            f"({', '.join(sorted({o['kind'] for o in rest}))}); --modules-to-save keeps their modules whole"
        )
    return warnings


def extract(base: BaseModel, finetuned: BaseModel, *, rank: int | None = None, energy: float | None = None,
            modules: Sequence[str] | str | None = None, alpha: float | None = None, dtype: torch.dtype | None = None,
            modules_to_save: bool = False, exact: bool | None = None, niter: int = 4, seed: int = 0,
            base_name: str | None = None,
            progress: Callable[[int, str], None] | None = None) -> tuple[Adapter, dict[str, Any]]:
    """A LoRA adapter approximating ``FINETUNED - BASE`` on every changed linear module.

    Streams tensor pairs one at a time. Each changed linear (or GPT-2 Conv1D) weight difference is
    factored by a truncated SVD: exact for small matrices, randomized with power iterations
    (``torch.svd_lowrank``) for big ones. Unchanged tensors are skipped. Changed tensors that are
    not linear modules (embeddings, norms, heads, biases, new tensors) are reported, or with
    ``modules_to_save`` stored whole as PEFT modules_to_save.

    Args:
        rank: the rank of every module (capped by its smaller dimension).
        energy: per module, the smallest rank keeping this fraction of ``||dW||_F^2``.
        modules: PEFT target_modules (names or suffixes, a regex string, or "all-linear", the
            default: every linear module outside the heads).
        alpha: lora_alpha of every module (default: each module's rank, i.e. scale 1).
        dtype: storage dtype of the factors (default: FINETUNED's).
        exact: force (True) or forbid (False) the exact SVD (default: exact up to 1024 on the smaller side).
        niter: power iterations of the randomized SVD.
        base_name: base_model_name_or_path to record (default: BASE's path).
        progress: called with (bytes read, tensor name) as tensors are processed.
    Returns:
        (adapter, report).
    Raises:
        InputError: bad rule, different architectures, nothing changed.
    """
    _check_extract_args(base, finetuned, rank=rank, energy=energy, alpha=alpha, niter=niter)
    layout = ModelLayout(base)
    run = _Extraction(base, finetuned, layout, _extract_targets(modules), dtype=dtype, modules_to_save=modules_to_save,
                      progress=progress, svd_args=dict(rank=rank, energy=energy, alpha=alpha, exact=exact, niter=niter, seed=seed))
    groups = _group_by_module(finetuned, layout)
    for module, leaves in groups.items():
        run.add_module(module, leaves)
    run.save_heads(groups)
    if not run.lora_modules and not run.saved:
        hint = f" ({len(run.other)} changed tensors are not selected linear modules; see --modules-to-save)" if run.other else ""
        raise InputError(f"FINETUNED equals BASE on every selected linear module: nothing to extract{hint}")
    arch = (base.architectures or [None])[0]
    out_dtype = dtype or (run.ft_dtypes.most_common(1)[0][0] if run.ft_dtypes else torch.float32)
    task_type = _task_type(arch)
    if task_type in _HEAD_TASKS and not run.head_roots:
        task_type = None  # PEFT would demand the task head in modules_to_save
    adapter = Adapter(
        format="peft",
        modules=run.lora_modules,
        modules_to_save=run.saved,
        base_model=base_name if base_name is not None else str(base.path),
        target_modules=None,
        task_type=task_type,
        config={"modules_to_save": sorted(run.head_roots)} if run.head_roots else {},
        warnings=[],
    )
    report = {
        "operation": "extract",
        "base": str(base.path),
        "finetuned": str(finetuned.path),
        "criterion": {"rank": rank} if rank is not None else {"energy": energy},
        "dtype": _dtype_name(out_dtype if dtype is None else dtype),
        "modules": run.rows,
        "unchanged_tensors": run.unchanged,
        "other_changed": run.other,
        "modules_to_save": sorted(run.saved),
        "rank_histogram": _histogram(r["rank"] for r in run.rows),
        "lora_params": adapter.lora_params,
        "warnings": _extract_warnings(layout, run.other, modules_to_save),
    }
    return adapter, report


def _nbytes(entry) -> int:
    return math.prod(entry.shape) * entry.dtype.itemsize


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.double(), b.double())


def _describe_kind(kind: str, head: bool, new: bool) -> str:
    if new:
        return "new"
    if head:
        return "head"
    return kind


def _extract_module(name: str, D: torch.Tensor, kind: str, *, rank, energy, alpha, dtype, exact, niter, seed) -> tuple[LoraModule, dict]:
    out_f, in_f = D.shape
    mn = min(out_f, in_f)
    want = min(rank, mn) if rank is not None else None
    svd = dense_svd(D, rank=want, energy=energy, exact=exact, niter=niter, seed=seed)
    method = "exact" if svd.rank == mn else "randomized"
    k = want if want is not None else choose_rank(svd, energy=energy)
    k = min(k, svd.rank)
    m_alpha = float(alpha) if alpha is not None else float(k)
    scale = lora_scale(m_alpha, k, rslora=False)
    A, B = factors_from_svd(svd, k, scale, dtype=dtype)
    if method == "exact":
        rel = svd.relative_error(k)
    else:
        # measured directly: 1 - kept energy loses all digits when the error is tiny
        approx = factor_product(A, B, scale, dtype=torch.float64)
        rel = float(torch.linalg.matrix_norm(D.double() - approx)) / math.sqrt(svd.total) if svd.total > 0 else 0.0
    module = LoraModule(name, ModuleKind.CONV1D if kind == "conv1d" else ModuleKind.LINEAR,
                        LazyTensor.of(A), LazyTensor.of(B), alpha=m_alpha, scale=scale)
    row = {"name": name, "shape": [out_f, in_f], "rank": k, "kept_energy": svd.kept_energy(k),
           "relative_error": rel, "method": method}
    return module, row
