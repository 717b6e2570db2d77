"""Lit-LLaMA LoRA files (``lit-llama-lora-finetuned.pth``): a flat dict, one fused pair per layer.

Key layout (layer ``i``, hidden size C, rank r; ``lit_llama/lora.py``'s ``MergedLinear`` with
``enable_lora = [True, False, True]`` on the QKV projection ``c_attn``):

    transformer.h.i.attn.c_attn.lora_A    (2r, C)    [A_q; A_v]
    transformer.h.i.attn.c_attn.lora_B    (2C, r)    [B_q; B_v]   q rows in Meta order

delta_q = alpha / r * B_q @ A_q and delta_v = alpha / r * B_v @ A_v. ``alpha`` is not stored
(the reference scripts use 16). Lit-LLaMA keeps q and k rows in Meta's original order; Hugging
Face's ``q_proj`` rows are permuted for its rotary embedding, per head (hs = C / H):

    HF rows = Meta rows viewed (H, hs/2, 2, r), dims 1 and 2 swapped

(transformers' ``convert_llama_weights_to_hf`` ``permute``). A and v are never permuted.
Only LLaMA-1 shaped bases (no grouped-query attention) exist in Lit-LLaMA.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loratool.adapter import Adapter, LoraModule, ModuleKind
from loratool.errors import (
    FormatError,
    InputError,
    ModuleMismatchError,
    UnsupportedError,
)
from loratool.formats.litgpt import (
    describe_modules,
    out_dtype,
    padded_factors,
    pickle_head,
    refuse_unrepresentable,
    report_packing,
    strip_wrapper,
)
from loratool.io.store import TensorStore, is_torch_pickle, load_pickle
from loratool.io.writer import save_torch_pickle

NAME = "lit-llama"
OUTPUT_IS_FILE = True
DEFAULT_ALPHA = 16.0  # finetune/lora.py and scripts/convert_lora_weights.py
# lit_llama.model.llama_configs: the only model sizes Lit-LLaMA builds (n_embd -> n_head)
LLAMA1_HEADS = {4096: 32, 5120: 40, 6656: 52, 8192: 64}

_KEY_RE = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.lora_([AB])$")
_DETECT_RE = re.compile(rb"transformer\.h\.\d{1,6}\.attn\.c_attn\.lora_A")
_HF_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.(q_proj|v_proj)$")


def meta_to_hf(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q (or k) projection factor, Meta order -> Hugging Face rotary order."""
    rows, cols = t.shape
    return t.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q (or k) projection factor, Hugging Face rotary order -> Meta order."""
    rows, cols = t.shape
    return t.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def detect(path: Path) -> bool:
    path = Path(path)
    # by content, not by suffix: loratool writes this format under whatever name OUT has
    if path.name in ("adapter_model.bin", "pytorch_model.bin") or not is_torch_pickle(path):
        return False
    if _DETECT_RE.search(pickle_head(path)) is None:
        return False
    try:
        obj = load_pickle(path)
    except FormatError:
        return False
    from loratool.io.pickle_scan import flatten_state_dict

    tensors, _ = flatten_state_dict(obj)
    shapes = {}
    for k, t in tensors.items():
        m = _KEY_RE.match(strip_wrapper(k))
        if m is None:
            return False
        shapes[(m.group(1), m.group(2))] = tuple(t.shape)
    return bool(shapes) and all(
        len(s) == 2 and (layer, "B") in shapes and len(shapes[(layer, "B")]) == 2 and shapes[(layer, "B")][0] == 2 * s[1]
        for (layer, part), s in shapes.items()
        if part == "A"
    )


def head_count(hidden: int, base=None, *, path: Path | str = "") -> int:
    """The head count of the rotary permutation: from the base, else from Lit-LLaMA's model sizes.

    Raises:
        UnsupportedError: a base Lit-LLaMA cannot hold (not LLaMA, grouped-query attention).
        ModuleMismatchError: the base's hidden size differs.
        InputError: no base and an unknown hidden size.
    """
    if base is None:
        heads = LLAMA1_HEADS.get(hidden)
        if heads is None:
            raise InputError(
                f"{path}: --base is needed: the head count of the rotary permutation of q cannot be inferred from hidden size {hidden} "
                f"(Lit-LLaMA's own sizes: {', '.join(map(str, LLAMA1_HEADS))})"
            )
        return heads
    cfg = base.config
    if base.model_type != "llama":
        raise UnsupportedError(f"Lit-LLaMA holds LLaMA models only; the base {base.path} is {base.model_type!r}")
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or heads <= 0:
        raise FormatError(Path(base.path) / "config.json", f"num_attention_heads must be a positive integer, got {heads!r}")
    if kv != heads:
        raise UnsupportedError(
            f"Lit-LLaMA supports LLaMA-1 shaped bases only; the base {base.path} uses grouped-query attention ({heads} heads, {kv} key/value heads)"
        )
    if cfg.get("hidden_size") != hidden:
        raise ModuleMismatchError("c_attn", f"hidden size {hidden} in the adapter, {cfg.get('hidden_size')} in the base {base.path}")
    head_dim = cfg.get("head_dim") or hidden // heads
    if head_dim * heads != hidden or head_dim % 2:
        raise UnsupportedError(f"Lit-LLaMA needs hidden size = heads x an even head size; the base {base.path} has {hidden} = {heads} x {head_dim}")
    return heads


def read(path: Path, *, base=None, alpha: float | None = None, scale: float | None = None) -> Adapter:
    """Read a Lit-LLaMA LoRA file into q_proj/v_proj modules with Hugging Face row order.

    Args:
        path: the ``.pth`` file.
        base: optional ``BaseModel`` (LLaMA, no grouped-query attention): the head count.
        alpha: the alpha the adapter was trained with (not stored; default 16).
        scale: an absolute scale for every module (overrides alpha / r).
    Raises:
        FormatError, UnsupportedError, InputError.
    """
    path = Path(path)
    if path.is_dir():
        raise FormatError(path, "is a folder; a Lit-LLaMA adapter is one .pth file (lit-llama-lora-finetuned.pth)")
    store = TensorStore([path])
    layers: dict[int, dict[str, str]] = {}
    for key in store.keys():
        name = strip_wrapper(key)
        m = _KEY_RE.match(name)
        if m is None:
            what = "a LoRA factor Lit-LLaMA does not make" if "lora_" in name else "not a LoRA factor"
            raise UnsupportedError(f"{path}: holds {name}, {what}; a Lit-LLaMA adapter holds only transformer.h.N.attn.c_attn.lora_A/lora_B")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = key
    if not layers:
        raise FormatError(path, "holds no LoRA tensors")
    warns: list[str] = []
    rank = hidden = None
    for layer, p in sorted(layers.items()):
        if "A" not in p or "B" not in p:
            raise FormatError(path, f"layer {layer}: has lora_{'A' if 'B' not in p else 'B'} without its pair")
        a_shape, b_shape = store.shape(p["A"]), store.shape(p["B"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] % 2 or b_shape[0] % 2 or a_shape[0] != 2 * b_shape[1] or b_shape[0] != 2 * a_shape[1]:
            raise FormatError(path, f"layer {layer}: lora_A {a_shape} and lora_B {b_shape} are not the (2r, C) / (2C, r) of a q+v MergedLinear")
        if rank is None:
            rank, hidden = b_shape[1], a_shape[1]
        elif (rank, hidden) != (b_shape[1], a_shape[1]):
            raise FormatError(path, f"layer {layer}: rank {b_shape[1]} / hidden {a_shape[1]} differ from layer {min(layers)}'s {rank} / {hidden}")
    if rank == 0:
        raise FormatError(path, "rank 0")
    n_head = head_count(hidden, base, path=path)
    if scale is not None:
        mod_scale = float(scale)
        mod_alpha = mod_scale * rank
    else:
        if alpha is None:
            warns.append(f"{path}: Lit-LLaMA does not store alpha; assumed {DEFAULT_ALPHA:g} (its reference scripts' value); pass --alpha to change it")
            alpha = DEFAULT_ALPHA
        mod_alpha = float(alpha)
        mod_scale = mod_alpha / rank

    modules: dict[str, LoraModule] = {}
    r, C = rank, hidden
    for layer, p in sorted(layers.items()):
        A, B = store.lazy(p["A"]), store.lazy(p["B"])
        pre = f"model.layers.{layer}.self_attn."
        a_q = A.map(lambda t: t[:r], shape=(r, C))
        a_v = A.map(lambda t: t[r:], shape=(r, C))
        b_q = B.map(lambda t: meta_to_hf(t[:C], n_head), shape=(C, r))
        b_v = B.map(lambda t: t[C:], shape=(C, r))
        modules[pre + "q_proj"] = LoraModule(pre + "q_proj", ModuleKind.LINEAR, a_q, b_q, alpha=mod_alpha, scale=mod_scale)
        modules[pre + "v_proj"] = LoraModule(pre + "v_proj", ModuleKind.LINEAR, a_v, b_v, alpha=mod_alpha, scale=mod_scale)
    return Adapter(
        format=NAME,
        modules=modules,
        target_modules=["q_proj", "v_proj"],
        path=path,
        files=[path],
        config={"r": rank, "alpha": mod_alpha, "n_head": n_head, "enable_lora": [True, False, True]},
        warnings=warns,
        extras={"n_head": n_head},
    )


def check_writable(adapter: Adapter) -> None:
    """Refuse what a Lit-LLaMA LoRA file cannot hold (DoRA, bias, modules_to_save, saved copies)."""
    refuse_unrepresentable(adapter, "Lit-LLaMA")


def build_state_dict(adapter: Adapter, *, base=None, alpha: float | None = None, report: dict | None = None) -> dict[str, torch.Tensor]:
    """The flat Lit-LLaMA dict for an adapter with LoRA on q_proj/v_proj only.

    Ranks are zero-padded to the largest and per-module scales multiplied into B so that the
    file means the same under ``alpha`` (default 16) / r; a layer's missing q or v is zeros.

    Raises:
        UnsupportedError: modules other than q_proj/v_proj, DoRA, bias, modules_to_save, a
            grouped-query or non-LLaMA base.
        InputError: no base and a hidden size Lit-LLaMA does not know.
    """
    refuse_unrepresentable(adapter, "Lit-LLaMA")
    plan: dict[int, dict[str, LoraModule]] = {}
    bad = []
    for name, mod in adapter.modules.items():
        m = _HF_RE.match(name)
        if m is None:
            bad.append(name)
            continue
        plan.setdefault(int(m.group(1)), {})[m.group(2)] = mod
    if bad:
        raise UnsupportedError(
            f"Lit-LLaMA holds LoRA on q_proj and v_proj only (c_attn with enable_lora [True, False, True]); converting would lose {describe_modules(bad)}"
        )
    if not plan:
        raise UnsupportedError("the adapter has no q_proj/v_proj LoRA modules; a Lit-LLaMA file needs at least one")
    mods = [m for d in plan.values() for m in d.values()]
    hidden = mods[0].in_features
    for m in mods:
        if (m.out_features, m.in_features) != (hidden, hidden):
            raise UnsupportedError(
                f"{m.name}: delta is {m.out_features}x{m.in_features}; Lit-LLaMA's c_attn needs square q and v ({hidden}x{hidden}, no grouped-query attention)"
            )
    n_head = head_count(hidden, base)
    rank = max(m.rank for m in mods)
    file_alpha = DEFAULT_ALPHA if alpha is None else float(alpha)
    if not file_alpha:
        raise InputError("alpha must be non-zero")
    file_scale = file_alpha / rank
    dtype = out_dtype(mods, any(m.scale != file_scale for m in mods))
    n_layers = max(plan) + 1
    if base is not None and isinstance(base.config.get("num_hidden_layers"), int):
        if base.config["num_hidden_layers"] < n_layers:
            raise UnsupportedError(f"the adapter has layer {n_layers - 1} but the base {base.path} has {base.config['num_hidden_layers']} layers")
        n_layers = base.config["num_hidden_layers"]
    sd: dict[str, torch.Tensor] = {}
    zeros = (torch.zeros(rank, hidden, dtype=dtype), torch.zeros(hidden, rank, dtype=dtype))
    zero_filled = 0
    for layer in range(n_layers):
        d = plan.get(layer, {})
        zero_filled += ("q_proj" not in d) + ("v_proj" not in d)
        qa, qb = padded_factors(d["q_proj"], rank, file_scale, dtype) if "q_proj" in d else zeros
        va, vb = padded_factors(d["v_proj"], rank, file_scale, dtype) if "v_proj" in d else zeros
        sd[f"transformer.h.{layer}.attn.c_attn.lora_A"] = torch.cat([qa, va]).contiguous()
        sd[f"transformer.h.{layer}.attn.c_attn.lora_B"] = torch.cat([hf_to_meta(qb, n_head), vb]).contiguous()
    report_packing(report, "Lit-LLaMA", mods, rank=rank, file_scale=file_scale, held=f"alpha / r = {file_alpha:g}/{rank}",
                   zero_filled=zero_filled, dtype=dtype)
    if report is not None:
        report.setdefault("notes", []).append(f"Lit-LLaMA files do not store alpha: load this one with alpha {file_alpha:g} (r = {rank}, {n_head} heads)")
    return sd


def write(adapter: Adapter, target: Path, *, base=None, alpha: float | None = None, report: dict | None = None) -> list[Path]:
    """Write a Lit-LLaMA LoRA file (alpha is not stored: load it with ``alpha``, default 16).

    Raises:
        UnsupportedError, InputError: see ``build_state_dict``.
    """
    sd = build_state_dict(adapter, base=base, alpha=alpha, report=report)
    save_torch_pickle(sd, Path(target))
    return [Path(target)]
