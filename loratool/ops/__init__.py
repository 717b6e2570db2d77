"""Pure tensor operations on canonical adapters: rank surgery, quantization, GPTQ/QA-LoRA math.

The LoRA delta itself (merge, unmerge, verify, retention) is computed in ``loratool.engine.delta``.
"""
