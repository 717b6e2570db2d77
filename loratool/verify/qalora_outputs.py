"""The output check of a QA-LoRA merge into a GPTQ checkpoint (``merge --qalora``), layer-streamed.

The unmerged side is the GPTQ base, dequantized one layer at a time, with QA-LoRA's own pooled
forward added to each adapted linear (``ops.qalora.pooled_forward``: the input pooled over blocks of
Lp features, then A and B, with the adapter's pooling convention); MERGED is any of the three
``merge --qalora`` outputs:

    dense        a 16-bit model: the rounded reference is deq(W) + dW rounded to its dtype
    float-zeros  the base's codes with merged float zero points: the rounded reference is the base's
                 codes dequantized with the folded zero points z' = z - dW / s in MERGED's zeros dtype
    gptq         integer zero points: the same with z' rounded to integers and clamped to the codes'
                 range, what a correct merge into a standard GPTQ checkpoint keeps (not exact: its
                 floor is the zero-point rounding, and MERGED is judged against it)

Everything else is the layer-streamed check (``layered``): per-stage floors, the first stage over
its bound named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loratool.base import BaseModel
from loratool.engine.codecs import gptq as G
from loratool.errors import UnsupportedError
from loratool.ops import qalora as Q
from loratool.verify import _stages as S
from loratool.verify._common import Progress
from loratool.verify._context import (
    _check_options,
    _Context,
    _inputs,
    _main_float_dtype,
    _task,
)
from loratool.verify._paths import (
    F32,
    MERGE32,
    MERGED,
    ROUNDED,
    UNMERGED,
    AdapterHooks,
    Weights,
    hookable,
)
from loratool.verify.layered import _check_memory, _layered_report, _stream


class _QTargets:
    """What a QA-LoRA adapter does to the GPTQ base: a pooled delta per linear (base weight key ->
    ``qalora.ModulePlan``); modules_to_save copies as in ``weights._Targets``."""

    def __init__(self, plans: dict, to_save: dict, pending: dict):
        self.plans, self.to_save, self.save_pending = plans, to_save, pending
        self.by_key: dict = {}
        self.combined: dict = {}
        self.bias_of: dict = {}


def _layout(model: BaseModel) -> str:
    """"dense", "float-zeros" or "gptq": how a model stores its linears."""
    from loratool.qalora import FLOAT_ZEROS_METHOD, is_gptq_checkpoint

    if not is_gptq_checkpoint(model.path):
        return "dense"
    method = (model.config.get("quantization_config") or {}).get("quant_method")
    return "float-zeros" if method == FLOAT_ZEROS_METHOD else "gptq"


class QaloraWeights(Weights):
    """``Weights`` over a GPTQ base (dequantized) and a dense, float-zeros or gptq MERGED."""

    def __init__(self, sk, base: BaseModel, merged: BaseModel, targets, device: torch.device, main_dtype: torch.dtype):
        from loratool.qalora import DequantizedCheckpoint, read_quant_config

        super().__init__(sk, base, merged, targets, device, main_dtype)
        self.base_reader = DequantizedCheckpoint(base)
        self.qcfg = read_quant_config(base.path, base.config)
        self.layout = _layout(merged)
        self.merged_q = DequantizedCheckpoint(merged) if self.layout != "dense" else None
        if self.merged_q is not None:
            self.merged_reader = self.merged_q
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _key(self, model: BaseModel, name: str, *, tie: bool = True) -> str | None:
        """A quantized linear's ``<prefix>.weight`` (the dequantized view's name) when only its qweight is stored."""
        key = super()._key(model, name, tie=tie)
        if key is None and name.endswith(".weight"):
            q = model.tensor_name(name[: -len("weight")] + "qweight")
            key = q[: -len("qweight")] + "weight" if q is not None else None
        return key

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in / Lp), B (out, r)) of the module on ``key``, float32 on the device, once per layer."""
        if key not in self._factors:
            lora = self.targets.plans[key].lora
            self._factors[key] = (lora.A.load().detach().to(device=self.device, dtype=F32),
                                  lora.B.load().detach().to(device=self.device, dtype=F32))
        return self._factors[key]

    def drop_kernels(self) -> None:
        super().drop_kernels()
        self._factors.clear()

    def merge_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """deq(W) + dW, dW[o, i] = c * (B @ A)[o, i // Lp] (the adapter's pooling convention)."""
        plan = self.targets.plans.get(self.base_key(name))
        if plan is None:
            return super().merge_(name, t)
        return t.add_(Q.expand_blocks(plan.blocks(F32).to(self.device), plan.pool_size))  # (out, in)

    def round_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """As MERGED stores it: a 16-bit dtype, or the base's codes with the zero points a correct merge writes."""
        key = self._key(self.merged, name)
        if self.merged_q is None or key is None or not self.merged_q.is_quantized(key):
            return super().round_(name, t)
        plan = self.targets.plans.get(self.base_key(name))
        return t if plan is None else t.copy_(self._requantized(plan))  # an untouched linear keeps its codes

    def _requantized(self, plan) -> torch.Tensor:
        """(out, in) float32: the base's codes and scales with the folded zero points in MERGED's representation."""
        ql, store, qcfg = plan.quant, self.base.store, self.qcfg
        scales, g_idx = store.get(ql.key("scales")), ql.g_idx(store, qcfg.group_size)
        try:
            z = Q.fold_into_zeros(ql.zeros(store, qcfg.zero_format), scales, plan.blocks(torch.float64), g_idx, plan.pool_size)  # (groups, out)
        except ValueError as exc:
            raise UnsupportedError(f"{plan.name}: {exc}") from None
        if self.layout == "gptq":
            z = Q.round_zeros(z, *G.safe_zero_range(ql.bits, qcfg.zero_format))[0]
        else:
            z = z.to(self.merged.store.dtype(self.merged_q.linears[_prefix(self.merged, plan.prefix)].zeros_key))
        return G.dequantize(store.get(ql.key("qweight")), z, scales, g_idx, ql.bits, dtype=F32).to(self.device)

    def adapter_hooks(self) -> AdapterHooks:
        return _QaloraHooks(self.sk, self)


def _prefix(model: BaseModel, prefix: str) -> str:
    key = model.tensor_name(f"{prefix}.qweight")
    return key[: -len(".qweight")] if key is not None else prefix


class _QaloraHooks(AdapterHooks):
    """QA-LoRA's unmerged output on each adapted linear: out + pooled_forward(x) (pool, then A, B)."""

    def __init__(self, sk, weights: QaloraWeights):
        self.sk, self.weights = sk, weights
        self.handles: list = []
        self.adapted: dict[str, str] = {}
        for mname, mod in sk.model.named_modules():
            if "weight" in mod._parameters and hookable(mod):
                key = weights.base_key(f"{mname}.weight", tie=False)
                if key is not None and key in weights.targets.plans:
                    self.adapted[mname] = key

    def __enter__(self) -> "_QaloraHooks":
        for mname, key in self.adapted.items():
            self.handles.append(self.sk.model.get_submodule(mname).register_forward_hook(self._hook(key)))
        return self

    def _hook(self, key: str):
        plan = self.weights.targets.plans[key]

        def hook(module, args, out):
            A, B = self.weights.factors(key)
            return out + Q.pooled_forward(args[0], A, B, float(plan.lora.scale), pooling=plan.pooling, pool_size=plan.pool_size)  # (..., out)

        return hook


def _qalora_setup(base, adapter, merged, pooling, group_size, prompts, samples: int, seq_len: int, seed: int) -> tuple[_Context, dict]:
    """Open and plan as ``merge_qalora`` does (the same errors), make the inputs; (context, what the report adds)."""
    from loratool.qalora import (
        _open_base,
        _open_inputs,
        plan_modules,
        resolve_convention,
    )

    base_m, ad, qcfg, quant = _open_inputs(base, adapter)
    merged_m = _open_base(merged)
    pool_name, pool_source, notes = resolve_convention(ad, pooling)
    plans = plan_modules(ad, base_m, quant, qcfg, pooling=pool_name, group_size=group_size)
    targets = _QTargets({f"{p.prefix}.weight": p for p in plans}, *_saved(ad, base_m))
    task, auto = _task(merged_m.architectures or base_m.architectures)
    inputs = _inputs(base_m, prompts, samples, seq_len, seed)
    layout = _layout(merged_m)
    dtype = _main_float_dtype(merged_m) if layout == "dense" else torch.float32
    # a gptq MERGED is one rounding (the integer zero points, which its floor measures) from the exact merge
    roundings = 1 if layout == "gptq" else 2
    ctx = _Context(base_m, merged_m, ad, targets, task, auto, inputs, bool(prompts), False, dtype, roundings, list(ad.warnings) + notes)
    extra = {"qalora": {"merged_layout": layout, "pooling": pool_name, "pooling_source": pool_source,
                        "pool_size": sorted({p.pool_size for p in plans}), "modules": len(plans), "quantization": qcfg.as_dict()}}
    if layout != "dense":
        extra["merged_dtype"] = layout
    return ctx, extra


def _saved(ad, base: BaseModel) -> tuple[dict, dict]:
    """(base key -> (name, lazy tensor), tensors the base lacks) for the adapter's modules_to_save."""
    to_save, pending = {}, {}
    for tname, lazy in ad.modules_to_save.items():
        key = base.tensor_name(tname)
        if key is not None:
            to_save[key] = (tname, lazy)
        else:
            pending[tname] = lazy
    return to_save, pending


def verify_outputs_qalora(
    gptq_base: BaseModel | str | Path,
    adapter: Any,
    merged: BaseModel | str | Path,
    *,
    pooling: str | None = None,
    group_size: int | None = None,
    prompts: list[str] | None = None,
    samples: int = 4,
    seq_len: int = 32,
    tolerance: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The GPTQ base + the QA-LoRA adapter (pooled, unmerged) against a ``merge --qalora`` output, layer by layer.

    Args: ``pooling`` and ``group_size`` as for ``merge_qalora``; the rest as for ``verify_outputs``.
    Returns:
        The ``verify_outputs`` report, with ``qalora`` (MERGED's layout, the pooling convention and
        why, Lp, the quantization read).
    Raises:
        As ``merge_qalora`` for the inputs; InputError as ``verify_outputs``; UnsupportedError: a
        float-zeros or gptq MERGED whose delta cannot fold into zero points (act-order g_idx).
    """
    _check_options(tolerance, samples, seq_len)
    ctx, extra = _qalora_setup(gptq_base, adapter, merged, pooling, group_size, prompts, samples, seq_len, seed)
    sk = S.build_skeleton(ctx.base.path, ctx.auto)
    paths = [MERGED, UNMERGED, MERGE32, ROUNDED]
    need = _check_memory(sk, ctx.inputs, len(paths), max_memory)
    run = _stream(ctx, sk, paths, device, progress, QaloraWeights)
    report = _layered_report(ctx, run, tolerance, need)
    report.update(extra)
    return report


def qalora_unmerged_outputs(gptq_base: BaseModel | str | Path, adapter: Any, *, pooling: str | None = None, group_size: int | None = None,
                            samples: int = 4, seq_len: int = 32, seed: int = 0,
                            device: str | torch.device = "cpu") -> tuple[list[dict], torch.Tensor]:
    """The GPTQ base + QA-LoRA adapter's outputs as the check computes its reference (the unmerged path alone).

    Returns:
        (the inputs; the outputs, (tokens, width) float32 on the CPU).
    """
    ctx, _ = _qalora_setup(gptq_base, adapter, gptq_base, pooling, group_size, None, samples, seq_len, seed)
    run = _stream(ctx, S.build_skeleton(ctx.base.path, ctx.auto), [UNMERGED], device, None, QaloraWeights)
    return ctx.inputs, run.outputs[UNMERGED]
