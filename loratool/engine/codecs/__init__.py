"""Weight codecs: how a stored weight decodes to float32 rows and encodes back, with its state.

| codec | module | stored as | decode | encode | config.json |
|---|---|---|---|---|---|
| float | ``float.py`` | float16/bfloat16/float32 | cast | round once | ``dtype`` |
| bnb | ``bnb.py`` | NF4/FP4 packed + absmax/quant state; LLM.int8 + SCB | ``decode_stored`` | ``quantize_weight`` | ``quantization_config`` |
| gptq | ``gptq.py`` | qweight/qzeros/scales/g_idx (v1, v2) | ``dequantize`` | ``pack_qzeros`` (QA-LoRA's zero fold) | ``quantization_config`` |

``stored_codec(key, keys)`` names the codec a checkpoint stores ``key`` with. A new scheme (AWQ,
FP8, GGUF quants) is one more module here with the same three answers: how to recognise its
tensors, how to decode them to float32, how to encode float32 back (plus its config patch).
"""

from __future__ import annotations

CODECS = ("float", "bnb", "gptq")


def stored_codec(key: str, keys) -> str:
    """``"bnb"`` or ``"gptq"`` when ``key`` (``M.weight`` / ``M.qweight``) is stored quantized in a
    checkpoint with ``keys`` (a set, or a store), else ``"float"``."""
    from loratool.engine.codecs import bnb

    if bnb.stored_kind(key, keys) is not None:
        return "bnb"
    module = key.rsplit(".", 1)[0]
    if key.endswith(".qweight") and f"{module}.scales" in keys:
        return "gptq"
    return "float"
