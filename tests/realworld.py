"""Random-weight bases of the real shape for the adapters in ../shared/realworld.

None of the real bases can be downloaded here; the adapter math does not depend on the base
weights, so a random model of the same config is enough to merge, verify and convert.
"""

from __future__ import annotations

from pathlib import Path

import torch

REALWORLD = Path(__file__).resolve().parent.parent.parent / "shared" / "realworld"

# .ci/run sets this: in CI the real adapters are part of the suite, and their absence is a failure
REQUIRE_ENV = "LORATOOL_REQUIRE_REALWORLD"
MISSING_REASON = (
    f"needs the real adapters published by others in {REALWORLD} (a checkout of the project's shared/ "
    f"folder beside the clone; CI has it and sets {REQUIRE_ENV}=1 to require them)"
)


def realworld_available() -> bool:
    """Whether ../shared/realworld is beside this clone (it holds a README and one folder per adapter)."""
    return (REALWORLD / "README.md").is_file()


def _gpt2(n_layer=12, **kw):
    from transformers import GPT2Config

    return GPT2Config(n_embd=768, n_layer=n_layer, n_head=12, vocab_size=50257, n_positions=1024, **kw)


def _bert(**kw):
    from transformers import BertConfig

    return BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522, **kw)


def _distilbert(**kw):
    from transformers import DistilBertConfig

    return DistilBertConfig(dim=768, n_layers=6, n_heads=12, hidden_dim=3072, vocab_size=30522, **kw)


def _roberta(**kw):
    from transformers import RobertaConfig

    return RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, **kw)


def _opt(**kw):
    from transformers import OPTConfig

    return OPTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, vocab_size=50272, word_embed_proj_dim=768, **kw)


def _qwen25(**kw):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, **kw,
    )


# folder -> (config factory, task: "causal" | "seqcls" | "base")
REALWORLD_BASES = {
    "gpt2-anirudh": (lambda: _gpt2(num_labels=6, pad_token_id=50256), "seqcls"),
    "gpt2-stathopoan": (lambda: _gpt2(num_labels=6, pad_token_id=50256), "seqcls"),
    "gpt2-r4-sukhmandhawan": (lambda: _gpt2(num_labels=10, pad_token_id=50256), "seqcls"),
    "gpt2-tigrinya": (lambda: _gpt2(), "causal"),
    "gpt2-begreat-bin": (lambda: _gpt2(), "causal"),
    "distilgpt2-shahid": (lambda: _gpt2(n_layer=6), "causal"),
    "bert-hareshjethani": (lambda: _bert(num_labels=2), "seqcls"),
    "distilbert-imdb-tashu": (lambda: _distilbert(num_labels=2), "seqcls"),
    "distilbert-emotion-dayanidhi": (lambda: _distilbert(num_labels=6), "seqcls"),
    "distilbert-sidkris-bin": (lambda: _distilbert(num_labels=2), "seqcls"),
    "opt125m-yjhorion": (lambda: _opt(), "causal"),
    "qwen25-05b-muzammel": (lambda: _qwen25(), "causal"),
    "mlx-qwen25-05b-wyek1n": (lambda: _qwen25(), "causal"),
    "montinger-roberta-scratch": (lambda: _roberta(num_labels=2), "base"),
}

PEFT_REALWORLD = [n for n in REALWORLD_BASES if n not in ("mlx-qwen25-05b-wyek1n", "montinger-roberta-scratch")]


def model_class(task: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal": AutoModelForCausalLM, "seqcls": AutoModelForSequenceClassification, "base": AutoModel}[task]


def build_model(name: str, *, device: str | None = None, seed: int = 0):
    """The random model of the real config (``device="meta"`` builds it without memory)."""
    factory, task = REALWORLD_BASES[name]
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return model_class(task).from_config(factory())
    return model_class(task).from_config(factory())


def save_base(name: str, folder: Path, *, dtype=torch.float32, seed: int = 0) -> Path:
    """Save a random base of the real shape for ``name`` to ``folder`` (transformers layout)."""
    model = build_model(name, seed=seed).to(dtype)
    model.save_pretrained(folder)
    return folder
