"""Benchmark: commands on an adapter whose pickled lora_A is genuinely large (issue 22, 3).

    python bench/bench_large_pickle.py                    # a 1.5 GB float32 lora_A (8 x 50,331,648)
    python bench/bench_large_pickle.py --gib 0.5 --workdir /tmp/blp --only inspect

The adapter is a scratch-format torch zip (``x.lora_matrix_A`` / ``x.lora_matrix_B``) whose
storage entries are stored uncompressed, as torch.save stores them, and left as holes of a
sparse file (zeros: small on disk, read at page-cache speed). The base is a sparse safetensors
file with ``x.weight`` (out x in, float32). Each command runs in its own process; the table gives
wall time, CPU time and peak RSS (ru_maxrss: anonymous and file-backed pages the process had
mapped in), and the peak above a bare interpreter that imported loratool's CLI, torch and numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_hostile_pickles import _sparse_zip, _state_dict, _tensor  # noqa: E402


def build(work: Path, numel: int, rank: int, out: int) -> tuple[Path, Path]:
    """The sparse adapter (A: rank x in, B: out x rank of 0.5) and the sparse base (x.weight: out x in)."""
    cols = numel // rank
    (work / "adapter").mkdir()
    adapter = work / "adapter" / "adapter.pt"
    pkl = _state_dict(_tensor("x.lora_matrix_A", "0", rank * cols, (rank, cols), (cols, 1)), _tensor("x.lora_matrix_B", "1", out * rank, (out, rank), (rank, 1)))
    _sparse_zip(adapter, pkl, {"0": rank * cols * 4, "1": struct.pack(f"<{out * rank}f", *[0.5] * (out * rank))})
    base = work / "base"
    base.mkdir(exist_ok=True)
    header = json.dumps({"x.weight": {"dtype": "F32", "shape": [out, cols], "data_offsets": [0, out * cols * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(base / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + out * cols * 4)  # a hole: zeros
    (base / "config.json").write_text(json.dumps({"model_type": "bench", "architectures": ["Bench"]}))
    return adapter, base


def measure(argv: list[str]) -> dict:
    """Run ``argv``; wall seconds, CPU seconds and peak RSS (MiB) of the child, its exit status."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    proc.stderr.close()
    return {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_mib": usage.ru_maxrss // 1024, "rc": os.waitstatus_to_exitcode(status), "last": err[-1][:120] if err else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.5, help="size of lora_A in GiB (float32)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", type=int, default=8, help="out_features of the base module")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_large_pickle"))
    ap.add_argument("--only", nargs="*", default=None, help="inspect merge verify convert")
    args = ap.parse_args()
    numel = int(args.gib * (1 << 30)) // 4 // args.rank * args.rank
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    adapter, base = build(work, numel, args.rank, args.out)
    (work / "out").mkdir()
    lt = [sys.executable, "-m", "loratool"]
    runs = {
        "interpreter (import loratool.cli, torch, numpy)": [sys.executable, "-c", "import loratool.cli, torch, numpy"],
        "inspect": [*lt, "inspect", str(adapter), "--from", "scratch"],
        "merge": [*lt, "merge", str(base), str(adapter), str(work / "out" / "merged"), "--from", "scratch", "--alpha", "8", "--device", "cpu"],
        "verify": [*lt, "verify", str(base), str(adapter), str(work / "out" / "merged"), "--from", "scratch", "--alpha", "8"],
        "convert --to peft": [*lt, "convert", str(adapter), str(work / "out" / "peft"), "--to", "peft", "--from", "scratch", "--alpha", "8"],
    }
    results = {}
    for name, argv in runs.items():
        if args.only and name.split()[0] not in args.only and not name.startswith("interpreter"):
            continue
        results[name] = measure(argv)
    floor = results["interpreter (import loratool.cli, torch, numpy)"]["peak_mib"]
    print(f"lora_A: {args.rank} x {numel // args.rank:,} float32 = {numel * 4 / (1 << 30):.2f} GiB (sparse); python {sys.version.split()[0]}")
    print("| command | rc | wall s | CPU s | peak RSS MiB | above interpreter MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rc']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_mib']} | {r['peak_mib'] - floor} |" + (f" {r['last']}" if r["rc"] else ""))
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
