#!/usr/bin/env bash
# One prepared round on a lent GPU machine (see docs/performance.md): a 13B-shaped verify --outputs on CUDA,
# then three adapters merged with TIES (bench_several) with the machine's own cores and GPU.
set -u
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
{
  date; nproc; free -g | head -2; df -h /tmp | tail -1; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import torch, transformers, safetensors; print(torch.__version__, transformers.__version__, safetensors.__version__, torch.cuda.is_available())"
  python -c "import loratool, click; print('loratool imports')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 420 python bench/bench_verify_outputs.py --shape 13b --no-whole --samples 1 --seq-len 32 --device cuda --workdir /tmp/b13 \
  > "$OUT/verify13b.txt" 2>&1; echo "rc=$?" >> "$OUT/verify13b.txt"
tail -8 "$OUT/verify13b.txt"
cp /tmp/b13/*.json "$OUT/" 2>/dev/null
rm -rf /tmp/b13
timeout 150 python bench/bench_several.py --layers 22 --repeats 1 --workdir /tmp/bsv > "$OUT/several.txt" 2>&1; echo "rc=$?" >> "$OUT/several.txt"
tail -8 "$OUT/several.txt"
cp /tmp/bsv/several.json "$OUT/" 2>/dev/null
