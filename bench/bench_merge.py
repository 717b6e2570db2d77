"""Benchmark: `loratool merge` vs `cp -r BASE X && sync` vs the PEFT path, wall time and peak RssAnon.

    python bench/bench_merge.py                      # TinyLlama-1.1B shape (22 layers) and a 44-layer variant
    python bench/bench_merge.py --layers 22 --no-peft --workdir /tmp/bench

The base is a TinyLlama-1.1B-shaped Llama (hidden 2048, intermediate 5632, 32 heads, 4 KV
heads, vocab 32000) with random bf16 weights in 3 safetensors shards; the adapter is an r=16
PEFT LoRA on q/k/v/o/gate/up/down of every layer. Each contender runs in its own process;
its peak anonymous memory (RssAnon, summed over its process tree) is sampled from /proc every
10 ms. Page cache is warm for every contender (the inputs were just written, and `cp` runs
first). Results are printed as a Markdown table and written as JSON to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of LlamaForCausalLM's state dict (untied head)."""
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (kv, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (kv, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def make_base(folder: Path, layers: int, shards: int = 3) -> None:
    """Write the random bf16 base, streaming (never more than one tensor in memory)."""
    from transformers import LlamaConfig

    from loratool.io.writer import SafetensorsStreamWriter

    folder.mkdir(parents=True)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
        rms_norm_eps=1e-5, dtype="bfloat16", architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(folder)
    tensors = llama_tensors(layers)
    total = sum(math.prod(s) * 2 for _, s in tensors)
    groups: list[list] = [[] for _ in range(shards)]
    acc = 0
    for name, shape in tensors:
        groups[min(shards - 1, acc * shards // total)].append((name, shape))
        acc += math.prod(shape) * 2
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        specs = [(n, torch.bfloat16, s) for n, s in group]
        with SafetensorsStreamWriter(folder / fname, specs, {"format": "pt"}) as w:
            for name, shape in group:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                w.write(name, t)
                weight_map[name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_adapter(folder: Path, layers: int, rank: int = 16, seed: int = 1) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in llama_tensors(layers):
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = shape
        sd[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
        sd[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    save_file(sd, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": folder.parent.name + "/base",
        "inference_mode": True, "use_rslora": False, "use_dora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


PEFT_SCRIPT = """
import json, os, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
phases = {"import": time.perf_counter() - t0}
base, adapter, out = sys.argv[1:4]
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
phases["load"] = time.perf_counter() - t
t = time.perf_counter()
model = model.merge_and_unload()
phases["merge"] = time.perf_counter() - t
t = time.perf_counter()
model.save_pretrained(out)
phases["save"] = time.perf_counter() - t
if "--sync" in sys.argv:
    t = time.perf_counter()
    os.sync()
    phases["sync"] = time.perf_counter() - t
print("PHASES " + json.dumps({k: round(v, 2) for k, v in phases.items()}), file=sys.stderr)
"""


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return pids


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], *, env=None) -> dict:
    """Run ``cmd``; wall seconds and the peak of RssAnon summed over its process tree."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_rss_anon(p) for p in _tree(proc.pid)))
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{err[-2000:]}")
    result = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_anon_mib": round(peak / 2**20, 1), "load_avg": round(os.getloadavg()[0], 2)}
    phases = [line[len("PHASES "):] for line in err.splitlines() if line.startswith("PHASES ")]
    if phases:
        result["phases_s"] = json.loads(phases[-1])
    return result


def du(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _run(cmd: list[str], cleanup: Path) -> dict:
    """One measured run of ``cmd``; its output is removed and synced away afterwards."""
    result = measure(cmd)
    shutil.rmtree(cleanup, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    return result


def _phases(x: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in x.get("phases_s", {}).items())


def bench(work: Path, layers: int, peft: bool, repeat: int = 1) -> dict:
    """Every contender once per round, ``repeat`` rounds: the disk of a shared VM drifts by tens of
    percent within minutes, so contenders compared in the same round share its conditions."""
    case = work / f"llama-{layers}L"
    base, adapter = case / "base", case / "adapter"
    if not base.exists():
        print(f"[{layers} layers] writing base and adapter ...", flush=True)
        make_base(base, layers)
        make_adapter(adapter, layers)
    for d in ("cp", "merged", "peft"):
        shutil.rmtree(case / d, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    script = case / "peft_merge.py"
    script.write_text(PEFT_SCRIPT)
    contenders = {
        "cp_sync": (["bash", "-c", f"cp -r '{base}' '{case / 'cp'}' && sync"], case / "cp"),
        "loratool": ([sys.executable, "-m", "loratool", "merge", str(base), str(adapter), str(case / "merged"), "--device", "cpu", "--quiet"], case / "merged"),
        # context: what the interpreter start-up alone costs each contender
        "loratool_startup": ([sys.executable, "-c", "import loratool.cli, loratool.merge"], case / "none"),
    }
    if peft:
        contenders.update({
            "peft_startup": ([sys.executable, "-c", "import torch, transformers, peft; from transformers import AutoModelForCausalLM; from peft import PeftModel"], case / "none"),
            "peft": ([sys.executable, str(script), str(base), str(adapter), str(case / "peft")], case / "peft"),
            # the same path with its output made durable like cp + sync's and loratool's (fsync before rename)
            "peft_sync": ([sys.executable, str(script), str(base), str(adapter), str(case / "peft"), "--sync"], case / "peft"),
        })
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    for i in range(repeat):
        for key, (cmd, cleanup) in contenders.items():
            print(f"[{layers} layers] round {i + 1}/{repeat}: {key} ...", flush=True)
            runs[key].append(_run(cmd, cleanup))
    res = {"layers": layers, "base_bytes": du(base), "adapter_bytes": du(adapter)}
    for key, rs in runs.items():
        best = dict(min(rs, key=lambda r: r["wall_s"]))  # the fastest run, and the highest memory peak
        best["peak_rss_anon_mib"] = max(r["peak_rss_anon_mib"] for r in rs)
        best["all_wall_s"] = [r["wall_s"] for r in rs]
        res[key] = best
    # ratios within each round, where both contenders met the same disk
    res["per_round"] = {
        "loratool_vs_cp_sync": [round(a["wall_s"] / b["wall_s"], 2) for a, b in zip(runs["loratool"], runs["cp_sync"])],
    }
    if peft:
        res["per_round"]["peft_vs_loratool"] = [round(a["wall_s"] / b["wall_s"], 2) for a, b in zip(runs["peft"], runs["loratool"])]
        res["per_round"]["peft_sync_vs_loratool"] = [round(a["wall_s"] / b["wall_s"], 2) for a, b in zip(runs["peft_sync"], runs["loratool"])]
    return res


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
        "torch": torch.__version__, "load_avg_at_start": os.getloadavg(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out"), help="where bases and outputs go (needs ~20 GB)")
    ap.add_argument("--layers", type=int, nargs="+", default=[22, 44], help="model sizes (TinyLlama-1.1B has 22)")
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT path")
    ap.add_argument("--peft-layers", type=int, nargs="*", default=[22], help="sizes at which to run the PEFT path")
    ap.add_argument("--keep", action="store_true", help="keep the generated bases")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender: the fastest is reported (for noisy machines)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "runs": []}
    try:
        for layers in args.layers:
            results["runs"].append(bench(work, layers, peft=not args.no_peft and layers in args.peft_layers, repeat=args.repeat))
    finally:
        if not args.keep:
            for layers in args.layers:
                shutil.rmtree(work / f"llama-{layers}L", ignore_errors=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print("| model | contender | wall s | CPU s (user+sys) | peak RssAnon MiB | wall vs cp+sync | PEFT / loratool (wall, CPU) | phases s | load avg after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        label = f"{r['layers']} layers, {r['base_bytes'] / 2**30:.2f} GiB"
        cp = r["cp_sync"]["wall_s"]
        for key, title in (
            ("cp_sync", "cp -r + sync"),
            ("loratool", "loratool merge"),
            ("peft", "PEFT merge_and_unload"),
            ("peft_sync", "PEFT merge_and_unload + sync"),
            ("loratool_startup", "(start-up only: import loratool)"),
            ("peft_startup", "(start-up only: import transformers + peft)"),
        ):
            if key not in r:
                continue
            x = r[key]
            speed = ""
            if key == "loratool" and "peft" in r:
                speed = f"{r['peft']['wall_s'] / x['wall_s']:.1f}x, {r['peft']['cpu_s'] / x['cpu_s']:.1f}x"
            print(f"| {label} | {title} | {x['wall_s']} | {x['cpu_s']} | {x['peak_rss_anon_mib']} | {x['wall_s'] / cp:.2f}x | {speed} | {_phases(x)} | {x['load_avg']} |")
    for r in results["runs"]:
        for key, ratios in r["per_round"].items():
            print(f"{r['layers']} layers, {key} per round: {ratios} (median {sorted(ratios)[len(ratios) // 2]})")
    print(f"\nmachine: {results['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
