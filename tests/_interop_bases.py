"""Tiny random bases a serving engine can load whole, and adapters for them (tests/test_interop_engines.py).

llama.cpp's ``convert_hf_to_gguf.py`` needs a tokenizer next to the weights; the fixture bases have
none. Every base here gets the same tiny SentencePiece model, trained here from a few fixed lines
(the engines are fed token ids, so only its presence and format matter): ``tokenizer.model``, a
100-piece BPE vocabulary (with ``<|endoftext|>``, which llama.cpp looks up for Phi-3) that the
converters pad to the model's 256 ids.

Architectures: ``llama`` (GQA) and ``qwen2`` (tied head, q/k/v biases) are copies of the fixture
bases; ``phi3`` (fused ``qkv_proj`` / ``gate_up_proj``) and ``gemma`` (tied head, (1 + w) norms,
scaled embeddings) are made with transformers from a seeded random init at the fixtures' size.
"""

from __future__ import annotations

import io
import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from conftest import BASES

ARCHS = ("llama", "qwen2", "phi3", "gemma")
LINEAR = {  # the modules each architecture's adapters here adapt
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
_SIZE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "bos_token_id": 1,
         "eos_token_id": 2, "pad_token_id": 0}


@lru_cache(maxsize=1)
def tokenizer_model() -> bytes:
    """A serialized SentencePiece model (BPE, 100 pieces: <unk> <s> </s> and merges of the lines below)."""
    import sentencepiece as spm

    lines = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
    lines += ["Lorem ipsum dolor sit amet, consectetur adipiscing elit 0123456789"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=100, model_type="bpe",
                                   character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
                                   user_defined_symbols=["<|endoftext|>"])  # llama.cpp's Phi-3 vocabulary needs it
    return buf.getvalue()


def make_base(arch: str, dest: Path, *, head_dim: int = 16) -> Path:
    """A tiny random ``arch`` base in ``dest`` (safetensors, config.json, tokenizer.model).

    ``head_dim``: 16 is the fixtures' shape (llama and qwen2 are then the fixture bases themselves);
    vLLM's CPU attention needs 32 or more (hidden size 4 x head_dim, MLP 8 x head_dim).
    """
    dest = Path(dest)
    if arch in ("llama", "qwen2") and head_dim == 16:
        shutil.copytree(BASES / arch, dest)
    else:
        import transformers

        size = dict(_SIZE, hidden_size=4 * head_dim, intermediate_size=8 * head_dim)
        if arch == "llama":
            config = transformers.LlamaConfig(**size, head_dim=head_dim, tie_word_embeddings=False)
        elif arch == "qwen2":
            config = transformers.Qwen2Config(**size, tie_word_embeddings=True)
        elif arch == "phi3":
            config = transformers.Phi3Config(**size, original_max_position_embeddings=128, tie_word_embeddings=False)
        elif arch == "gemma":
            config = transformers.GemmaConfig(**size, head_dim=head_dim, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
        else:
            raise ValueError(arch)
        torch.manual_seed(20)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # norms away from 1 (0 for Gemma's 1 + w), so a wrong norm convention shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand_like(p) * 0.5 + (0.0 if arch == "gemma" else 0.75))
        model.save_pretrained(dest)
    (dest / "tokenizer.model").write_bytes(tokenizer_model())
    (dest / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>"}))
    return dest


def make_adapter(arch: str, base: Path, dest: Path, *, rslora: bool = True, rank: int = 4, dora: bool = False,
                 decay: float = 1.0) -> Path:
    """A PEFT LoRA (or DoRA) on every module of ``LINEAR[arch]``, seeded random A, B (and magnitudes off ||W||).

    ``decay``: row i of every lora_A is scaled by decay**i, so that the delta's spectrum falls off
    and a truncation to a lower rank loses little (a rank limit's fix, with a small reported error).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LINEAR[arch]), use_rslora=rslora,
                     use_dora=dora, init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_A" in name else 0.02))
                if "lora_A" in name:
                    p.mul_(decay ** torch.arange(p.shape[0], dtype=p.dtype)[:, None])
        for mod in pm.modules():  # DoRA: magnitudes 2% off the row norms of W + dW (PEFT's start is exactly them)
            if "default" in getattr(mod, "lora_magnitude_vector", {}):
                W = mod.get_base_layer().weight + mod.get_delta_weight("default")
                m = mod.lora_magnitude_vector["default"].weight
                m.copy_(W.norm(dim=1).reshape(m.shape) * (1 + 0.02 * torch.randn(m.shape, generator=gen)))
    pm.save_pretrained(dest)
    return Path(dest)
