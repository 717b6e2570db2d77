"""Benchmark: `loratool verify` (weight level) against the `loratool merge` it checks.

    python bench/bench_verify.py                    # TinyLlama-1.1B shape, 2 rounds
    python bench/bench_verify.py --layers 22 --rounds 3 --workdir /tmp/bench

The base and adapter are bench_merge.py's: a TinyLlama-1.1B-shaped Llama (hidden 2048,
intermediate 5632, 22 layers, bf16, 3 shards) and an r=16 LoRA on q/k/v/o/gate/up/down of
every layer. Each round runs `loratool merge` and then `loratool verify BASE ADAPTER MERGED`
in fresh processes (page cache warm), with wall time and peak RssAnon sampled as in
bench_merge.py. The best round of each is compared: the target is verify <= 1.5 x merge.
Results go to stdout as a Markdown table and to WORKDIR/verify_results.json.
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

import bench_merge as bm  # noqa: E402  (same base, adapter and measuring as the merge benchmark)

TARGET = 1.5


def run(work: Path, layers: int, rounds: int) -> dict:
    case = work / f"llama-{layers}L"
    base, adapter, merged = case / "base", case / "adapter", case / "merged"
    if not base.exists():
        print(f"[{layers} layers] writing base and adapter ...", flush=True)
        bm.make_base(base, layers)
        bm.make_adapter(adapter, layers)
    res: dict = {"layers": layers, "base_bytes": bm.du(base), "merge": [], "verify": []}
    for i in range(rounds):
        shutil.rmtree(merged, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        print(f"[{layers} layers] round {i + 1}: loratool merge ...", flush=True)
        res["merge"].append(bm.measure([sys.executable, "-m", "loratool", "merge", str(base), str(adapter), str(merged), "--device", "cpu", "--quiet"]))
        print(f"[{layers} layers] round {i + 1}: loratool verify ...", flush=True)
        res["verify"].append(bm.measure([sys.executable, "-m", "loratool", "verify", str(base), str(adapter), str(merged), "--quiet"]))
    shutil.rmtree(merged, ignore_errors=True)
    best_m = min(r["wall_s"] for r in res["merge"])
    best_v = min(r["wall_s"] for r in res["verify"])
    res["ratio"] = round(best_v / best_m, 3)
    res["target"] = TARGET
    res["ok"] = res["ratio"] <= TARGET
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(HERE / "out"), help="where the base, adapter and merged model go (~5 GB)")
    ap.add_argument("--layers", type=int, default=22, help="model depth (TinyLlama-1.1B has 22)")
    ap.add_argument("--rounds", type=int, default=2, help="merge + verify rounds; the best of each counts")
    ap.add_argument("--keep", action="store_true", help="keep the generated base and adapter")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": bm.machine()}
    try:
        results["run"] = r = run(work, args.layers, args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(work / f"llama-{args.layers}L", ignore_errors=True)
    (work / "verify_results.json").write_text(json.dumps(results, indent=2))
    print()
    print("| model | command | wall s (best) | wall s (all rounds) | peak RssAnon MiB |")
    print("|---|---|---|---|---|")
    label = f"{r['layers']} layers, {r['base_bytes'] / 2**30:.2f} GiB"
    for key in ("merge", "verify"):
        walls = [x["wall_s"] for x in r[key]]
        peak = max(x["peak_rss_anon_mib"] for x in r[key])
        print(f"| {label} | loratool {key} | {min(walls)} | {', '.join(map(str, walls))} | {peak} |")
    print(f"\nverify / merge = {r['ratio']:.2f} (target <= {TARGET}): {'OK' if r['ok'] else 'OVER TARGET'}")
    print(f"machine: {results['machine']}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
