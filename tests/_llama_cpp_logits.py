"""Run inside the llama-cpp-python environment that .ci/interop builds (not imported by the tests).

    python _llama_cpp_logits.py BASE.gguf LORA.gguf|- IDS_JSON OUT.npy

Loads the GGUF base (and the GGUF LoRA, applied at scale 1 by llama.cpp's own adapter code),
evaluates the token ids in one batch and saves the logits of every position, float32
(len(ids), vocab). The K/V cache is kept in float32 so that only llama.cpp's arithmetic differs
from PyTorch's.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0


def main(base: str, lora: str, ids_json: str, out: str) -> None:
    ids = json.loads(ids_json)
    llm = Llama(model_path=base, lora_path=None if lora == "-" else lora, logits_all=True, n_ctx=64, n_batch=64,
                n_ubatch=64, n_threads=2, n_threads_batch=2, flash_attn=False, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, verbose=False)
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[: len(ids)], dtype=np.float32))


if __name__ == "__main__":
    main(*sys.argv[1:5])
