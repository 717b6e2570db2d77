"""The output check: the unmerged base + adapter and MERGED on the same inputs.

``verify_outputs`` streams both layer by layer (``layered``); ``verify_outputs_whole`` is the
whole-model path through PEFT, kept as the reference the tests and benchmarks compare with.
"""

from __future__ import annotations

import contextlib
import gc
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter
from loratool.base import _BUFFER_SUFFIXES, BaseModel, bind_adapter
from loratool.engine.codecs import bnb
from loratool.engine.codecs.bnb import import_bitsandbytes
from loratool.errors import InputError
from loratool.verify._common import (
    U32,
    Progress,
    _dtype_name,
    _norm,
    _num,
    _open_adapter,
    _open_model,
    _ratio,
)

# ----------------------------------------------------------------------------- the output check


MAX_SAMPLES = 4096  # random sequences an output check runs (each through both models)
MAX_SEQ_LEN = 1 << 16


def _task(architectures: list[str]) -> tuple[str, Any]:
    """("causal" | "seqcls" | "base", the transformers Auto class) from config.architectures."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    causal = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    seqcls = set(ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())
    for arch in architectures:
        if arch in causal or arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal", transformers.AutoModelForCausalLM
        if arch in seqcls or arch.endswith("ForSequenceClassification"):
            return "seqcls", transformers.AutoModelForSequenceClassification
    return "base", transformers.AutoModel


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


def _inputs(base: BaseModel, prompts: list[str] | None, samples: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    cfg = base.config
    if prompts:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(base.path))
        except Exception as exc:
            raise InputError(f"{base.path}: --prompt needs the base's tokenizer, which cannot be loaded ({type(exc).__name__})") from None
        out = []
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc.get("attention_mask", torch.ones_like(enc["input_ids"]))})
        return out
    vocab = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise InputError(f"{base.path}: config.json has no vocab_size; pass --prompt")
    limit = cfg.get("max_position_embeddings") or cfg.get("n_positions") or seq_len
    if cfg.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # positions start after the padding index
    n = max(1, min(seq_len, int(limit)))
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, vocab, (1, n), generator=gen)), "attention_mask": torch.ones_like(ids)} for _ in range(samples)]


@torch.no_grad()
def _run(model, inputs, task: str, device) -> torch.Tensor:
    outs = []
    for batch in inputs:
        batch = {k: v.to(device) for k, v in batch.items()}
        res = model(**batch)
        y = res.last_hidden_state if task == "base" else res.logits
        outs.append(y.float().reshape(-1, y.shape[-1]).cpu())
    return torch.cat(outs)


def _compare(ref: torch.Tensor, got: torch.Tensor, task: str) -> dict[str, Any]:
    diff = (got - ref).abs()
    rel = _ratio(_norm(got - ref), _norm(ref))
    d: dict[str, Any] = {
        "max_abs_diff": _num(float(diff.max())) if diff.numel() else 0.0,
        "mean_abs_diff": _num(float(diff.mean())) if diff.numel() else 0.0,
        "relative_diff": _num(rel),
        "kl_divergence": None,
        "top1_agreement": None,
    }
    if task != "base":
        lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
        d["kl_divergence"] = _num(float((lp.exp() * (lp - lq)).sum(-1).mean()))
        d["top1_agreement"] = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
    return d


def _main_float_dtype(model: BaseModel) -> torch.dtype:
    sizes: dict[torch.dtype, int] = {}
    for e in model.store.entries():
        if e.dtype.is_floating_point and not e.name.endswith(_BUFFER_SUFFIXES):
            sizes[e.dtype] = sizes.get(e.dtype, 0) + int(math.prod(e.shape))
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _is_quantized(model: BaseModel) -> bool:
    q = model.config.get("quantization_config")
    return bool(q) or any(bnb.is_quantized_aux_key(k) for k in model.store.keys())


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


@dataclass
class _Context:
    """What both output checks start from: the opened inputs, the task, the inputs to run."""

    base: BaseModel
    merged: BaseModel
    adapter: Adapter
    targets: Any  # weights._Targets: what the adapter does to each base tensor
    task: str
    auto: Any
    inputs: list
    prompts: bool
    quantized: bool
    merged_dtype: torch.dtype
    roundings: int
    notes: list
    combine: Any = None  # engine.combine.CombineSpec: several adapters merged together
    adapters: list | None = None  # their paths


def _check_options(tolerance: float | None, samples: int, seq_len: int) -> None:
    if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
        raise InputError(f"tolerance must be a non-negative number, got {tolerance}")
    if not 1 <= samples <= MAX_SAMPLES or not 1 <= seq_len <= MAX_SEQ_LEN:
        raise InputError(f"samples must be 1 to {MAX_SAMPLES} and seq_len 1 to {MAX_SEQ_LEN}, got {samples} and {seq_len}")


def _setup(base, adapter, merged, prompts, samples: int, seq_len: int, seed: int, combine=None) -> _Context:
    """Open the three inputs, bind the adapter(s) (a clear error before any model is built), make the inputs.

    ``adapter`` may be a list of adapters merged together as ``combine`` says (``engine.combine``)."""
    base_m, merged_m = _open_model(base), _open_model(merged)
    notes: list[str] = []
    base_m, ad, targets, spec, paths = _bind(base_m, adapter, combine, notes)
    task, auto = _task(merged_m.architectures or base_m.architectures)
    inputs = _inputs(base_m, prompts, samples, seq_len, seed)
    # a correct merge may round each weight more than once on its way to the merged dtype (the
    # delta, then W + dW; DoRA also the row norm, the m / norm factor and the product)
    roundings = 4 if any(m.magnitude is not None for m in ad.modules.values()) else 2
    return _Context(base_m, merged_m, ad, targets, task, auto, inputs, bool(prompts), _is_quantized(merged_m),
                    _main_float_dtype(merged_m), roundings, notes, spec, paths)


def _bind(base_m: BaseModel, adapter, combine, notes: list[str]):
    """(base, adapter, weights._Targets, and when several adapters are combined: the spec, their paths)."""
    from loratool.engine.combine import CombineSpec
    from loratool.verify.weights import _dequantized_view, _Targets

    if combine is None and not isinstance(adapter, (list, tuple)):
        ad = _open_adapter(adapter)
        targets = _Targets.of(ad, base_m)
        return _dequantized_view(base_m, ad, notes), ad, targets, None, None
    ads = [_open_adapter(a) for a in (adapter if isinstance(adapter, (list, tuple)) else [adapter])]
    spec = combine or CombineSpec.checked(len(ads))
    targets = _Targets.of_combination(ads, base_m, spec)
    notes += [w for a in ads for w in a.warnings]
    return base_m, targets.adapter, targets, spec, [str(a.path) if a.path else None for a in ads]


def _report(ctx: _Context, ref: torch.Tensor, got: torch.Tensor, *, floor32: float, floor_d: float, allowed: float | None,
            tolerance: float | None, judged: bool) -> dict[str, Any]:
    """The output report both checks give (the keys existing users read)."""
    metrics = _compare(ref, got, ctx.task)
    rel = metrics["relative_diff"]
    passed = (rel is not None and allowed is not None and rel <= allowed) if judged else None
    return {
        "check": "outputs",
        "passed": passed if passed is not None else True,
        "judged": judged,
        "task": ctx.task,
        "base": str(ctx.base.path),
        "adapter": str(ctx.adapter.path) if ctx.adapter.path else None,
        **({"adapters": ctx.adapters, "combine": _spec_dict(ctx.combine)} if ctx.combine is not None else {}),
        "merged": str(ctx.merged.path),
        "merged_dtype": "quantized" if ctx.quantized else _dtype_name(ctx.merged_dtype),
        "samples": len(ctx.inputs),
        "tokens": int(sum(b["input_ids"].numel() for b in ctx.inputs)),
        "inputs": "prompts" if ctx.prompts else "random token ids",
        **metrics,
        "allowed_relative_diff": _num(allowed) if allowed is not None else None,
        "tolerance": tolerance,
        "floor_float32": _num(floor32),
        "floor_merged_dtype": _num(floor_d),
        "roundings": ctx.roundings,
        "notes": list(ctx.notes) + (["quantized merged model: outputs are reported, not judged (give --tolerance to judge them)"] if not judged else []),
    }


def _spec_dict(spec) -> dict[str, Any]:
    return {"method": spec.method, "weights": list(spec.weights), "density": spec.density,
            "majority_sign": spec.majority_sign, "seed": spec.seed}


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
    from loratool.verify.layered import verify_outputs_layered

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
