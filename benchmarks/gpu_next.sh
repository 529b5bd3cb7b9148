#!/usr/bin/env bash
# The speed measurements still open for issue 14 (benchmarks/RESULTS.md, "Not measured yet"). Device calls:
#   git worktree add .carry/c310e99 c310e99              # once, here: the baseline commit, carried along
#   bash benchmarks/gpu_next.sh baseline   (carry .carry) # c310e99's eager step vs HEAD's, same call
#   bash benchmarks/gpu_next.sh train                     # HEAD eager (no host reads) vs graphs, eq/NL x mb 32/64:
#                                                         # checkpointed-CE capture, memory, samples/s
#   bash benchmarks/gpu_next.sh eval                      # latent vs cot questions/s at batch 64, 128, 256
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
quiet() { grep -v "Warning\|warnings.warn\|it/s\]\|^\s*$"; }
case "${1:-train}" in
  baseline)
    (cd .carry/c310e99 && PYTHONPATH=$PWD/src timeout 250 python benchmarks/step_bench.py --shapes llama1b --cot eq \
      --methods pccot,kava --targets bar --micro-batch 32 --no-naive --reps 8 --out $OUT/c310e99_step.json 2>&1 \
      | quiet | grep "llama1b" )
    PYTHONPATH=$PWD/src timeout 250 python benchmarks/step_bench.py --shapes llama1b --cot eq --methods pccot,kava \
      --targets bar --micro-batch 32 --no-naive --reps 8 --out $OUT/head_step.json 2>&1 | quiet | grep "llama1b" ;;
  train)
    PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 560 python benchmarks/graph_bench.py --llama1b --micro-batches 32,64 \
      --styles eq,nl --llama-methods kava --out $OUT/graph_bench_llama1b_next.json 2>&1 | quiet \
      | grep -v "^ \|^Traceback" | tail -20 ;;
  eval)
    PYTHONPATH=$PWD/src timeout 560 python benchmarks/step_bench.py --shapes llama1b --eval-only \
      --eval-batch-sizes 64,128,256 --out $OUT/eval_bench_next.json 2>&1 | quiet | grep "eval" ;;
esac
