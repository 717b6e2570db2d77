"""Module names shared by the formats: layers, embeddings, q/k row order, GGUF tensor names.

Canonical module names are the transformers ones, relative to the task model PEFT wraps
(``model.layers.0.self_attn.q_proj``, ``transformer.h.0.attn.c_attn``). This module holds
what more than one format needs to rename or reorder them:

* ``split_layer`` / ``layer_index``: the block index inside a module name.
* ``is_embedding_name``: leaves that are token/position embeddings in transformers models.
* ``permute_qk_rows`` / ``unpermute_qk_rows``: llama.cpp's ``LlamaModel.permute`` on the
  output rows of q/k projections (HF "rotate-half" order -> the interleaved order of Meta's
  original checkpoints and llama.cpp), and its inverse. Only the rows move, so for a LoRA
  pair it applies to B alone, never to A.
* ``head_counts``: attention / key-value head counts from a transformers config.
* GGUF: ``gguf_arch_for_config`` (HF architecture -> llama.cpp architecture and whether its
  converter permutes q/k), ``gguf_tensor_name`` (HF module -> ``blk.N.attn_q``, through the
  ``gguf`` package's own ``TensorNameMap``), and ``hf_module_name`` (the reverse, from one
  template per architecture, used when no base model is at hand).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

from loratool.errors import UnsupportedError

if TYPE_CHECKING:  # names are read by `--help` and a plain inspect, which must not import torch
    import torch

# -- layers and leaves --------------------------------------------------------------------

# containers of transformer blocks in transformers models (llama/qwen: layers, bert: layer,
# gpt2: h, others: blocks)
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.+\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")

# -- files that travel with a model folder ---------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
# files a merged output copies from the base folder besides its weights
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "preprocessor_config.json")


# -- roles: the one table of which leaves play which part in transformers models -----------

# token embeddings: what get_input_embeddings() returns (llama/qwen, gpt2, bert, gpt-neox, lit/meta, t5)
INPUT_EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
# language-model heads: what get_output_embeddings() returns; tied to the input embedding when
# the config says tie_word_embeddings
OUTPUT_HEAD_LEAVES = ("lm_head", "embed_out")
# every embedding layer (token, position, token type): PEFT's embedding LoRA layout
EMBEDDING_LEAVES = frozenset(
    {*INPUT_EMBEDDING_LEAVES, "wpe", "position_embeddings", "token_type_embeddings"}
) - {"shared"}
# layers PEFT's save_embedding_layers saves whole (input embeddings and output heads)
SAVED_EMBEDDING_LEAVES = frozenset({*INPUT_EMBEDDING_LEAVES, *OUTPUT_HEAD_LEAVES})
# top-level modules outside the base model of a task model (heads trained from scratch)
TASK_HEAD_ROOTS = ("lm_head", "classifier", "score", "qa_outputs", "pre_classifier")


def is_output_head(name: str) -> bool:
    """Whether a module is a language-model head (``lm_head``, ``embed_out``)."""
    return leaf(name) in OUTPUT_HEAD_LEAVES


def is_input_embedding_weight(key: str) -> bool:
    """Whether a tensor name is the weight of a token embedding (``model.embed_tokens.weight``...)."""
    head, _, last = key.rpartition(".")
    return last == "weight" and leaf(head) in INPUT_EMBEDDING_LEAVES

# Fused MoE expert parameters (transformers 5: Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss ...
# ``*Experts`` modules). The order their classes register them in: PEFT nests one ParamWrapper per
# targeted parameter in that order (tuners_utils ``_inject_parameters``), so the first is innermost.
EXPERT_PARAM_ORDER = ("gate_up_proj", "down_proj")
# How checkpoints store a fused parameter one expert at a time (transformers
# ``conversion_mapping.py``: MergeModulelist(dim=0) stacks experts, Concatenate(dim=1) joins the
# sources along ``out``): the per-expert leaves, in concatenation order.
EXPERT_SOURCES = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
# model types whose experts module stores (E, in, out) (``is_transposed = True`` in transformers 5)
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss"})
# module path renames of those checkpoints (Mixtral, PhiMoE, MiniMax: ``block_sparse_moe`` -> ``mlp``)
EXPERT_PATH_RENAMES = ((".mlp.experts", ".block_sparse_moe.experts"),)

Q_LEAVES = frozenset({"q_proj"})
K_LEAVES = frozenset({"k_proj"})


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers``, 3, ``self_attn.q_proj``); None outside blocks."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    return m.group("prefix"), int(m.group("index")), m.group("rest")


def layer_index(name: str) -> int | None:
    """The transformer block index in a module name, or None."""
    parts = split_layer(name)
    return None if parts is None else parts[1]


def leaf(name: str) -> str:
    """The last component of a dotted name."""
    return name.rsplit(".", 1)[-1]


def is_embedding_name(name: str) -> bool:
    """Whether a module name ends in a transformers embedding leaf (``embed_tokens``, ``wte``...)."""
    return leaf(name) in EMBEDDING_LEAVES


def qk_projection(name: str) -> str | None:
    """``"q"`` or ``"k"`` for llama-style q/k projections (the ones llama.cpp permutes), else None."""
    lf = leaf(name)
    if lf in Q_LEAVES:
        return "q"
    if lf in K_LEAVES:
        return "k"
    return None


# -- attention heads and the q/k row permutation -----------------------------------------


def head_counts(config: Mapping) -> tuple[int, int]:
    """(attention heads, key-value heads) from a transformers config.

    Raises:
        UnsupportedError: the config names no head count.
    """
    cfg = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
    n_head = next((cfg[k] for k in ("num_attention_heads", "n_head", "n_heads") if isinstance(cfg.get(k), int)), None)
    if n_head is None:
        raise UnsupportedError("the base config names no attention head count (num_attention_heads)")
    n_kv = next((cfg[k] for k in ("num_key_value_heads", "n_kv_heads", "num_kv_heads") if isinstance(cfg.get(k), int)), None)
    return int(n_head), int(n_kv if n_kv is not None else n_head)


def _check_rows(t: torch.Tensor, n_heads: int) -> None:
    if n_heads <= 0 or t.shape[0] % (2 * n_heads):
        raise UnsupportedError(f"cannot permute {t.shape[0]} rows for {n_heads} heads (need a multiple of {2 * n_heads})")


def permute_qk_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: HF row order -> interleaved (llama.cpp / Meta) order.

    Within each head, HF keeps the rotary pairs as (first half, second half); llama.cpp wants
    them interleaved. Row ``h*d + j*2 + i`` of the result is row ``h*d + i*d/2 + j`` of ``t``.

    Args:
        t: a tensor whose dim 0 is the projection's output rows (a weight, a bias, a LoRA B).
        n_heads: heads of this projection (attention heads for q, key-value heads for k).
    """
    _check_rows(t, n_heads)
    rest = t.shape[1:]
    return t.reshape(n_heads, 2, t.shape[0] // n_heads // 2, *rest).swapaxes(1, 2).reshape(t.shape)


def unpermute_qk_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_qk_rows``: interleaved (llama.cpp / Meta) order -> HF order."""
    _check_rows(t, n_heads)
    rest = t.shape[1:]
    return t.reshape(n_heads, t.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(t.shape)


# -- GGUF ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFArch:
    """A llama.cpp architecture as its HF converter handles it."""

    name: str  # gguf.MODEL_ARCH_NAMES value, e.g. "llama" (general.architecture)
    permute_qk: bool  # the converter applies LlamaModel.permute to q_proj/k_proj rows
    templates: str  # key into _HF_TEMPLATES: canonical HF module names for reading

    @property
    def model_arch(self):
        import gguf

        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)


# HF architecture class (config.json "architectures"[0]) -> how convert_hf_to_gguf.py handles it.
# Only architectures whose LoRA targets map one module to one GGUF tensor are listed.
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "LlamaForCausalLM": GGUFArch("llama", True, "llama"),
    "LLaMAForCausalLM": GGUFArch("llama", True, "llama"),
    "MistralForCausalLM": GGUFArch("llama", True, "llama"),
    "MixtralForCausalLM": GGUFArch("llama", True, "llama"),
    "GraniteForCausalLM": GGUFArch("granite", True, "llama"),
    "Qwen2ForCausalLM": GGUFArch("qwen2", False, "llama"),
    "Qwen3ForCausalLM": GGUFArch("qwen3", False, "llama"),
    "GemmaForCausalLM": GGUFArch("gemma", False, "llama"),
    "Gemma2ForCausalLM": GGUFArch("gemma2", False, "llama"),
    "Phi3ForCausalLM": GGUFArch("phi3", False, "phi3"),
    "Starcoder2ForCausalLM": GGUFArch("starcoder2", False, "starcoder2"),
    "GPT2LMHeadModel": GGUFArch("gpt2", False, "gpt2"),
    # mixture-of-experts bases (expert LoRA: GGUF_EXPERT_TENSORS); Mixtral is "llama" above
    "Qwen2MoeForCausalLM": GGUFArch("qwen2moe", False, "moe"),
    "Qwen3MoeForCausalLM": GGUFArch("qwen3moe", False, "moe"),
    "OlmoeForCausalLM": GGUFArch("olmoe", False, "moe"),
}

# general.architecture -> the same description, for reading a GGUF without a base
_GGUF_BY_NAME: dict[str, GGUFArch] = {}
for _a in GGUF_ARCHITECTURES.values():
    _GGUF_BY_NAME.setdefault(_a.name, _a)

# model_type (config.json) -> HF architecture, for configs without "architectures"
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "granite": "GraniteForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

# MODEL_TENSOR member name -> the HF module transformers uses for it (reading without a base)
_LLAMA_BLOCK = {
    "ATTN_Q": "model.layers.{bid}.self_attn.q_proj",
    "ATTN_K": "model.layers.{bid}.self_attn.k_proj",
    "ATTN_V": "model.layers.{bid}.self_attn.v_proj",
    "ATTN_OUT": "model.layers.{bid}.self_attn.o_proj",
}
_HF_TEMPLATES: dict[str, dict[str, str]] = {
    "llama": {
        "TOKEN_EMBD": "model.embed_tokens",
        "OUTPUT": "lm_head",
        **_LLAMA_BLOCK,
        "FFN_GATE": "model.layers.{bid}.mlp.gate_proj",
        "FFN_UP": "model.layers.{bid}.mlp.up_proj",
        "FFN_DOWN": "model.layers.{bid}.mlp.down_proj",
    },
    "phi3": {
        "TOKEN_EMBD": "model.embed_tokens",
        "OUTPUT": "lm_head",
        "ATTN_QKV": "model.layers.{bid}.self_attn.qkv_proj",
        "ATTN_OUT": "model.layers.{bid}.self_attn.o_proj",
        "FFN_UP": "model.layers.{bid}.mlp.gate_up_proj",
        "FFN_DOWN": "model.layers.{bid}.mlp.down_proj",
    },
    "starcoder2": {
        "TOKEN_EMBD": "model.embed_tokens",
        "OUTPUT": "lm_head",
        **_LLAMA_BLOCK,
        "FFN_UP": "model.layers.{bid}.mlp.c_fc",
        "FFN_DOWN": "model.layers.{bid}.mlp.c_proj",
    },
    "gpt2": {
        "TOKEN_EMBD": "transformer.wte",
        "POS_EMBD": "transformer.wpe",
        "OUTPUT": "lm_head",
        "ATTN_QKV": "transformer.h.{bid}.attn.c_attn",
        "ATTN_OUT": "transformer.h.{bid}.attn.c_proj",
        "FFN_UP": "transformer.h.{bid}.mlp.c_fc",
        "FFN_DOWN": "transformer.h.{bid}.mlp.c_proj",
    },
}


_HF_TEMPLATES["moe"] = {
    **_HF_TEMPLATES["llama"],
    "FFN_GATE_INP": "model.layers.{bid}.mlp.gate",  # the router, an ordinary linear
    "FFN_GATE_SHEXP": "model.layers.{bid}.mlp.shared_expert.gate_proj",  # Qwen2-MoE's shared expert
    "FFN_UP_SHEXP": "model.layers.{bid}.mlp.shared_expert.up_proj",
    "FFN_DOWN_SHEXP": "model.layers.{bid}.mlp.shared_expert.down_proj",
    "FFN_GATE_INP_SHEXP": "model.layers.{bid}.mlp.shared_expert_gate",
}

# -- GGUF expert LoRA (fused MoE expert parameters, PEFT target_parameters) -------------------
#
# llama.cpp holds expert LoRA as 3-D pairs on its stacked expert tensors: numpy lora_a (E, r, in),
# lora_b (E, out, r) (ggml ne (in, r, E) / (r, out, E)), applied per selected expert by
# build_lora_mm_id (src/llama-graph.cpp) with scale alpha / r. Its convert_lora_to_gguf.py makes
# them only from per-expert PEFT pairs (``experts.<e>.gate_proj`` / ``w1``...), which each
# architecture's HF converter stacks with torch.stack over experts (LoraTorchTensor stacks A and B).

# general.architecture values whose converter stacks per-expert LoRA pairs into expert tensors
# (conversion/qwen.py Qwen2MoeModel / Qwen3MoeModel, llama.py LlamaModel for Mixtral, olmo.py OlmoeModel)
GGUF_EXPERT_ARCHS = frozenset({"llama", "qwen2moe", "qwen3moe", "olmoe"})
# fused parameter -> the GGUF expert tensors (MODEL_TENSOR members) its output rows split into,
# in row order and in equal parts (gate_up_proj is [gate; up], as transformers concatenates them)
GGUF_EXPERT_TENSORS = {
    "gate_up_proj": ("FFN_GATE_EXP", "FFN_UP_EXP"),
    "down_proj": ("FFN_DOWN_EXP",),
}
# the fused parameter's module name in transformers 5 for every architecture above (reading without a base)
GGUF_EXPERT_MODULE = "model.layers.{bid}.mlp.experts.{param}"
# model_type -> why llama.cpp cannot hold that architecture's expert LoRA (refusal messages)
GGUF_EXPERT_REFUSALS = {
    "gpt_oss": "gpt-oss stores its experts fused (E, in, out) with gate and up interleaved, so there is no "
               "per-expert PEFT form, and llama.cpp's convert_lora_to_gguf.py converts only per-expert pairs",
}


def gguf_expert_kinds() -> dict[str, tuple[str, int]]:
    """GGUF expert tensor kind (``FFN_GATE_EXP``) -> (fused parameter, its part index)."""
    return {kind: (param, i) for param, kinds in GGUF_EXPERT_TENSORS.items() for i, kind in enumerate(kinds)}


def gguf_expert_names(module: str) -> list[str] | None:
    """GGUF base names (``blk.3.ffn_gate_exps``...) of a fused experts parameter, in row order; None
    when the parameter has no llama.cpp expert tensor or the name has no block index."""
    import gguf

    kinds = GGUF_EXPERT_TENSORS.get(leaf(module))
    bid = layer_index(module)
    if kinds is None or bid is None or not module.endswith(f".experts.{leaf(module)}"):
        return None
    return [gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, k)].format(bid=bid) for k in kinds]


def gguf_arch_for_config(config: Mapping) -> GGUFArch:
    """The llama.cpp architecture of a transformers config.

    Raises:
        UnsupportedError: an architecture loratool cannot name in GGUF.
    """
    archs = list(config.get("architectures") or [])
    for a in archs:
        if a in GGUF_ARCHITECTURES:
            return GGUF_ARCHITECTURES[a]
    mt = config.get("model_type")
    if not archs and mt in _MODEL_TYPES:
        return GGUF_ARCHITECTURES[_MODEL_TYPES[mt]]
    what = archs[0] if archs else (mt or "unknown")
    raise UnsupportedError(
        f"GGUF: architecture {what} is not supported (supported: {', '.join(sorted(set(GGUF_ARCHITECTURES)))})"
    )


def gguf_arch_by_name(name: str) -> GGUFArch:
    """The description of a GGUF ``general.architecture`` value.

    Raises:
        UnsupportedError: an architecture without a known HF naming.
    """
    if name not in _GGUF_BY_NAME:
        raise UnsupportedError(f"GGUF architecture {name!r} has no known transformers naming here; pass --base")
    return _GGUF_BY_NAME[name]


@lru_cache(maxsize=32)
def _tensor_map(arch_name: str, n_blocks: int):
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_tensor_name(module: str, arch: GGUFArch, n_blocks: int) -> str | None:
    """The GGUF base name (``blk.0.attn_q``) of an HF module, as gguf's TensorNameMap gives it; None if unmapped."""
    idx = layer_index(module)
    blocks = max(n_blocks, (idx + 1) if idx is not None else 0)
    return _tensor_map(arch.name, blocks).get_name(module)


@lru_cache(maxsize=1)
def _gguf_name_patterns() -> list[tuple[re.Pattern, str]]:
    import gguf

    out = []
    for tensor, template in gguf.TENSOR_NAMES.items():
        rx = re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
        out.append((re.compile(rf"^{rx}$"), tensor.name))
    return out


def gguf_tensor_kind(gguf_name: str) -> tuple[str, int | None] | None:
    """(MODEL_TENSOR member name, block index) of a GGUF base name like ``blk.3.attn_q``."""
    for rx, tname in _gguf_name_patterns():
        m = rx.match(gguf_name)
        if m:
            bid = m.groupdict().get("bid")
            return tname, int(bid) if bid is not None else None
    return None


def hf_module_name(gguf_name: str, arch: GGUFArch) -> str | None:
    """The transformers module name for a GGUF base name (``blk.0.attn_q`` -> ``model.layers.0.self_attn.q_proj``)."""
    kind = gguf_tensor_kind(gguf_name)
    if kind is None:
        return None
    tname, bid = kind
    template = _HF_TEMPLATES[arch.templates].get(tname)
    if template is None:
        return None
    return template.format(bid=bid) if "{bid}" in template else template


def hf_templates(arch: GGUFArch) -> dict[str, str]:
    """The MODEL_TENSOR name -> HF module template table used by ``hf_module_name`` (for tests)."""
    return dict(_HF_TEMPLATES[arch.templates])
