"""Benchmark: `loratool merge --device cuda` against `--device cpu` and `cp -r && sync`, on a machine with a GPU.

    python bench/bench_device.py --layers 22 --rounds 3 --workdir /tmp/bench-device

The base and adapter are those of `bench/bench_merge.py` (a TinyLlama-1.1B-shaped bf16 Llama, an r=16
LoRA on every projection). Each contender runs in its own process, in rounds (cp, cuda, cpu per round);
the CUDA output is then compared with the CPU output tensor by tensor (they may differ by float32 rounding
of the delta's terms only, as `tests/test_merge.py::test_staged_accelerator_path_on_the_cpu` checks on the
CPU) and `loratool verify` checks it against base + adapter. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_merge import _run, make_adapter, make_base, measure  # noqa: E402


def compare_outputs(a: Path, b: Path) -> dict:
    """Largest difference between two merged folders, relative to the largest |value| of each tensor."""
    from safetensors import safe_open

    worst, identical, total = 0.0, 0, 0
    for f in sorted(a.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fa, safe_open(str(b / f.name), "pt") as fb:
            for k in fa.keys():
                x, y = fa.get_tensor(k).float(), fb.get_tensor(k).float()
                total += 1
                if x.shape == y.shape and (x == y).all():
                    identical += 1
                    continue
                scale = max(float(x.abs().max()), 1e-30)
                worst = max(worst, float((x - y).abs().max()) / scale)
    return {"tensors": total, "bit_identical": identical, "max_rel_diff": worst}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench-device")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="the accelerator (cpu: a smoke test of this script)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    base, adapter = work / "base", work / "adapter"
    if not base.exists():
        make_base(base, args.layers)
        make_adapter(adapter, args.layers)
    lt = [sys.executable, "-m", "loratool", "merge", str(base), str(adapter)]
    runs: dict[str, list[dict]] = {"cp_sync": [], "cuda": [], "cpu": []}
    for _ in range(args.rounds):
        runs["cp_sync"].append(_run(["sh", "-c", f"cp -r {base} {work / 'copy'} && sync"], work / "copy"))
        runs["cuda"].append(_run([*lt, str(work / "out-cuda"), "--device", args.device, "--quiet"], work / "out-cuda"))
        runs["cpu"].append(_run([*lt, str(work / "out-cpu"), "--device", "cpu", "--quiet"], work / "out-cpu"))
    # keep one output of each for the comparison and the proof
    report = work / "cuda-report.json"
    measure([*lt, str(work / "out-cuda"), "--device", args.device, "--quiet", "--force", "--report", str(report)])
    measure([*lt, str(work / "out-cpu"), "--device", "cpu", "--quiet", "--force"])
    same = compare_outputs(work / "out-cuda", work / "out-cpu")
    proof = subprocess.run([sys.executable, "-m", "loratool", "verify", str(base), str(adapter), str(work / "out-cuda"), "--json"],
                           capture_output=True, text=True)
    verified = json.loads(proof.stdout)["passed"] if proof.stdout.strip() else False
    timings = json.loads(report.read_text())["timings"]
    results = {"runs": runs, "cuda_vs_cpu": same, "verify_passed": verified, "cuda_timings": timings}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print("| contender | wall s (all rounds) | CPU s | peak RssAnon MiB |")
    print("|---|---|---|---|")
    for key, title in (("cp_sync", "cp -r + sync"), ("cuda", "loratool merge --device cuda"), ("cpu", "loratool merge --device cpu")):
        xs = runs[key]
        print(f"| {title} | {', '.join(str(x['wall_s']) for x in xs)} | {min(x['cpu_s'] for x in xs)} | {max(x['peak_rss_anon_mib'] for x in xs)} |")
    print(f"\ncuda vs cpu output: {same}\nverify of the cuda output passed: {verified}\ncuda timings: {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
