#!/usr/bin/env bash
# One device call: LLaMA-1B-shape step benchmark (+ profile + eval throughput), then the 20-step kava train.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python benchmarks/step_bench.py --shapes llama1b --reps 8 --eval --profile $OUT/profile_llama1b.txt \
  --out $OUT/step_bench_llama1b.json 2>&1 | grep -v Warning | tee $OUT/bench.log | grep -v '^ \{2,\}"'
bash benchmarks/train_llama1b_shape.sh .data/gsm8k-aug /tmp/runs 2>&1 | grep -v "Writing\|Warning" | tail -30
cp /tmp/runs/llama1b_shape_kava/metrics.jsonl $OUT/train_metrics.jsonl 2>/dev/null
cp /tmp/runs/llama1b_shape_kava/meta.json $OUT/train_meta.json 2>/dev/null
