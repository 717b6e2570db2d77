"""Benchmark: ways of getting a 2 GiB, 3-file output onto the disk (the merge's writing strategy).

    python bench/bench_sync.py --rounds 5 --workdir /tmp/sync-bench

Each mode writes the same bytes (3 files of 44 x 16 MiB) in its own process, one mode after
the other in every round (the disk of a shared VM drifts), and prints wall and CPU seconds:

- ``inline``:  fsync each file as soon as it is written, on the writing thread;
- ``finished``: fsync each finished file from a background thread while the next one is written;
- ``growing``: as ``finished``, and also fdatasync the file being written every 128 MiB from that
  thread (``loratool.io.writer.BackgroundSync``, what ``loratool merge`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 16 << 20
CHUNKS_PER_FILE = 44
FILES = 3
MODES = ("inline", "finished", "growing")


def write_files(folder: Path, mode: str) -> dict:
    from loratool.io.writer import BackgroundSync

    buf = os.urandom(1 << 20) * (CHUNK >> 20)
    r0 = resource.getrusage(resource.RUSAGE_SELF)  # after the imports: the writing alone
    t0 = time.perf_counter()
    # "finished" is the same helper with early flushes turned off
    sync = {"inline": None, "finished": BackgroundSync(every=1 << 62), "growing": BackgroundSync()}[mode]
    for i in range(FILES):
        path = folder / f"f{i}.bin"
        with open(path, "wb", buffering=0) as fh:
            for _ in range(CHUNKS_PER_FILE):
                fh.write(buf)
                if sync is not None:
                    sync.wrote(path, CHUNK)
            if sync is None:
                os.fsync(fh.fileno())
        if sync is not None:
            sync.finished(path)
    if sync is not None:
        sync.close()
        assert not sync.errors, sync.errors
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "sync"), help="where the files go (needs ~2.1 GB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measured run, in a child process
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    if args.mode:
        print(json.dumps(write_files(work, args.mode)))
        return 0
    results: dict[str, list] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            subprocess.run(["sync"], check=True)
            time.sleep(1)
            out = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--mode", mode], check=True, capture_output=True, text=True)
            results[mode].append(json.loads(out.stdout))
            print(f"round {r + 1}: {mode:8s} {results[mode][-1]}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print()
    for mode, runs in results.items():
        walls = sorted(x["wall_s"] for x in runs)
        print(f"{mode:8s} wall {walls[0]}-{walls[-1]} s (median {walls[len(walls) // 2]}), CPU {min(x['cpu_s'] for x in runs)}-{max(x['cpu_s'] for x in runs)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
