"""What both output checks start from and report: the opened inputs, the task, the inputs to run,
and the report's keys (``outputs.verify_outputs_whole`` through PEFT, ``layered`` layer by layer,
``qalora_outputs`` for a GPTQ base, ``serving.fix`` measuring a fix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from loratool.adapter import Adapter
from loratool.base import _BUFFER_SUFFIXES, BaseModel
from loratool.engine.codecs import bnb
from loratool.errors import InputError
from loratool.verify._common import (
    _dtype_name,
    _norm,
    _num,
    _open_adapter,
    _open_model,
    _ratio,
)

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
