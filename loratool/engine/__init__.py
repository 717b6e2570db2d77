"""The engine: one stream per base tensor, shared by merge, unmerge, verify and quantized merges.

    TensorSource.rows  ->  codec decode  ->  float32 row blocks
        + the delta terms that target the tensor (engine.delta: LoRA in its layouts, DoRA, bias)
        ->  codec encode  ->  the model writer (shards, index, side files, config patch)

See docs/architecture.md.
"""
