"""Run inside the SGLang environment that .ci/interop prepares (not imported by the tests).

    python _sglang_lora.py ADAPTER BASE MAX_RANK OUT.npz

SGLang's serving engine needs its CUDA kernels (sgl-kernel), so it cannot start here; its LoRA code
path up to the GEMMs is plain Python and torch, and this runs that code from the installed wheel:

1. ``LoRAConfig(ADAPTER)``: how SGLang reads the adapter's config (r, lora_alpha, use_dora...).
2. ``LoRAManager.validate_new_adapter``, SGLang's admission check, with ``LoRAMemoryPool.can_support``
   (the rank limit ``--max-lora-rank`` = MAX_RANK, the target modules of a Llama-family model) on a
   stand-in for the manager (its other checks need a running server: nothing loaded, nothing pinned).
3. ``LoRAAdapter.initialize_weights``: SGLang's own weight loading (``DefaultModelLoader``) and its
   normalization (q/k/v stacked into qkv_proj, gate/up into gate_up_proj), with its scaling
   ``lora_alpha / r``.
4. The torch-native backend's kernels (``torch_ops.sgemm_lora_a_fwd`` / ``sgemm_lora_b_fwd``, what
   ``TorchNativeLoRABackend.run_qkv_lora`` / ``run_gate_up_lora`` / ``run_lora_*_sgemm`` call) applied to
   the identity: the delta SGLang adds to each (fused) weight, (out, in).

OUT.npz: ``validate`` (why SGLang refuses the adapter, at admission or while loading it; empty when it
serves it) and one delta per module, named as SGLang names it (``model.layers.0.self_attn.qkv_proj``).
"""

import sys
import types

import numpy as np
import torch


def _admission(config, max_rank: int) -> str:
    from sglang.srt.lora.lora_manager import LoRAManager
    from sglang.srt.lora.lora_registry import LoRARef
    from sglang.srt.lora.mem_pool import LoRAMemoryPool

    pool = types.SimpleNamespace(max_lora_rank=max_rank, lora_added_tokens_size=0,
                                 target_modules={"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})
    pool.can_support = lambda c: LoRAMemoryPool.can_support(pool, c)
    manager = types.SimpleNamespace(attn_dp_enabled=False, lora_refs={}, memory_pool=pool, num_pinned_loras=0,
                                    max_loras_per_batch=8)
    try:
        LoRAManager.validate_new_adapter(manager, config, LoRARef(lora_name="a", lora_path=config.path))
    except ValueError as exc:
        return str(exc)
    return ""


def _deltas(adapter, config, sizes: dict) -> dict:
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABatchInfo

    backend = adapter.lora_backend
    out = {}
    for layer in adapter.layers:
        for name, A in layer.weights.items():
            if "lora_A" not in name:
                continue
            B = layer.weights[name.replace("lora_A", "lora_B")]
            module = name.split("base_model.model.", 1)[-1].rsplit(".lora_A", 1)[0]
            kind = module.rsplit(".", 1)[-1]
            parts = sizes.get(kind, [B.shape[0]])
            offsets = torch.tensor([0, *np.cumsum(parts).tolist()])
            n = A.shape[1]
            x = torch.eye(n, dtype=torch.float32)  # (in, in): row i is the basis input e_i
            # one request of n tokens on adapter slot 0 (what prepare_lora_batch builds for it)
            backend.batch_info = TorchNativeLoRABatchInfo(
                use_cuda_graph=False, bs=1, num_segments=1, seg_indptr=torch.tensor([0, n]), weight_indices=torch.tensor([0]),
                lora_ranks=torch.tensor([config.r]), scalings=torch.tensor([adapter.scaling]), max_len=n,
                seg_lens=torch.tensor([n]), lora_ranks_cpu=torch.tensor([config.r]), seg_indptr_cpu=torch.tensor([0, n]),
                seg_lens_cpu=torch.tensor([n]), weight_indices_cpu=torch.tensor([0]),
                scalings_cpu=torch.tensor([adapter.scaling], dtype=torch.float32))
            A3, B3 = A.float()[None], B.float()[None]  # the memory pool's slot 0: (1, slices * r, in), (1, out, r)
            if kind == "qkv_proj":
                y = backend.run_qkv_lora(x, A3, B3, offsets, offsets, max(parts))
            elif kind == "gate_up_proj":
                y = backend.run_gate_up_lora(x, A3, B3, offsets)
            else:
                y = backend.run_lora_b_sgemm(backend.run_lora_a_sgemm(x, A3), B3, offsets)
            out[module] = y.T.numpy()  # (out, in): column i is dW e_i
    return out


def main(adapter_dir: str, base_dir: str, max_rank: str, out: str) -> None:
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABackend
    from sglang.srt.lora.lora import LoRAAdapter
    from sglang.srt.lora.lora_config import LoRAConfig
    from transformers import AutoConfig

    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    # the server's settings as `--device cpu --enable-lora --lora-backend torch_native --max-lora-rank R`
    set_global_server_args_for_scheduler(ServerArgs(model_path=base_dir, device="cpu", enable_lora=True,
                                                    lora_backend="torch_native", max_lora_rank=int(max_rank)))
    config = LoRAConfig(adapter_dir)
    error = _admission(config, int(max_rank))
    result = {}
    if not error:  # an adapter refused at admission is never loaded
        hf = AutoConfig.from_pretrained(base_dir)
        head = hf.head_dim if getattr(hf, "head_dim", None) else hf.hidden_size // hf.num_attention_heads
        kv = head * (hf.num_key_value_heads or hf.num_attention_heads)
        sizes = {"qkv_proj": [head * hf.num_attention_heads, kv, kv], "gate_up_proj": [hf.intermediate_size] * 2}
        adapter = LoRAAdapter("a", config, hf, LoadConfig(), TorchNativeLoRABackend(1, torch.device("cpu")))
        try:
            adapter.initialize_weights()
            _fits_the_pool(adapter, config, sizes)
        except (RuntimeError, AssertionError, ValueError) as exc:  # the load request fails
            error = f"load failed: {type(exc).__name__}: {exc}"
        else:
            result.update(_deltas(adapter, config, sizes))
    np.savez(out, validate=np.array(error), **result)


def _fits_the_pool(adapter, config, sizes: dict) -> None:
    """The memory pool's copy of each module into its slot (``mem_pool.py``
    ``LoRAMemoryPool.load_lora_weight_to_buffer``: ``buffer[slot, : r * c, :]`` for lora_A and
    ``buffer[slot, :, :r]`` for lora_B, r = the config's ``r``, c = the stacked parts) asserts that the
    shapes match; the pool itself allocates device buffers for a whole model, so its assertion is
    restated here with its message."""
    for layer in adapter.layers:
        for name, w in layer.weights.items():
            c = len(sizes.get(name.split(".lora_")[0].rsplit(".", 1)[-1], [0]))
            rows, cols = (config.r * c, w.shape[1]) if "lora_A" in name else (w.shape[0], config.r)
            assert tuple(w.shape) == (rows, cols), f"LoRA buffer shape {(rows, cols)} does not match weight shape {tuple(w.shape)}."


if __name__ == "__main__":
    main(*sys.argv[1:])
