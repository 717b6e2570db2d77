"""The output check, layer-streamed: BASE + ADAPTER unmerged against MERGED, one layer at a time.

Both sides run the model's own transformers implementation (``_stages``) in float32, with only
one layer's weights resident, read from the checkpoints as each layer comes; the unmerged side
applies the adapter on the fly (``_paths``), so PEFT is not needed. After the embeddings, after
every layer and at the output, the hidden states of MERGED are compared with the unmerged ones,
and so are those of two references computed alongside: the same merge in float32 and rounded to
MERGED's storage. A correct merge differs from the unmerged model by rounding only, so the
allowed difference at each stage is measured, not assumed:

    allowed = roundings * floor_merged_dtype + 2 * floor_float32 + 2 * u32 * sqrt(width)

(floor_merged_dtype: the rounded merge's relative difference at that stage, floor_float32 the
float32 merge's; roundings: 2 for LoRA — the delta, then W + dW — and 4 for DoRA). The first
stage over its bound is where MERGED diverges: a fault planted in layer k is named as layer k,
because every stage before it is within rounding and the comparison is cumulative (each side
runs on its own hidden states, as the whole model would).

For a bitsandbytes-quantized MERGED the rounded reference is the correct merge re-quantized with
MERGED's own scheme (retention-aware: what quantization lets a correct merge keep), and the
retention of the adapter's effect on the outputs, <y_M - y_Q(W), y_U - y_Q(W)> / ||y_U - y_Q(W)||^2,
is reported with the one a correct quantized merge has.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from loratool.adapter import Adapter
from loratool.base import BaseModel
from loratool.errors import InputError
from loratool.verify import _stages as S
from loratool.verify._common import (
    U32,
    Progress,
    _num,
    _ratio,
)
from loratool.verify._context import _check_options, _report, _setup
from loratool.verify._paths import (
    MERGE32,
    MERGED,
    QBASE,
    ROUNDED,
    UNMERGED,
    Weights,
)


class _Stage:
    """Squared norms of each path's difference from the unmerged hidden states at one stage."""

    def __init__(self, name: str, index: int | None):
        self.name, self.index = name, index
        self.ref_sq = 0.0
        self.diff_sq: dict[str, float] = {}
        self.dots: dict[str, float] = {}  # retention: <y_P - y_Q(W), y_U - y_Q(W)>
        self.width = 0

    def add(self, hidden: dict[str, list[torch.Tensor]]) -> None:
        ref = hidden[UNMERGED]
        self.width = ref[0].shape[-1]
        self.ref_sq += sum(float(torch.sum(r.double() ** 2)) for r in ref)
        for path, hs in hidden.items():
            if path != UNMERGED:
                self.diff_sq[path] = self.diff_sq.get(path, 0.0) + sum(float(torch.sum((h.double() - r.double()) ** 2)) for h, r in zip(hs, ref))
        if QBASE in hidden:
            for path in (MERGED, ROUNDED, UNMERGED):
                dot = sum(float(torch.sum((h.double() - q.double()) * (r.double() - q.double()))) for h, q, r in zip(hidden[path], hidden[QBASE], ref))
                self.dots[path] = self.dots.get(path, 0.0) + dot

    def rel(self, path: str) -> float:
        return _ratio(math.sqrt(self.diff_sq.get(path, 0.0)), math.sqrt(self.ref_sq))

    def judge(self, roundings: int, tolerance: float | None, judged: bool) -> dict[str, Any]:
        rel, f32, fd = self.rel(MERGED), self.rel(MERGE32), self.rel(ROUNDED)
        allowed = tolerance if tolerance is not None else roundings * fd + 2 * f32 + 2 * U32 * math.sqrt(self.width)
        d = {"stage": self.name, "layer": self.index, "relative_diff": _num(rel), "allowed_relative_diff": _num(allowed),
             "floor_float32": _num(f32), "floor_merged_dtype": _num(fd),
             "passed": (rel <= allowed) if judged else None}
        if self.dots:
            d["retention"] = _num(_ratio(self.dots[MERGED], self.dots[UNMERGED]))
            d["expected_retention"] = _num(_ratio(self.dots[ROUNDED], self.dots[UNMERGED]))
        return d


class _Run:
    """One layer-streamed run of every path over the inputs."""

    def __init__(self, sk: S.Skeleton, weights: Weights, inputs: list[dict], task: str, paths: list[str], progress: Progress):
        self.sk, self.w, self.inputs, self.task, self.paths = sk, weights, inputs, task, paths
        self.states: list[S.Captured] = []
        self.hidden: dict[str, list[torch.Tensor]] = {}
        self.stages: list[_Stage] = []
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks = weights.adapter_hooks()
        self.step = progress

    def embeddings(self) -> None:
        for path in self.paths:
            with self._adapter(path):
                caps = [S.run_embeddings(self.sk, b, self.w.values(path)) for b in self.inputs]
            if path == UNMERGED:
                self.states = caps
            self.hidden[path] = [c.hidden for c in caps]
        self._compare("embeddings", None)

    def layer(self, i: int) -> None:
        names = self.sk.layer_names(i)
        live = S.Materialized(self.sk.model)
        w = self.w
        try:
            # MERGED first: its quantized weights' requantizers are what the rounded path uses
            self._run_path(MERGED, i, live, {n: w.merged_value for n in names}, restore=True)
            self._run_path(UNMERGED, i, live, {n: w.unmerged_value for n in names})
            # the floors from the unmerged tensors, in place: + delta (float32), then rounded
            self._run_path(MERGE32, i, live, {n: lambda n: w.merge_(n, live.get(n)) for n in names})
            self._run_path(ROUNDED, i, live, {n: lambda n: w.round_(n, live.get(n)) for n in names}, restore=True)
            self._run_path(QBASE, i, live, {n: lambda n: w.requant_(n, w.base_value(n)) for n in names}, restore=True)
        finally:
            live.restore()
            w.drop_kernels()
        self._compare(f"{self.sk.prefix}.{i}", i)

    def _run_path(self, path: str, i: int, live: S.Materialized, make: dict, *, restore: bool = False) -> None:
        """Layer ``i`` on ``path``: its parameters set by ``make`` (name -> value), run on every input."""
        if path not in self.paths:
            if restore:
                live.restore()
            return
        for name, fn in make.items():
            live.set(name, fn(name))
        with self._adapter(path):
            self.hidden[path] = [S.run_layer(self.sk, i, st, h) for st, h in zip(self.states, self.hidden[path])]
        if restore:
            live.restore()

    def output(self) -> None:
        for path in self.paths:
            with self._adapter(path):
                ys = [S.run_output(self.sk, b, st, h, self.task, self.w.values(path)) for b, st, h in zip(self.inputs, self.states, self.hidden[path])]
            self.hidden[path] = ys
            self.outputs[path] = torch.cat([y.float().reshape(-1, y.shape[-1]).cpu() for y in ys])
        self._compare("output", None)

    def _adapter(self, path: str):
        import contextlib

        return self.hooks if path == UNMERGED else contextlib.nullcontext()

    def _compare(self, name: str, index: int | None) -> None:
        st = _Stage(name, index)
        st.add(self.hidden)
        self.stages.append(st)
        self.step(1, name)


# ----------------------------------------------------------------------------- memory


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def memory_needed(sk: S.Skeleton, tokens: int, longest: int, paths: int) -> tuple[int, str]:
    """(bytes, what) the run holds at once: the largest stage's weights in float32 (a layer, or a module
    outside the stack such as the embedding), a float32 copy of its largest tensor (rounding, DoRA),
    and the activations (every path's hidden states, a layer's intermediates, one attention matrix)."""
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in sk.layers) * 4
    outside = max((sum(p.numel() for p in m._parameters.values() if p is not None) * 4 for _, m in sk.outside_modules()), default=0)
    largest = max(p.numel() for p in sk.model.parameters()) * 4
    cfg = sk.model.config.get_text_config() if hasattr(sk.model.config, "get_text_config") else sk.model.config
    width = max(int(getattr(cfg, k, 0) or 0) for k in ("hidden_size", "intermediate_size", "n_embd", "n_inner", "hidden_dim", "dim"))
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    acts = (2 * paths + 4) * tokens * max(width, 1) * 4 + heads * longest * longest * 4 + 2 * paths * tokens * vocab * 4
    need = max(layer, outside) + largest + acts
    what = f"one layer ({sk.prefix}.0) is {_fmt_bytes(layer)} in float32, the largest module outside the layers {_fmt_bytes(outside)}"
    return need, what


def _check_memory(sk: S.Skeleton, inputs: list[dict], paths: int, max_memory: int | None) -> int:
    tokens = sum(int(b["input_ids"].numel()) for b in inputs)
    longest = max(int(b["input_ids"].shape[-1]) for b in inputs)
    need, what = memory_needed(sk, tokens, longest, paths)
    if max_memory is not None and need > max_memory:
        raise InputError(f"--max-memory {_fmt_bytes(max_memory)} is below what the output check needs at once: {_fmt_bytes(need)} ({what}, plus activations)")
    return need


# ----------------------------------------------------------------------------- the check


def verify_outputs_layered(
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
    """BASE + ADAPTER (unmerged, adapter on the fly) against MERGED, layer by layer; see the module docstring.

    Args and Returns: as ``verify_outputs`` (which calls this); ``max_memory`` bounds the bytes held at
    once (refused up front when one layer needs more); ``combine`` (a ``CombineSpec``, ``adapter`` a list):
    several adapters merged together, their combined delta applied on the fly. The report adds ``layers`` (one entry per stage:
    embeddings, each layer, output), ``first_divergent_layer`` (index) and ``first_divergent`` (stage name).
    Raises:
        InputError: unreadable inputs, an architecture transformers cannot build, ``prompts`` without a
            tokenizer, ``max_memory`` below one layer.
    """

    _check_options(tolerance, samples, seq_len)
    ctx = _setup(base, adapter, merged, prompts, samples, seq_len, seed, combine)
    sk = S.build_skeleton(ctx.base.path, ctx.auto)
    paths = [MERGED, UNMERGED, MERGE32, ROUNDED] + ([QBASE] if ctx.quantized else [])
    need = _check_memory(sk, ctx.inputs, len(paths), max_memory)
    run = _stream(ctx, sk, paths, device, progress)
    return _layered_report(ctx, run, tolerance, need)


def _stream(ctx, sk: S.Skeleton, paths: list[str], device, progress: Progress | None, weights_class: type = Weights) -> _Run:
    """Every path through the embeddings, each layer in turn and the output (``weights_class``: where
    each path's parameters come from, and the adapter's hooks)."""
    device = torch.device(device)
    inputs = [{k: v.to(device) for k, v in b.items()} for b in ctx.inputs]
    weights = weights_class(sk, ctx.base, ctx.merged, ctx.targets, device, ctx.merged_dtype)
    run = _Run(sk, weights, inputs, ctx.task, paths, progress or (lambda *a, **k: None))
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        run.embeddings()
        for i in range(len(sk.layers)):
            run.layer(i)
        run.output()
    finally:
        weights.close()
        torch.set_grad_enabled(grad)
    return run


def unmerged_outputs(base: BaseModel | str | Path, adapter: Adapter | str | Path, *, samples: int = 4, seq_len: int = 32,
                     seed: int = 0, device: str | torch.device = "cpu", combine: Any = None) -> tuple[list[dict], torch.Tensor]:
    """BASE + ADAPTER's outputs as the layer-streamed check computes its reference (the unmerged path alone;
    ``combine``: several adapters, as for ``verify_outputs``).

    Returns:
        (the inputs, as for ``verify_outputs``; the outputs, (tokens, width) float32 on the CPU).
    """
    ctx = _setup(base, adapter, base, None, samples, seq_len, seed, combine)
    run = _stream(ctx, S.build_skeleton(ctx.base.path, ctx.auto), [UNMERGED], device, None)
    return ctx.inputs, run.outputs[UNMERGED]


def adapter_outputs(base: BaseModel | str | Path, adapters: list, *, input_ids: Any = None, samples: int = 4, seq_len: int = 32,
                    seed: int = 0, device: str | torch.device = "cpu") -> tuple[str, torch.Tensor, list[torch.Tensor]]:
    """BASE's outputs and BASE + each adapter's (unmerged, one at a time), on the same inputs, layer-streamed.

    Args:
        input_ids: the token ids to run, (samples, tokens) (default: ``samples`` random sequences of
            ``seq_len`` tokens from ``seed``, as ``verify --outputs``).
    Returns:
        (the task: "causal", "seqcls" or "base"; BASE's outputs; one per adapter), each (tokens, width)
        float32 on the CPU.
    """
    from dataclasses import replace

    inputs = None
    if input_ids is not None:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        inputs = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in ids.reshape(-1, ids.shape[-1])]
    base_out, outs, task, sk = None, [], "base", None
    for ad in adapters:
        ctx = _setup(base, ad, base, None, samples, seq_len, seed)
        ctx = ctx if inputs is None else replace(ctx, inputs=inputs)
        sk = sk or S.build_skeleton(ctx.base.path, ctx.auto)  # one model skeleton for every pass
        paths = [UNMERGED] if base_out is not None else [MERGED, UNMERGED]  # MERGED is BASE itself here
        run = _stream(ctx, sk, paths, device, None)
        base_out = run.outputs[MERGED] if base_out is None else base_out
        outs.append(run.outputs[UNMERGED])
        task = ctx.task
    return task, base_out, outs


def _layered_report(ctx, run: _Run, tolerance: float | None, need: int) -> dict[str, Any]:
    ref, got = run.outputs[UNMERGED], run.outputs[MERGED]
    if got.shape != ref.shape:
        raise InputError(f"{ctx.merged.path}: outputs have shape {tuple(got.shape)}, the base + adapter gives {tuple(ref.shape)}")
    judged = True
    stages = [st.judge(ctx.roundings, tolerance, judged) for st in run.stages]
    final = stages[-1]
    report = _report(ctx, ref, got, floor32=run.stages[-1].rel(MERGE32), floor_d=run.stages[-1].rel(ROUNDED),
                     allowed=final["allowed_relative_diff"], tolerance=tolerance, judged=judged)
    first = next((s for s in stages if s["passed"] is False), None)
    report.update({
        "method": "layer-streamed",
        "layers": stages,
        "first_divergent": first["stage"] if first else None,
        "first_divergent_layer": first["layer"] if first else None,
        "resident_bytes_estimate": need,
    })
    if ctx.quantized:
        report["retention"], report["expected_retention"] = final.get("retention"), final.get("expected_retention")
    return report
