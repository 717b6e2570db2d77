"""Benchmark: three adapters merged with TIES in one streaming pass, against one-adapter merges and the peer route.

    python bench/bench_several.py                    # TinyLlama-1.1B shape (22 layers), three r=16 adapters
    python bench/bench_several.py --layers 4 --workdir /tmp/bench-several

Contenders, each in its own process, peak anonymous memory (RssAnon over the process tree) sampled
every 10 ms, outputs synced and removed after each run:

* ``single``: ``loratool merge BASE A1 OUT`` (one adapter, the plain merge);
* ``ties``: ``loratool merge BASE A1 A2 A3 OUT --method ties --density 0.5`` (one pass);
* ``peer``: the route without loratool's combination: three full merges (``loratool merge BASE Ai Mi``,
  the fastest full merge there is), then a dense TIES over the three full models, tensor by tensor
  (task vectors Mi - W read with safetensors, ``peft.utils.merge_utils.ties`` in float32, the result
  written as one model) — what a model merger does with N merged copies on disk.

Reported: wall time, peak RssAnon and bytes written to disk. Results as a Markdown table and JSON
(WORKDIR/several.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_merge import du, make_adapter, make_base, measure  # noqa: E402

DENSITY = 0.5

DENSE_TIES = """
import json, sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
from peft.utils.merge_utils import ties
base, out, density, models = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), [Path(p) for p in sys.argv[4:]]
out.mkdir()
index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
for shard in sorted(set(index.values())):
    result = {}
    with safe_open(base / shard, "pt") as fb:
        handles = [safe_open(m / shard, "pt") for m in models]
        for name in fb.keys():
            w = fb.get_tensor(name)
            vectors = [h.get_tensor(name).float() - w.float() for h in handles]
            if all(not bool(v.any()) for v in vectors):
                result[name] = w
                continue
            d = ties(vectors, torch.ones(len(vectors)), density, "total")
            result[name] = (w.float() + d).to(w.dtype)
    save_file(result, out / shard, metadata={"format": "pt"})
for f in base.iterdir():
    if f.suffix == ".json":
        (out / f.name).write_bytes(f.read_bytes())
"""


def _sync() -> None:
    subprocess.run(["sync"], check=True)


def run_single(base: Path, adapters: list[Path], work: Path) -> dict:
    out = work / "single-out"
    r = measure([sys.executable, "-m", "loratool", "merge", str(base), str(adapters[0]), str(out), "--quiet"])
    r["disk_written_bytes"] = du(out)
    shutil.rmtree(out)
    _sync()
    return r


def run_ties(base: Path, adapters: list[Path], work: Path) -> dict:
    out = work / "ties-out"
    cmd = [sys.executable, "-m", "loratool", "merge", str(base), *map(str, adapters), str(out), "--method", "ties",
           "--density", str(DENSITY), "--quiet"]
    r = measure(cmd)
    r["disk_written_bytes"] = du(out)
    shutil.rmtree(out)
    _sync()
    return r


def run_peer(base: Path, adapters: list[Path], work: Path) -> dict:
    """Three full merges, then a dense TIES over the three models."""
    t0 = time.perf_counter()
    parts, models, written = [], [], 0
    for i, a in enumerate(adapters):
        m = work / f"peer-full-{i}"
        parts.append(measure([sys.executable, "-m", "loratool", "merge", str(base), str(a), str(m), "--quiet"]))
        models.append(m)
        written += du(m)
    _sync()
    out = work / "peer-out"
    parts.append(measure([sys.executable, "-c", DENSE_TIES, str(base), str(out), str(DENSITY), *map(str, models)]))
    _sync()
    written += du(out)
    wall = time.perf_counter() - t0
    for p in [*models, out]:
        shutil.rmtree(p)
    _sync()
    return {"wall_s": round(wall, 2), "peak_rss_anon_mib": max(p["peak_rss_anon_mib"] for p in parts),
            "disk_written_bytes": written, "steps_wall_s": [p["wall_s"] for p in parts]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratool-bench-several"))
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = work / "base"
    make_base(base, args.layers)
    adapters = [work / f"adapter-{i}" for i in range(3)]
    for i, a in enumerate(adapters):
        make_adapter(a, args.layers, rank=16, seed=1 + i)
    _sync()
    results: dict[str, list[dict]] = {"single": [], "ties": [], "peer": []}
    for _ in range(args.repeats):  # alternate the contenders so drift hits all of them
        results["single"].append(run_single(base, adapters, work))
        results["ties"].append(run_ties(base, adapters, work))
    results["peer"].append(run_peer(base, adapters, work))
    summary = {k: min(v, key=lambda r: r["wall_s"]) for k, v in results.items()}
    size = du(base)
    print(f"\nbase: {args.layers} layers, {size / 2**30:.2f} GiB bf16; three r=16 adapters on q/k/v/o/gate/up/down; density {DENSITY}\n")
    print("| contender | wall s (best) | all runs | peak RssAnon MiB | disk written GiB |")
    print("|---|---|---|---|---|")
    for k, v in results.items():
        s = summary[k]
        print(f"| {k} | {s['wall_s']} | {', '.join(str(r['wall_s']) for r in v)} | {s['peak_rss_anon_mib']} | {s['disk_written_bytes'] / 2**30:.2f} |")
    (work / "several.json").write_text(json.dumps({"layers": args.layers, "base_bytes": size, "results": results}, indent=2))
    shutil.rmtree(base)
    for a in adapters:
        shutil.rmtree(a)


if __name__ == "__main__":
    main()
