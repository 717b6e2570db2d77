"""Run inside the LitGPT environment that .ci/interop prepares (not imported by the tests).

    python _litgpt_logits.py convert HF_BASE LIT_DIR ARCH
    python _litgpt_logits.py logits LIT_DIR LORA_DIR|- IDS_JSON OUT.npy
    python _litgpt_logits.py train LIT_DIR OUT_DIR SEED HEAD IDS_JSON OUT.npy

convert: LitGPT's own ``convert_hf_checkpoint`` (what ``litgpt convert_to_litgpt`` runs) turns the
Hugging Face base into ``LIT_DIR/lit_model.pth`` + ``model_config.yaml``. A tiny random base has no
entry in LitGPT's config list, so one is registered first, named so that LitGPT picks the weight
copier of the architecture (``Phi-3...`` splits gate_up_proj, ``Qwen2.5...`` keeps the q/k/v biases
and ties the head, ``Gemma...`` gets the (1 + w) norms), with the base's sizes.

logits: LitGPT's LoRA model (``litgpt.lora.GPT``, its Config from ``model_config.yaml`` and the
adapter's ``hyperparameters.yaml``) with the base and ``lit_model.pth.lora`` loaded, evaluated
unmerged and again after LitGPT's ``merge_lora_weights``; saves the unmerged logits (len(ids), vocab)
float32 and fails if the merged ones differ by more than float32 rounding.

train: LitGPT's own code writes an adapter: the LoRA model on every module LitGPT adapts (q, k, v,
projection, MLP, and the head when HEAD is 1), its LoRA factors set from SEED (LitGPT starts B at zero), saved as
``litgpt finetune lora`` does (``{"model": state_dict filtered by lora_filter}``, LitGPT's
``save_config``, the lora_* hyperparameters); saves that model's logits.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_query", "lora_key", "lora_value", "lora_projection",
             "lora_mlp", "lora_head")
NAMES = {"llama": "loratool-tiny-llama", "qwen2": "Qwen2.5-loratool-tiny", "phi3": "Phi-3-loratool-tiny",
         "gemma": "Gemma-loratool-tiny"}


def _tiny_config(hf: dict, arch: str) -> dict:
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    return {
        "name": NAMES[arch], "hf_config": {"org": "loratool", "name": NAMES[arch]}, "vocab_size": hf["vocab_size"],
        "padded_vocab_size": hf["vocab_size"], "block_size": hf["max_position_embeddings"],
        "n_layer": hf["num_hidden_layers"], "n_head": heads, "n_query_groups": hf.get("num_key_value_heads") or heads,
        "n_embd": hf["hidden_size"], "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
        "rotary_percentage": 1.0, "parallel_residual": False, "bias": False, "attn_bias": arch == "qwen2",
        "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP", "intermediate_size": hf["intermediate_size"],
        "norm_eps": hf["rms_norm_eps"], "rope_base": int(rope.get("rope_theta", hf.get("rope_theta", 10000))),
        # Gemma (as LitGPT's own Gemma-2b entry): GeGLU, embeddings scaled by sqrt(n_embd); "Gemma" in the
        # name gives its RMSNorm the unit offset (1 + w)
        **({"mlp_class_name": "GemmaMLP", "gelu_approximate": "tanh", "scale_embeddings": True} if arch == "gemma" else {}),
    }


def convert(hf_base: str, lit_dir: str, arch: str) -> None:
    import litgpt.config
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    out = Path(lit_dir)
    shutil.copytree(hf_base, out)
    cfg = _tiny_config(json.loads((out / "config.json").read_text()), arch)
    litgpt.config.configs.append(cfg)
    litgpt.config.name_to_config[cfg["name"]] = cfg
    convert_hf_checkpoint(checkpoint_dir=out, model_name=cfg["name"])
    assert (out / "lit_model.pth").is_file() and (out / "model_config.yaml").is_file()


def _model(lit_dir: Path, hparams: dict):
    from litgpt.lora import GPT, Config

    config = Config.from_file(lit_dir / "model_config.yaml", **{k: v for k, v in hparams.items() if k in LORA_KEYS})
    model = GPT(config)
    missing, unexpected = model.load_state_dict(torch.load(lit_dir / "lit_model.pth", weights_only=True), strict=False)
    assert not unexpected and all("lora_" in k for k in missing), (missing, unexpected)
    return model.eval()


def _forward(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def logits(lit_dir: str, lora: str, ids_json: str, out: str) -> None:
    from litgpt.lora import merge_lora_weights

    ids = json.loads(ids_json)
    if lora == "-":
        hparams = {"lora_r": 0}
    else:
        hparams = yaml.safe_load((Path(lora) / "hyperparameters.yaml").read_text())
    model = _model(Path(lit_dir), hparams)
    if lora != "-":
        state = torch.load(Path(lora) / "lit_model.pth.lora", weights_only=True)["model"]
        _, unexpected = model.load_state_dict(state, strict=False)
        lora_params = {k for k, _ in model.named_parameters() if "lora_" in k}
        assert not unexpected and lora_params == set(state), (sorted(lora_params ^ set(state))[:8], unexpected)
    got = _forward(model, ids)
    if lora != "-":
        merge_lora_weights(model)
        merged = _forward(model, ids)
        assert float((merged - got).abs().max()) <= 1e-4 * max(1.0, float(got.abs().max())), "merged != unmerged"
    np.save(out, got.numpy())


def train(lit_dir: str, out_dir: str, seed: str, head: str, ids_json: str, out: str) -> None:
    from litgpt.lora import lora_filter
    from litgpt.utils import save_config

    hparams = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_query": True, "lora_key": True,
               "lora_value": True, "lora_projection": True, "lora_mlp": True, "lora_head": head == "1"}
    model = _model(Path(lit_dir), hparams)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_A" in name else 0.02))
    dest = Path(out_dir)
    dest.mkdir(parents=True)
    torch.save({"model": {k: v for k, v in model.state_dict().items() if lora_filter(k, v)}}, dest / "lit_model.pth.lora")
    save_config(model.config, dest)
    (dest / "hyperparameters.yaml").write_text(yaml.safe_dump({"checkpoint_dir": str(lit_dir), **hparams}))
    np.save(out, _forward(model, json.loads(ids_json)).numpy())


if __name__ == "__main__":
    torch.manual_seed(0)
    {"convert": convert, "logits": logits, "train": train}[sys.argv[1]](*sys.argv[2:])
