"""Benchmark: `rerank` (QR of the factors + SVD of the r x r core) vs a full SVD of every dW.

    python bench/bench_rerank.py                         # all 22 layers, both methods, measured
    python bench/bench_rerank.py --threads 1 --baseline-layers 2

The adapter is the one of bench_merge.py: an r=16 PEFT LoRA on q/k/v/o/gate/up/down of every
layer of a TinyLlama-1.1B-shaped Llama (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads), random float32 factors. Both contenders truncate every module to rank 8:

* loratool: ``loratool.surgery.rerank(adapter, rank=8)`` (reads the factors, factored SVD,
  builds the new factors), then writing the PEFT folder, timed separately;
* full SVD (what PEFT's svd combination and kohya's resize_lora do): per module
  ``dW = scale * B @ A`` in float32, ``torch.linalg.svd(dW, full_matrices=False)``, and the
  rank-8 factors from it.

``--baseline-layers N`` runs the full SVD on the first N layers only (each layer has every
module shape) and scales its time by 22 / N; the table says so. Both run in this process with
the same torch thread count. The truncated deltas of the two are compared on every module
the baseline ran. Results: a Markdown table on stdout and JSON in WORKDIR/results_rerank.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def full_svd_rerank(module, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: form dW, full SVD, rank-k factors (B = U S, A = Vh)."""
    dW = module.delta(dtype=torch.float32)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous()


def main(argv=None) -> int:
    from bench_merge import make_adapter

    import loratool
    from loratool.surgery import rerank

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--rank", type=int, default=16, help="rank of the adapter")
    p.add_argument("--to", type=int, default=8, help="target rank")
    p.add_argument("--baseline-layers", type=int, default=None, help="run the full SVD on the first N layers only and scale")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--repeat", type=int, default=3, help="runs of the loratool rerank (best is reported)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    work.mkdir(parents=True, exist_ok=True)
    adapter_dir = work / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    make_adapter(adapter_dir, args.layers, rank=args.rank)

    # loratool: best of --repeat (each run re-reads the factors from the file)
    times, write_times = [], []
    for i in range(args.repeat):
        ad = loratool.read_adapter(adapter_dir)
        t0 = time.perf_counter()
        new, report = rerank(ad, rank=args.to)
        t1 = time.perf_counter()
        out = work / f"out{i}"
        if out.exists():
            shutil.rmtree(out)
        loratool.write_adapter(new, out)
        t2 = time.perf_counter()
        times.append(t1 - t0)
        write_times.append(t2 - t1)
    ours = min(times)

    # baseline: full SVD of every dW (or of the first N layers)
    ad = loratool.read_adapter(adapter_dir)
    layers = args.baseline_layers or args.layers
    picked = [m for n, m in ad.modules.items() if int(n.split(".")[2]) < layers]
    t0 = time.perf_counter()
    base_factors = {m.name: full_svd_rerank(m, args.to) for m in picked}
    base_measured = time.perf_counter() - t0
    baseline = base_measured * args.layers / layers

    worst = 0.0
    for name, (A, B) in base_factors.items():
        ref = (B.double() @ A.double())
        mine = new.modules[name].delta(dtype=torch.float64)
        worst = max(worst, float((mine - ref).norm() / ref.norm()))

    result = {
        "adapter": f"TinyLlama-1.1B shape, {args.layers} layers, r={args.rank}, {len(ad)} modules (q/k/v/o/gate/up/down)",
        "target_rank": args.to,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "loratool_rerank_s": ours,
        "loratool_rerank_runs_s": times,
        "loratool_write_s": min(write_times),
        "full_svd_s": baseline,
        "full_svd_measured_s": base_measured,
        "full_svd_modules_measured": len(picked),
        "full_svd_scaled": layers != args.layers,
        "speedup": baseline / ours,
        "speedup_with_write": baseline / (ours + min(write_times)),
        "max_relative_difference": worst,
    }
    (work / "results_rerank.json").write_text(json.dumps(result, indent=2))
    scaled = f" (measured on {len(picked)} modules of {layers} layers, x{args.layers / layers:g})" if result["full_svd_scaled"] else ""
    print(f"{result['adapter']}, rank {args.rank} -> {args.to}, {result['threads']} torch thread(s)\n")
    print("| method | time (s) | speedup |")
    print("|---|---:|---:|")
    print(f"| full SVD of every dW{scaled} | {baseline:.1f} | 1x |")
    print(f"| loratool rerank (factored SVD) | {ours:.3f} | {result['speedup']:.0f}x |")
    print(f"| loratool rerank + write PEFT folder | {ours + min(write_times):.3f} | {result['speedup_with_write']:.0f}x |")
    print(f"\nlargest relative difference between the two truncations: {worst:.2e}")
    print(f"results: {work / 'results_rerank.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
