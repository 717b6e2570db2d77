"""``check --fix``: the nearest adapter a serving engine accepts, and what each change costs.

The steps run in a fixed order, each only where ``check`` found its rule: refuse what cannot be
fixed (``loratool merge`` is the alternative), rename prefixed modules, drop saved copies
identical to the base, turn DoRA into plain LoRA (the truncated SVD of DoRA's effective delta),
truncate ranks above the engine's limit (``surgery.rerank``), bake scales into one lora_alpha
(padding to one rank where the engine needs it). Lossy steps report, per module, the relative
error ``||dW_new - dW||_F / ||dW||_F`` of the delta the engine will apply.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import torch

from loratool.adapter import Adapter, LoraModule, lora_scale
from loratool.errors import InputError, UnsupportedError
from loratool.io.store import LazyTensor
from loratool.serving import rules as R
from loratool.serving.check import (
    MERGE_HINT,
    Finding,
    findings,
    get_engine,
    rank_limit,
    served_name,
)


def fix_adapter(adapter: Adapter, *, target: str, base=None, max_rank: int | None = None,
                rank: int | None = None) -> tuple[Adapter, dict[str, Any]]:
    """The nearest adapter ``target`` accepts.

    Args:
        adapter: the adapter (any format).
        target: the engine (vllm, sglang, llama.cpp, mlx-lm).
        base: the base model (``BaseModel``); needed for DoRA, saved copies, tied heads.
        max_rank: the engine's rank limit (default: its own default).
        rank: the rank DoRA modules become (default: each module's rank, capped by the limit).
    Returns:
        (adapter, report): write the adapter in ``report["format"]``; ``report["changes"]`` lists
        per module what changed and its relative error.
    Raises:
        UnsupportedError: something the engine refuses that no change of the adapter fixes.
        InputError: DoRA without a base, a bad rank.
    """
    _, fixed, report = _fix(adapter, target=target, base=base, max_rank=max_rank, rank=rank)
    return fixed, report


def _fix(adapter: Adapter, *, target: str, base, max_rank: int | None, rank: int | None) -> tuple[Adapter, Adapter, dict[str, Any]]:
    """(the adapter after the lossless renaming and dropping: what the fix is measured against; the fixed
    adapter; the report)."""
    engine = get_engine(target)
    limit = rank_limit(engine, max_rank)
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise InputError(f"--rank must be a positive integer, got {rank}")
    found, _ = findings(adapter, engine, base=base, limit=limit)
    _refuse_unfixable(found, engine)
    steps = {f.rule.fix for f in found if f.rule.effect != "note"}
    changes: list[dict[str, Any]] = []
    if adapter.format != engine.writes:
        changes.append({"module": "(adapter)", "change": f"{adapter.format} written as {engine.writes}", "relative_error": 0.0})
    out = adapter
    if R.RENAME in steps:
        out = _renamed(out, base, changes)
    if R.DROP_COPIES in steps:
        out = _without_copies(out, base, engine, changes)
    reference = out
    if R.DORA in steps:
        out = _dora_to_lora(out, base, rank=rank, limit=limit, changes=changes)
    if limit is not None and any(m.rank > limit for m in out):
        out = _truncated(out, limit, changes)
    steps = {f.rule.fix for f in findings(out, engine, base=base, limit=limit)[0]}  # ranks may differ now
    if steps & {R.BAKE_SCALE, R.PAD_RANK}:
        out = _baked(out, pad=R.PAD_RANK in steps, changes=changes)
    report = {
        "target": engine.name, "engine": engine.version, "format": engine.writes, "max_rank": limit,
        "changes": changes, "max_relative_error": max([c["relative_error"] for c in changes] or [0.0]),
    }
    return reference, out, report


def _refuse_unfixable(found: list[Finding], engine) -> None:
    bad = [f for f in found if f.rule.effect != "note" and (f.rule.fix is None or not f.fixable)]
    if not bad:
        return
    f = bad[0]
    more = f" (and {len(f.modules) - 1} more)" if len(f.modules) > 1 else ""
    raise UnsupportedError(f"{f.modules[0]}{more}: {f.what}: {f.rule.effect} by {engine.name} ({f.rule.why}); "
                           f"cannot be fixed in the adapter: {MERGE_HINT}")


def _renamed(adapter: Adapter, base, changes: list) -> Adapter:
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        new = served_name(name, base) or name
        if new in modules:
            raise InputError(f"{name}: renaming it to {new} collides with another module of the adapter")
        modules[new] = replace(m, name=new)
        if new != name:
            changes.append({"module": name, "change": f"renamed to {new}", "relative_error": 0.0})
    return adapter.replace_modules(modules)


def _without_copies(adapter: Adapter, base, engine, changes: list) -> Adapter:
    from loratool.conversion import drop_identical_copies

    names = sorted(adapter.saved_copies)
    out = drop_identical_copies(adapter, base, holder=engine.name)
    changes.extend({"module": n, "change": "saved copy dropped (bit-identical to the base)", "relative_error": 0.0} for n in names)
    return out


def _truncated(adapter: Adapter, limit: int, changes: list) -> Adapter:
    from loratool.surgery import rerank

    out, report = rerank(adapter, rank=limit)
    for row in report["modules"]:
        if row["action"] == "truncated":
            changes.append({"module": row["name"], "change": f"rank {row['rank_before']} truncated to {row['rank']}",
                            "relative_error": row["relative_error"]})
    return out.replace_modules(out.modules, warnings=[])


def dora_effective_delta(module: LoraModule, W: torch.Tensor) -> torch.Tensor:
    """DoRA's effective delta m / ||W + dW|| * (W + dW) - W in (out, in), float32 (``engine.delta.dora_merged``)."""
    from loratool.engine.delta import dora_merged

    merged = dora_merged(W, module)  # stored layout, float32
    D = merged - W.to(torch.float32)  # stored layout
    return D.T if module.kind.transposed else D  # (out, in)


def _dora_to_lora(adapter: Adapter, base, *, rank: int | None, limit: int | None, changes: list) -> Adapter:
    if base is None or not len(base.store):
        raise InputError("turning DoRA into LoRA needs the base model's weights: give --base")
    from loratool.base import bind_adapter
    from loratool.ops.lowrank import dense_svd, factors_from_svd

    binding = bind_adapter(adapter, base)
    modules: dict[str, LoraModule] = {}
    for name, m in binding.adapter.modules.items():
        if m.magnitude is None:
            modules[name] = adapter.modules[name]
            continue
        D = dora_effective_delta(m, base.store.get(binding.keys[name]))  # (out, in)
        k = min(x for x in (rank or m.rank, limit, min(D.shape)) if x is not None)
        svd = dense_svd(D.double(), rank=k, exact=True)
        scale = lora_scale(m.alpha, k, rslora=adapter.use_rslora) if m.alpha else 1.0
        A, B = factors_from_svd(svd, k, scale, dtype=m.B.dtype)  # (k, in), (out, k)
        new = replace(m.with_factors(A, B, scale=scale), magnitude=None, kind=adapter.modules[name].kind)
        modules[name] = new
        changes.append({"module": name, "change": f"DoRA (rank {m.rank}) truncated to LoRA rank {k}",
                        "relative_error": svd.relative_error(k)})
    return adapter.replace_modules(modules, use_dora=False, variant="lora")


def _baked(adapter: Adapter, *, pad: bool, changes: list) -> Adapter:
    """Every module at one lora_alpha (and, with ``pad``, one rank), its scale baked into B: exact."""
    from loratool.ops.lowrank import pad_factors, rescale_factors

    mods = list(adapter.modules.values())
    top = max((m.rank for m in mods), default=1)
    alpha = Counter(m.alpha for m in mods).most_common(1)[0][0] if mods else 1.0
    alpha = alpha if alpha and math.isfinite(alpha) else float(top)
    modules: dict[str, LoraModule] = {}
    for m in mods:
        k = top if pad else m.rank
        new_scale = lora_scale(alpha, k, rslora=False)
        factor = m.scale / new_scale
        A, B = rescale_factors(m.A.load(), m.B.load(), factor, dtype=m.B.dtype)  # (r, in), (out, r)
        A, B = pad_factors(A, B, k) if k > m.rank else (A, B)  # (k, in), (out, k)
        bias = None if m.bias is None else LazyTensor.of(m.bias.load() * factor)
        modules[m.name] = replace(m.with_factors(A, B, alpha=alpha, scale=new_scale), bias=bias)
        if factor != 1.0 or k != m.rank:
            what = f"scale {m.scale:g} baked into lora_B (lora_alpha {alpha:g})" + (f", padded to rank {k}" if k != m.rank else "")
            changes.append({"module": m.name, "change": what, "relative_error": 0.0})
    return adapter.replace_modules(modules, use_rslora=False)


def output_error(reference: Adapter, fixed: Adapter, base, *, input_ids: Any = None) -> dict[str, Any]:
    """What a fix costs on the model's outputs: BASE + ``fixed`` against BASE + ``reference``, both unmerged
    (the layer-streamed engine of ``verify --outputs``), on the same inputs.

    For a causal LM the outputs compared are log-probabilities (what an engine serves), otherwise the
    outputs themselves; ``relative`` is ||y_fixed - y_ref||_F / ||y_ref - y_base||_F, the share of the
    adapter's effect on the outputs that the fix changes.
    """
    from loratool.verify.layered import adapter_outputs

    task, plain, (want, got) = adapter_outputs(base, [reference, fixed], input_ids=input_ids)
    effect_sq = diff_sq = largest = 0.0
    for i in range(0, want.shape[0], 16):  # 16 tokens at a time: a (16, vocab) float64 block, not the whole vocabulary's
        p, w, g = (y[i:i + 16].double() for y in (plain, want, got))  # (16, width)
        if task == "causal":
            p, w, g = (torch.log_softmax(y, -1) for y in (p, w, g))
        effect_sq += float((w - p).square().sum())
        diff_sq += float((g - w).square().sum())
        largest = max(largest, float((g - w).abs().max()) if g.numel() else 0.0)
    return {
        "relative": math.sqrt(diff_sq / effect_sq) if effect_sq > 0 else None,
        "max_abs": largest,
        "on": "log-probabilities" if task == "causal" else "outputs",
        "tokens": int(want.shape[0]),
        "inputs": "random token ids (seed 0)" if input_ids is None else "the token ids given",
    }


def write_fixed(adapter: Adapter, out, *, target: str, base=None, max_rank: int | None = None, rank: int | None = None,
                force: bool = False, inputs=(), outputs: bool = True, input_ids: Any = None) -> dict[str, Any]:
    """``fix_adapter``, written atomically to ``out`` in the engine's format, read back and checked.

    With a base whose architecture transformers builds, a lossy fix (``max_relative_error`` > 0) is also
    measured on the outputs (``output_error``; ``outputs=False`` skips it, ``input_ids`` chooses the inputs)
    before anything is written.

    Returns:
        The fix report with ``output``, ``check`` (the check of the written adapter) and ``output_error``
        (None when not measured; ``notes`` says why).
    Raises:
        As ``fix_adapter``; OutputExistsError.
    """
    from loratool.conversion import read_back
    from loratool.formats import write_adapter
    from loratool.serving.check import check_adapter

    reference, fixed, report = _fix(adapter, target=target, base=base, max_rank=max_rank, rank=rank)
    report["output_error"], report["notes"] = None, []
    if report["max_relative_error"] > 0 and outputs:
        _measure_outputs(report, reference, fixed, base, input_ids)
    write_adapter(fixed, out, format=report["format"], force=force, inputs=inputs, base=base)
    report["output"] = str(out)
    report["check"] = check_adapter(read_back(out, report["format"], base=base), target=target, base=base, max_rank=max_rank)
    return report


def _measure_outputs(report: dict[str, Any], reference: Adapter, fixed: Adapter, base, input_ids: Any) -> None:
    if base is None or not len(base.store):
        report["notes"].append("the output error is measured with --base (the weight-level errors are above)")
        return
    try:
        report["output_error"] = output_error(reference, fixed, base, input_ids=input_ids)
    except InputError as exc:  # (UnsupportedError too) an architecture transformers cannot build here: the weights' errors stand
        report["notes"].append(f"the output error was not measured: {exc}")
