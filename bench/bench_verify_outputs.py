"""Benchmark: `verify --outputs` layer-streamed against the whole-model path (PEFT), wall time and peak RssAnon.

    python bench/bench_verify_outputs.py                       # TinyLlama-1.1B shape, both paths
    python bench/bench_verify_outputs.py --shape 13b --no-whole --samples 1 --workdir /big/disk

The base and adapter are bench_merge.py's (random bf16 Llama in 3 shards, r=16 LoRA on
q/k/v/o/gate/up/down of every layer); ``--shape 13b`` swaps in Llama-2-13B's sizes (hidden 5120,
intermediate 13824, 40 heads, 40 layers: 26 GB in bf16, larger than this machine's memory).
MERGED is written by `loratool merge` (bf16). Each contender runs in a fresh process:

    layered   loratool.verify.verify_outputs (layer-streamed: one layer resident, no PEFT)
    whole     loratool.verify.outputs.verify_outputs_whole (PEFT on the float32 base, PEFT's merge
              for the floors, the float32 merged model: today's path before the layer-streamed one)

Peak anonymous memory (RssAnon over the process tree) is sampled every 10 ms as in bench_merge.py.
Results are printed as a Markdown table and written to WORKDIR/verify_outputs_results.json.
The target: layered peak <= 1 GiB on the TinyLlama shape.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_merge as bm  # noqa: E402

SHAPES = {
    "tinyllama": dict(HIDDEN=2048, INTER=5632, HEADS=32, KV_HEADS=4, layers=22),
    "13b": dict(HIDDEN=5120, INTER=13824, HEADS=40, KV_HEADS=40, layers=40),
}
TARGET_MIB = 1024

SCRIPT = """
import json, sys, time
import torch
from loratool.verify import outputs
t0 = time.perf_counter()
fn = outputs.verify_outputs if sys.argv[1] == "layered" else outputs.verify_outputs_whole
kw = {"device": sys.argv[7]} if len(sys.argv) > 7 else {}
r = fn(sys.argv[2], sys.argv[3], sys.argv[4], samples=int(sys.argv[5]), seq_len=int(sys.argv[6]), **kw)
keep = ("passed", "relative_diff", "allowed_relative_diff", "floor_merged_dtype", "kl_divergence", "top1_agreement", "first_divergent")
print("RESULT " + json.dumps({k: r.get(k) for k in keep} | {"check_s": round(time.perf_counter() - t0, 2)}), file=sys.stderr)
"""


def _measure_with_result(cmd: list[str]) -> dict:
    """bm.measure, plus the RESULT line the script prints on stderr."""
    import os
    import time

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(bm._rss_anon(p) for p in bm._tree(proc.pid)))
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    lines = [ln[len("RESULT "):] for ln in err.splitlines() if ln.startswith("RESULT ")]
    out = {"wall_s": round(wall, 2), "peak_rss_anon_mib": round(peak / 2**20, 1), "load_avg": round(os.getloadavg()[0], 2)}
    return out | (json.loads(lines[-1]) if lines else {})


def prepare(work: Path, shape: str) -> Path:
    dims = SHAPES[shape]
    for k in ("HIDDEN", "INTER", "HEADS", "KV_HEADS"):
        setattr(bm, k, dims[k])
    case = work / f"outputs-{shape}"
    if not (case / "merged").exists():
        shutil.rmtree(case, ignore_errors=True)
        print(f"[{shape}] writing base and adapter ...", flush=True)
        bm.make_base(case / "base", dims["layers"])
        bm.make_adapter(case / "adapter", dims["layers"])
        print(f"[{shape}] loratool merge ...", flush=True)
        subprocess.run([sys.executable, "-m", "loratool", "merge", str(case / "base"), str(case / "adapter"), str(case / "merged"), "--quiet"], check=True)
    return case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(HERE / "out"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-model path (it needs both models in float32)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--device", default="cpu", help="where verify computes (cpu, cuda)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    case = prepare(work, args.shape)
    res = {"machine": bm.machine(), "device": args.device, "shape": args.shape, "base_bytes": bm.du(case / "base"), "samples": args.samples, "seq_len": args.seq_len}
    try:
        for name in ["layered"] + ([] if args.no_whole else ["whole"]):
            print(f"[{args.shape}] {name} ...", flush=True)
            cmd = [sys.executable, "-c", SCRIPT, name, str(case / "base"), str(case / "adapter"), str(case / "merged"), str(args.samples), str(args.seq_len),
                   args.device]
            res[name] = _measure_with_result(cmd)
    finally:
        if not args.keep:
            shutil.rmtree(case, ignore_errors=True)
    (work / f"verify_outputs_results-{args.shape}.json").write_text(json.dumps(res, indent=2))
    print(f"\n{args.shape}: base {res['base_bytes'] / 2**30:.2f} GiB bf16, {args.samples} x {args.seq_len} tokens")
    print("| path | wall s | peak RssAnon MiB | relative diff | allowed | passed |")
    print("|---|---|---|---|---|---|")
    for name in ("layered", "whole"):
        if name in res:
            r = res[name]
            print(f"| {name} | {r['wall_s']} | {r['peak_rss_anon_mib']} | {r.get('relative_diff'):.3g} | {r.get('allowed_relative_diff'):.3g} | {r.get('passed')} |")
    ok = res["layered"]["peak_rss_anon_mib"] <= TARGET_MIB or args.shape != "tinyllama"
    print(f"machine: {res['machine']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
