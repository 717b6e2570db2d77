"""The output check: the unmerged base + adapter and MERGED on the same inputs.

``verify_outputs`` streams both layer by layer (``layered``); ``verify_outputs_whole`` is the
whole-model path through PEFT, kept as the reference the tests and benchmarks compare with.
"""

from __future__ import annotations

import contextlib
import gc
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter
from loratool.base import BaseModel, bind_adapter
from loratool.engine.codecs.bnb import import_bitsandbytes
from loratool.errors import InputError
from loratool.verify._common import (
    U32,
    Progress,
    _norm,
    _ratio,
)
from loratool.verify._context import (
    _check_options,
    _Context,
    _report,
    _setup,
)
from loratool.verify.layered import verify_outputs_layered

# ----------------------------------------------------------------------------- the output check


@contextlib.contextmanager
def _peft_folder(ad: Adapter, base: BaseModel):
    """A folder PEFT can load: the adapter's own when it is PEFT, else a converted copy."""
    if ad.format == "peft" and ad.files:
        yield Path(ad.files[0]).parent  # the folder of the adapter_config.json read (sub-adapters too)
        return
    import dataclasses

    from loratool.formats import write_adapter

    binding = bind_adapter(ad, base)
    ad, mapping = binding.adapter, binding.keys
    modules = {}
    for name, mod in ad.modules.items():
        # PEFT finds modules by the model's names: use the base's where the adapter's differ (a wrapper prefix)
        own = mapping[name][: -len(".weight")]
        modules[own] = mod if own == name else dataclasses.replace(mod, name=own)
    with tempfile.TemporaryDirectory(prefix="loratool-verify-") as tmp:
        out = Path(tmp) / "adapter"
        write_adapter(ad.replace_modules(modules, extras={}), out, format="peft")
        yield out


@torch.no_grad()
def _run(model, inputs, task: str, device) -> torch.Tensor:
    outs = []
    for batch in inputs:
        batch = {k: v.to(device) for k, v in batch.items()}
        res = model(**batch)
        y = res.last_hidden_state if task == "base" else res.logits
        outs.append(y.float().reshape(-1, y.shape[-1]).cpu())
    return torch.cat(outs)


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bars from transformers while the models load."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def verify_outputs(
    base: BaseModel | str | Path,
    adapter: Adapter | str | Path,
    merged: BaseModel | str | Path,
    *,
    prompts: list[str] | None = None,
    samples: int = 4,
    seq_len: int = 32,
    tolerance: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_memory: int | None = None,
    progress: Progress | None = None,
    combine: Any = None,
) -> dict[str, Any]:
    """Run BASE + ADAPTER (unmerged) and MERGED on the same inputs and compare them, layer by layer.

    Both run the model's own transformers implementation in float32, streamed one layer at a time
    (``loratool.verify.layered``): only one layer's weights are resident, the adapter is applied on
    the fly (PEFT is not needed), and the hidden states are compared after the embeddings, after
    every layer and at the output. The noise floor is measured, not guessed: the same merge in
    float32 and rounded to MERGED's dtypes runs alongside, and each stage passes when its relative
    difference is within as many floors as a correct merge may round each weight (2 for LoRA: the
    delta and W + dW; 4 for DoRA), plus float32 rounding. The first stage over its bound is named.

    Args:
        base, adapter, merged: as for ``verify_weights``.
        prompts: texts to encode with the base's tokenizer; random token ids when None.
        samples: how many random sequences (without ``prompts``).
        seq_len: tokens per random sequence (capped by the model's positions).
        tolerance: a fixed limit on the relative difference instead of the measured one.
        device: where to run the models.
        seed: for the random token ids.
        max_memory: bytes the check may hold at once; refused up front when one layer needs more.
        progress: called as ``progress(1, stage)`` after each stage.
        combine: ``adapter`` is a list of adapters merged together as this ``CombineSpec`` says; the
            unmerged side applies their combined delta D of each weight (the same DARE masks) as x D^T.
    Returns:
        A JSON-ready report: ``passed``, ``task``, the metrics (``max_abs_diff``, ``mean_abs_diff``,
        ``relative_diff``, ``kl_divergence``, ``top1_agreement``), ``allowed_relative_diff``, the
        floors, ``layers`` (per stage) and ``first_divergent_layer`` / ``first_divergent``.
    Raises:
        InputError: unreadable inputs, an architecture transformers cannot build, ``prompts`` without
            a tokenizer, ``max_memory`` below what one layer needs.
    """
    return verify_outputs_layered(base, adapter, merged, prompts=prompts, samples=samples, seq_len=seq_len, tolerance=tolerance,
                                  device=device, seed=seed, max_memory=max_memory, progress=progress, combine=combine)


def verify_outputs_whole(
    base: BaseModel | str | Path,
    adapter: Adapter | str | Path,
    merged: BaseModel | str | Path,
    *,
    prompts: list[str] | None = None,
    samples: int = 4,
    seq_len: int = 32,
    tolerance: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The whole-model output check (needs PEFT and both models in memory, float32): BASE with the
    adapter through ``PeftModel``, PEFT's own merge for the floors, and MERGED through transformers.

    Kept as the reference the layer-streamed check is measured against (tests, bench/); same
    arguments and report keys as ``verify_outputs`` (without ``layers``).
    """
    _check_options(tolerance, samples, seq_len)
    ctx = _setup(base, adapter, merged, prompts, samples, seq_len, seed)
    device = torch.device(device)
    step = progress or (lambda *a, **k: None)
    ref, floor32, floor_d = _peft_runs(ctx, device, step)
    got = _merged_run(ctx, device)
    step(1, "merged")
    if got.shape != ref.shape:
        raise InputError(f"{ctx.merged.path}: outputs have shape {tuple(got.shape)}, the base + adapter gives {tuple(ref.shape)}")
    allowed = tolerance if tolerance is not None else ctx.roundings * floor_d + 2 * floor32 + 2 * U32 * math.sqrt(ref.shape[-1])
    judged = tolerance is not None or not ctx.quantized
    report = _report(ctx, ref, got, floor32=floor32, floor_d=floor_d, allowed=allowed, tolerance=tolerance, judged=judged)
    report["method"] = "whole-model"
    return report


def _peft_runs(ctx: _Context, device, step) -> tuple[torch.Tensor, float, float]:
    """PEFT's unmerged outputs, and the floors of its own merge (float32, then rounded to MERGED's dtype)."""
    from peft import PeftModel

    with _peft_folder(ctx.adapter, ctx.base) as folder, _quiet_transformers():
        model = ctx.auto.from_pretrained(str(ctx.base.path), dtype=torch.float32).to(device).eval()
        pm = PeftModel.from_pretrained(model, str(folder)).eval()
        ref = _run(pm, ctx.inputs, ctx.task, device)
        step(1, "base + adapter (PEFT)")
        merged_mem = pm.merge_and_unload().eval()
        floor32 = _ratio(_norm(_run(merged_mem, ctx.inputs, ctx.task, device) - ref), _norm(ref))
        floor_d = floor32
        if not ctx.quantized and torch.finfo(ctx.merged_dtype).eps > torch.finfo(torch.float32).eps:
            with torch.no_grad():
                for p in merged_mem.parameters():
                    if p.dtype.is_floating_point:
                        p.copy_(p.to(ctx.merged_dtype).to(p.dtype))
            floor_d = _ratio(_norm(_run(merged_mem, ctx.inputs, ctx.task, device) - ref), _norm(ref))
        step(1, "PEFT's merge (noise floor)")
        del model, pm, merged_mem
        gc.collect()
    return ref, floor32, floor_d


def _merged_run(ctx: _Context, device) -> torch.Tensor:
    kwargs: dict[str, Any] = {"device_map": str(device)} if ctx.quantized else {"dtype": torch.float32}
    if (ctx.merged.config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes":
        import_bitsandbytes()  # before transformers imports it: no kernel download from the Hub
    with _quiet_transformers():
        mm = ctx.auto.from_pretrained(str(ctx.merged.path), **kwargs)
    if not ctx.quantized:
        mm = mm.to(device)
    return _run(mm.eval(), ctx.inputs, ctx.task, device)
