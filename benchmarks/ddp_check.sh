#!/usr/bin/env bash
# DDP check on one host with 2 GPUs: the same run (kava, effective batch 128) on 1 GPU (micro 64 x 2 accumulation)
# and on 2 GPUs (micro 64 x 1 per GPU), 50 optimizer steps; compares the loss curves and the step throughput.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
COMMON="--config synth_backbone --no-progress --set method=kava --set optim.max_steps=50 --set optim.micro_batch=64
 --set optim.effective_batch=128 --set run.eval_every=50 --set run.log_every=1 --set data.valid_limit=64
 --set data.synth_train_size=20000 --set run.output_dir=/tmp/ddp --set latent.num_latents=24 --set run.log=[jsonl]"
python -c "from kava.config import load_config; from kava.data.pipeline import synthetic_dir; from pathlib import Path; synthetic_dir(load_config('synth_backbone', ['data.synth_train_size=20000']), Path('/tmp/ddp/_data'))"
t0=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 python -m kava.cli train $COMMON --set run.name=gpu1 2>&1 | grep -v "Writing" | tail -3
t1=$(date +%s.%N)
torchrun --standalone --nproc_per_node 2 -m kava.cli train $COMMON --set run.name=gpu2 2>&1 | grep -v "Writing" | tail -3
t2=$(date +%s.%N)
echo "wall 1gpu $(echo "$t1-$t0" | bc) s, 2gpu $(echo "$t2-$t1" | bc) s"
python benchmarks/compare_runs.py /tmp/ddp/gpu1 /tmp/ddp/gpu2 | tee $OUT/ddp_compare.txt
cp /tmp/ddp/gpu1/metrics.jsonl $OUT/gpu1_metrics.jsonl; cp /tmp/ddp/gpu2/metrics.jsonl $OUT/gpu2_metrics.jsonl
cp /tmp/ddp/gpu2/meta.json $OUT/gpu2_meta.json
