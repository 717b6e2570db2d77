"""Benchmark: merging LoRA on fused MoE experts, one Qwen3-30B-A3B-shaped layer (128 experts).

    python bench/bench_moe.py [--experts 128] [--workdir /tmp/loratool-bench-moe]

The base is one decoder layer shaped like Qwen3-30B-A3B (hidden 2048, 32 heads / 4 KV heads of 128,
128 experts of moe_intermediate 768, a 1024-token vocabulary to keep the embedding out of the way),
random bf16, in two layouts: ``per-expert`` (experts.<e>.gate_proj/up_proj/down_proj, as
transformers 5 saves Qwen3-MoE) and ``fused`` (mlp.experts.gate_up_proj (128, 1536, 2048) and
down_proj (128, 2048, 768), as the model holds them). The adapter is PEFT's target_parameters layout,
r=16 on gate_up_proj and down_proj plus q/k/v/o. Reported, for ``merge`` and then ``verify``: wall time,
peak RssAnon (sampled every 10 ms over the process tree) and the size of one fused tensor, against
which the peak must stay flat.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_merge import measure  # noqa: E402

H, HEADS, KV, HEAD_DIM, I, VOCAB, R = 2048, 32, 4, 128, 768, 1024, 16
PREFIX = "model.layers.0"


def config(experts: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H, "num_hidden_layers": 1,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM, "intermediate_size": 6144,
        "moe_intermediate_size": I, "num_experts": experts, "num_experts_per_tok": 8, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "bfloat16",
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    }


def base_tensors(experts: int, fused: bool):
    """(name, shape) of the layer, the experts per expert or fused."""
    yield "model.embed_tokens.weight", (VOCAB, H)
    for leaf, shape in (("q_proj", (HEADS * HEAD_DIM, H)), ("k_proj", (KV * HEAD_DIM, H)), ("v_proj", (KV * HEAD_DIM, H)),
                        ("o_proj", (H, HEADS * HEAD_DIM))):
        yield f"{PREFIX}.self_attn.{leaf}.weight", shape
    yield f"{PREFIX}.self_attn.q_norm.weight", (HEAD_DIM,)
    yield f"{PREFIX}.self_attn.k_norm.weight", (HEAD_DIM,)
    yield f"{PREFIX}.mlp.gate.weight", (experts, H)
    if fused:
        yield f"{PREFIX}.mlp.experts.gate_up_proj", (experts, 2 * I, H)
        yield f"{PREFIX}.mlp.experts.down_proj", (experts, H, I)
    else:
        for e in range(experts):
            for leaf, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                yield f"{PREFIX}.mlp.experts.{e}.{leaf}.weight", shape
    yield f"{PREFIX}.input_layernorm.weight", (H,)
    yield f"{PREFIX}.post_attention_layernorm.weight", (H,)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (VOCAB, H)


def make_base(folder: Path, experts: int, fused: bool) -> None:
    from loratool.io.writer import SafetensorsStreamWriter

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config(experts), indent=2))
    specs = list(base_tensors(experts, fused))
    gen = torch.Generator().manual_seed(0)
    with SafetensorsStreamWriter(folder / "model.safetensors", [(n, torch.bfloat16, s) for n, s in specs], {"format": "pt"}) as w:
        for name, shape in specs:
            if len(shape) == 1:
                w.write(name, torch.ones(shape, dtype=torch.bfloat16))
            elif len(shape) == 3:  # one expert at a time: the generator never holds a fused tensor
                w.begin(name)
                for _ in range(shape[0]):
                    w.part((torch.randn(shape[1:], generator=gen) * 0.02).to(torch.bfloat16))
                w.end(name)
            else:
                w.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))


def make_adapter(folder: Path, experts: int) -> None:
    """PEFT's target_parameters layout: down_proj outermost, gate_up_proj under base_layer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    sd = {}

    def pair(path, r_rows, in_f, out_f):
        sd[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r_rows, in_f, generator=gen) / math.sqrt(in_f)
        sd[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out_f, r_rows, generator=gen) * 0.01

    for leaf, (out_f, in_f) in (("q_proj", (HEADS * HEAD_DIM, H)), ("k_proj", (KV * HEAD_DIM, H)), ("v_proj", (KV * HEAD_DIM, H)),
                                ("o_proj", (H, HEADS * HEAD_DIM))):
        pair(f"{PREFIX}.self_attn.{leaf}", R, in_f, out_f)
    pair(f"{PREFIX}.mlp.experts.base_layer", R * experts, H, 2 * I)  # gate_up_proj: (E, 2I, H)
    pair(f"{PREFIX}.mlp.experts", R * experts, I, H)  # down_proj: (E, H, I)
    save_file(sd, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 2 * R, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "fan_in_fan_out": False,
        "base_model_name_or_path": "bench/qwen3-30b-a3b-layer", "use_rslora": False, "use_dora": False,
    }, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench-moe"))
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    adapter = work / "adapter"
    make_adapter(adapter, args.experts)
    fused_bytes = args.experts * 2 * I * H * 2  # gate_up_proj in bf16
    rows = []
    for layout in ("per-expert", "fused"):
        base = work / f"base-{layout}"
        make_base(base, args.experts, layout == "fused")
        subprocess.run(["sync"], check=True)
        out = work / "merged"
        merge = measure([sys.executable, "-m", "loratool", "merge", str(base), str(adapter), str(out), "--quiet"])
        check = measure([sys.executable, "-m", "loratool", "verify", str(base), str(adapter), str(out), "--quiet"])
        size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
        rows.append({"layout": layout, "base_bytes": size, "merge": merge, "verify": check})
        shutil.rmtree(out)
        shutil.rmtree(base)
    print(f"\none Qwen3-30B-A3B-shaped layer, {args.experts} experts; one fused gate_up_proj = {fused_bytes / 2**20:.0f} MiB bf16\n")
    print("| layout | base MiB | step | wall s | peak RssAnon MiB | peak / one fused tensor |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for step in ("merge", "verify"):
            m = r[step]
            print(f"| {r['layout']} | {r['base_bytes'] / 2**20:.0f} | {step} | {m['wall_s']} | {m['peak_rss_anon_mib']} | "
                  f"{m['peak_rss_anon_mib'] * 2**20 / fused_bytes:.2f} |")
    (work / "moe.json").write_text(json.dumps({"experts": args.experts, "fused_bytes": fused_bytes, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
