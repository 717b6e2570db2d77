"""Phi-3's fused projections and the separate ones LitGPT names, both ways, exactly.

A Phi-3 checkpoint (transformers' ``Phi3ForCausalLM``, also phi-4) stores q/k/v as one
``self_attn.qkv_proj`` (rows [q; k; v], sizes H*hs, G*hs, G*hs) and gate/up as one
``mlp.gate_up_proj`` (rows [gate; up], two halves). LitGPT's Phi-3 conversion
(``litgpt/scripts/convert_hf_checkpoint.py``, ``copy_weights_phi``) copies qkv_proj into
``attn.qkv`` as it is and chunks gate_up_proj into ``mlp.fc_1`` (gate) and ``mlp.fc_2`` (up), so a
LitGPT LoRA adapts the parts separately.

Splitting a fused LoRA (A (r, C), B (sum of sizes, r)): part j keeps A and takes its rows of B,
since row block j of B A is B_j A. Fusing parts back: when they share A (byte for byte, as a split
gives), A and B stacked by rows, rank r; otherwise A = [A_1; A_2; ...] and B block-diagonal, rank
n * r, the same delta (a part an adapter lacks is zero rows of B).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from loratool.adapter import Adapter, LoraModule
from loratool.errors import InputError
from loratool.io.store import LazyTensor

QKV_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP_PARTS = ("mlp.gate_proj", "mlp.up_proj")
FUSED = {"self_attn.qkv_proj": QKV_PARTS, "mlp.gate_up_proj": GATE_UP_PARTS}
_FUSED_RE = re.compile(r"^(?P<pre>(?:model\.)?layers\.\d+\.)(?P<fused>self_attn\.qkv_proj|mlp\.gate_up_proj)$")
_PART_RE = re.compile(r"^(?P<pre>(?:model\.)?layers\.\d+\.)(?P<part>self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)$")


def has_fused(adapter: Adapter) -> bool:
    return any(_FUSED_RE.match(n) for n in adapter.modules)


def part_sizes(fused: str, out_features: int, q_size: int | None, kv_size: int | None, *, where: str) -> tuple[int, ...]:
    """Row sizes of the parts of ``fused`` (``FUSED`` key) with ``out_features`` rows."""
    if fused == "mlp.gate_up_proj":
        if out_features % 2:
            raise InputError(f"{where}: gate_up_proj has {out_features} rows, not two equal halves")
        return (out_features // 2, out_features // 2)
    if q_size is None or kv_size is None:
        raise InputError(f"{where}: splitting qkv_proj into q, k, v needs the head counts: pass --base")
    if q_size + 2 * kv_size != out_features:
        raise InputError(f"{where}: qkv_proj has {out_features} rows, the base's heads give {q_size}+{kv_size}+{kv_size}")
    return (q_size, kv_size, kv_size)


def unfused(adapter: Adapter, q_size: int | None, kv_size: int | None) -> Adapter:
    """The adapter with every fused Phi-3 module split into its parts (exact; see the module docstring)."""
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        match = _FUSED_RE.match(name)
        if match is None:
            modules[name] = m
            continue
        fused = match["fused"]
        sizes = part_sizes(fused, m.out_features, q_size, kv_size, where=name)
        start = 0
        for part, size in zip(FUSED[fused], sizes):
            B = m.B.map(lambda t, s=start, n=size: t[s:s + n], shape=(size, m.rank))  # (size, r): rows of B
            modules[match["pre"] + part] = replace(m, name=match["pre"] + part, B=B)
            start += size
    return adapter.replace_modules(modules)


def fused(modules: dict[str, LoraModule], q_size: int, kv_size: int) -> dict[str, LoraModule]:
    """``modules`` with the parts of each layer's qkv_proj / gate_up_proj fused into one module each."""
    groups: dict[tuple[str, str], dict[str, LoraModule]] = {}
    out: dict[str, LoraModule] = {}
    for name, m in modules.items():
        match = _PART_RE.match(name)
        if match is None:
            out[name] = m
            continue
        key = next(f for f, parts in FUSED.items() if match["part"] in parts)
        groups.setdefault((match["pre"], key), {})[match["part"]] = m
    for (pre, key), parts in groups.items():
        half = next(iter(parts.values())).out_features  # gate and up: equal halves
        sizes = (q_size, kv_size, kv_size) if key == "self_attn.qkv_proj" else (half, half)
        out[pre + key] = _fuse(pre + key, [parts.get(p) for p in FUSED[key]], sizes)
    return out


def _fuse(name: str, parts: list[LoraModule | None], sizes: tuple[int, ...]) -> LoraModule:
    present = [m for m in parts if m is not None]
    first = present[0]
    if any(m.scale != first.scale for m in present):
        raise InputError(f"{name}: its parts have different scales; they cannot be fused into one LoRA")
    As = [m.A.load() for m in present]
    shared = all(a.shape == As[0].shape and torch.equal(a, As[0]) for a in As)
    r = first.rank if shared else sum(m.rank for m in present)
    dtype = first.B.dtype

    def load_B() -> torch.Tensor:
        B = torch.zeros(sum(sizes), r, dtype=dtype)  # (out, r): [q; k; v] or [gate; up] rows
        row, col = 0, 0
        for m, size in zip(parts, sizes):
            if m is not None:
                B[row:row + size, col:col + m.rank] = m.B.load()
                col += 0 if shared else m.rank
            row += size
        return B

    A = LazyTensor.of(As[0]) if shared else LazyTensor.of(torch.cat(As))  # (r, C)
    B = LazyTensor((sum(sizes), r), dtype, load_B)
    alpha = first.alpha * r / first.rank if first.alpha else first.alpha  # alpha / r stays the scale
    return replace(first, name=name, A=A, B=B, alpha=alpha)
