#!/usr/bin/env bash
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python benchmarks/step_bench.py --shapes llama1b --reps 8 --compile --eval --profile $OUT/profile_llama1b.txt \
  --out $OUT/step_bench_llama1b.json 2>&1 | grep -v Warning | tee $OUT/bench.log | grep -v '^ \{2,\}"\|^ *}\|^{\|^ *"'
bash benchmarks/train_llama1b_shape.sh .data/gsm8k-aug /tmp/runs 2>&1 | grep -v "Writing\|Warning" | tail -25
cp /tmp/runs/llama1b_shape_kava/metrics.jsonl $OUT/train_metrics.jsonl 2>/dev/null
cp /tmp/runs/llama1b_shape_kava/meta.json $OUT/train_meta.json 2>/dev/null
