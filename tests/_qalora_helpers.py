"""Synthetic GPTQ checkpoints and QA-LoRA adapters, and PEFT's QA-LoRA layer as an oracle.

No GPTQ kernel is needed: ``TorchQuantLinear`` dequantizes with loratool's pure-torch
unpacker, and PEFT's ``GPTQLoraLinear`` wraps it (PEFT takes any module with
``infeatures``/``outfeatures`` as a quantized linear) to run PEFT's own QA-LoRA forward.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import BASES
from loratool.engine.codecs import gptq as G

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def act_order_g_idx(in_features: int, group_size: int, seed: int = 0) -> torch.Tensor:
    """A desc_act-style g_idx: inputs taken in a random order, groups of ``group_size`` in that order."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(in_features, generator=gen)
    g = torch.empty(in_features, dtype=torch.int32)
    g[perm] = (torch.arange(in_features) // group_size).to(torch.int32)
    return g


def quantize_layer(weight: torch.Tensor, *, bits: int, group_size: int, sym: bool, zero_format: str, act_order: bool = False, seed: int = 0):
    g_idx = act_order_g_idx(weight.shape[1], group_size, seed) if act_order else None
    return G.quantize_rtn(weight, bits, group_size=group_size, sym=sym, g_idx=g_idx, zero_format=zero_format)


def make_gptq_folder(
    dst: Path,
    *,
    bits: int = 4,
    group_size: int = 16,
    sym: bool = False,
    zero_format: str = "v1",
    act_order: bool = False,
    targets=LLAMA_TARGETS,
    config_in: str = "config",  # "config" (quantization_config) or "quantize_config" (AutoGPTQ file)
    write_g_idx: bool = True,
    weights: str = "safetensors",  # "safetensors", "bin" or "sharded"
    format_key: str = "checkpoint_format",
) -> Path:
    """A GPTQ checkpoint of the llama fixture, its target linears quantized round-to-nearest."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    src = BASES / "llama"
    sd = load_file(src / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for i, (key, t) in enumerate(sorted(sd.items())):
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in targets:
            q = quantize_layer(t, bits=bits, group_size=group_size, sym=sym, zero_format=zero_format, act_order=act_order, seed=i)
            out[f"{module}.qweight"] = q["qweight"]
            out[f"{module}.qzeros"] = q["qzeros"]
            out[f"{module}.scales"] = q["scales"]
            if write_g_idx:
                out[f"{module}.g_idx"] = q["g_idx"]
        else:
            out[key] = t.to(torch.float16)
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
            format_key: "gptq" if zero_format == "v1" else "gptq_v2"}
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "float16"
    if config_in == "config":
        config["quantization_config"] = qcfg
    else:
        (dst / "quantize_config.json").write_text(json.dumps({k: v for k, v in qcfg.items() if k != "quant_method"}))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    if weights == "safetensors":
        save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(out, dst / "pytorch_model.bin")
    else:
        keys = sorted(out)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        weight_map = {}
        for name, ks in shards.items():
            save_file({k: out[k] for k in ks}, dst / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in ks})
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def make_qalora_adapter(
    dst: Path,
    *,
    convention: str = "peft",  # "peft" (use_qalora) or "original" (no use_qalora)
    pool_size: int = 16,
    r: int = 4,
    alpha: float = 8,
    targets=("q_proj", "v_proj", "down_proj"),
    seed: int = 0,
    extra_config: dict | None = None,
    extra_tensors: dict | None = None,
) -> Path:
    """A QA-LoRA adapter for the llama fixture: lora_A (r, in / Lp), lora_B (out, r), both random."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    cfg = json.loads((BASES / "llama" / "config.json").read_text())
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            in_f, out_f = dims[t]
            part = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, in_f // pool_size, generator=gen) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.1
    tensors.update(extra_tensors or {})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
              "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
    if convention == "peft":
        config.update(use_qalora=True, qalora_group_size=pool_size)
    config.update(extra_config or {})
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


class TorchQuantLinear(nn.Module):
    """A GPTQ linear computed by dequantizing with loratool's reference unpacker (no kernels)."""

    def __init__(self, qweight, zeros, scales, g_idx, bits, bias=None):
        super().__init__()
        self.bits = bits
        self.infeatures = g_idx.numel()
        self.outfeatures = scales.shape[1]
        self.qweight, self.zeros, self.scales, self.g_idx, self.bias = qweight, zeros, scales, g_idx, bias

    def forward(self, x):
        w = G.dequantize(self.qweight, self.zeros, self.scales, self.g_idx, self.bits, dtype=x.dtype)
        y = x @ w.T
        return y if self.bias is None else y + self.bias.to(x.dtype)


def peft_qalora_layer(base_layer: nn.Module, A: torch.Tensor, B: torch.Tensor, *, r: int, alpha: float, pool_size: int,
                      dtype=torch.float64, rslora: bool = False):
    """PEFT's GPTQLoraLinear with the QA-LoRA variant around ``base_layer``, factors loaded."""
    from peft import LoraConfig
    from peft.tuners.lora.gptq import GPTQLoraLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, use_qalora=True, qalora_group_size=pool_size, target_modules=["x"], use_rslora=rslora)
    layer = GPTQLoraLinear(base_layer, "default", config=cfg, r=r, lora_alpha=alpha)
    layer.lora_A["default"].to(dtype)
    layer.lora_B["default"].to(dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.eval()
    return layer
