#!/usr/bin/env bash
# The speed measurements still open for issue 14 (benchmarks/RESULTS.md, "Not measured yet"). Device calls:
#   git worktree add .carry/c310e99 c310e99              # once, here: the baseline commit, carried along
#   bash benchmarks/gpu_next.sh baseline   (carry .carry) # c310e99's eager step vs HEAD's, same call; LoRA dropout
#   bash benchmarks/gpu_next.sh train                     # HEAD eager (no host reads) vs graphs, eq/NL x mb 32/64
#   bash benchmarks/gpu_next.sh eval                      # latent vs cot questions/s at batch 64 and 256
#   BASE=.carry/base bash benchmarks/gpu_next.sh decode   # eval decoders: BASE's dynamic cache, static, graphs
#   BASE=.carry/base2 bash benchmarks/gpu_next.sh versus  # BASE's training step vs this tree's (graphs, kava, mb 32)
#   bash benchmarks/gpu_next.sh labels                    # optim.graph_label_buckets vs block-area label rows (graphs)
#   bash benchmarks/gpu_next.sh pool                      # largest shape captured first vs plan order (graph pool)
#   bash benchmarks/gpu_next.sh qwen                      # kava at the Qwen-0.5B shape, mb 64: label rows, fused CE
#   bash benchmarks/gpu_next.sh ce                        # optim.fused_ce vs the checkpointed CE (graphs, mb 32)
#   bash benchmarks/gpu_next.sh dropout                   # lora.fused_dropout vs peft's dropout (graphs, mb 32)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
quiet() { grep -v "Warning\|warnings.warn\|it/s\]\|^\s*$"; }
case "${1:-train}" in
  baseline)  # c310e99 (the issue's commit) and HEAD, same harness (one eq micro-batch of 32, AdamW), same call
    (cd .carry/c310e99 && PYTHONPATH=$PWD/src timeout 200 python benchmarks/step_bench.py --shapes llama1b --cot eq \
      --methods pccot,kava --targets bar --micro-batch 32 --no-naive --reps 8 --out $OUT/c310e99_step.json 2>&1 \
      | quiet | grep "llama1b" )
    PYTHONPATH=$PWD/src timeout 150 python benchmarks/step_bench.py --shapes llama1b --cot eq --methods pccot,kava \
      --targets bar --micro-batch 32 --no-naive --reps 8 --out $OUT/head_step.json 2>&1 | quiet | grep "llama1b"
    # LoRA dropout's share of the graphed step (peft keeps each adapter's dropped input for backward)
    for p in 0.0 0.1; do PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 100 python benchmarks/graph_bench.py --llama1b \
      --skip-equality --micro-batches 32 --styles eq --llama-methods kava --llama-modes graphs --lora-dropout $p \
      --out $OUT/graph_bench_dropout_$p.json 2>&1 | quiet | grep "^llama1b"; done ;;
  train)  # HEAD eager vs graphs, eq/NL x mb 32/64: 4 distinct optimizer steps split as the trainer does
    PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 570 python benchmarks/graph_bench.py --llama1b --micro-batches 32,64 \
      --styles eq,nl --llama-methods kava --llama-steps 4 --out $OUT/graph_bench_llama1b_shared.json 2>&1 | quiet \
      | grep -v "^ \|^Traceback" | tail -20 ;;
  dropout)  # lora.fused_dropout against peft's dropout, same call: graphs, eq and NL at micro-batch 32
    for f in "" "--fused-dropout"; do PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 250 python benchmarks/graph_bench.py \
      --llama1b --skip-equality --micro-batches 32 --styles eq,nl --llama-methods kava --llama-modes graphs $f \
      --out $OUT/graph_bench_fused_dropout${f:+_on}.json 2>&1 | quiet | grep "^llama1b"; done ;;
  decode)  # the decoders, same call: BASE's growing DynamicCache (BASE=DIR holds an older src/kava, e.g.
    # `git archive d5b0e3b src/kava | tar -x -C .carry/base`, carried) beside this tree's static-cache step,
    # eager and CUDA-graphed; latent and cot at batch 1, 64, 256 (Q questions at 64 and 256, 8 batches at 1)
    Q=${Q:-256}
    if [ -n "${BASE:-}" ]; then
      PYTHONPATH=$BASE/src timeout 250 python benchmarks/step_bench.py --shapes ${SHAPE:-llama1b} --eval-only \
        --eval-batch-sizes 1,64,256 --eval-questions $Q --out $OUT/decode_base.json 2>&1 | quiet | grep "  eval"
    fi
    PYTHONPATH=$PWD/src timeout 250 python benchmarks/step_bench.py --shapes ${SHAPE:-llama1b} --eval-only \
      --eval-batch-sizes 1,64,256 --eval-questions $Q --out $OUT/decode_head.json 2>&1 | quiet | grep "  eval" ;;
  versus)  # BASE=DIR's src/kava (an older tree, carried: `git archive REV src/kava | tar -x -C DIR`) against this
    # tree's, same call, same harness: graphs, kava, STYLES (default eq) at micro-batch 32
    # (the device's copy of the tree carries no current git metadata: the tree's revision is the caller's to note)
    for v in "$BASE" "$PWD"; do echo "src: $v ($(cat $v/REVISION 2>/dev/null || echo 'this tree'))"
      PYTHONPATH=$v/src:$PWD/benchmarks timeout 150 python benchmarks/graph_bench.py --llama1b --skip-equality \
        --micro-batches 32 --styles ${STYLES:-eq} --llama-methods kava --llama-modes graphs \
        --out $OUT/graph_bench_versus_$(basename $v).json 2>&1 | quiet | grep "^llama1b"; done ;;
  ce)  # optim.fused_ce against the checkpointed CE, same call: graphs, kava, eq and NL at micro-batch 32
    for f in "" "--fused-ce"; do PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 250 python benchmarks/graph_bench.py \
      --llama1b --skip-equality --micro-batches 32 --styles eq,nl --llama-methods kava --llama-modes graphs $f \
      --out $OUT/graph_bench_ce${f:+_fused}.json 2>&1 | quiet | grep "^llama1b"; done ;;
  labels)  # optim.graph_label_buckets against the block-area label capacity, same call: graphs, kava, eq and NL at
    # micro-batches 32 and 64 (the shapes, peak memory and samples/s of each)
    for f in "" "--label-buckets 1.5"; do PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 280 python benchmarks/graph_bench.py \
      --llama1b --skip-equality --micro-batches 32,64 --styles eq,nl --llama-methods kava --llama-modes graphs $f \
      --out $OUT/graph_bench_labels${f:+_bucketed}.json 2>&1 | quiet | grep "^llama1b"; done ;;
  pool)  # the graphs' pool with the largest shape captured first (GraphedStep.precapture) against capture in plan
    # order, same call: graphs, kava, eq and NL at micro-batches 32 and 64 (peak memory, shapes, samples/s)
    for f in "" "--largest-first"; do PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 280 python benchmarks/graph_bench.py \
      --llama1b --skip-equality --micro-batches 32,64 --styles eq,nl --llama-methods kava --llama-modes graphs $f \
      --out $OUT/graph_bench_pool${f:+_largest_first}.json 2>&1 | quiet | grep "^llama1b"; done ;;
  qwen)  # kava at the Qwen2.5-0.5B shape (vocabulary 151,936), micro-batch 64, graphs: the block-area label rows
    # against optim.graph_label_buckets 1.5, optim.fused_ce and both, eq and NL (issue 30: fits in 40 GiB?)
    # QWEN_SETS: the variants as a comma list (a short lease: QWEN_SETS=",--label-buckets 1.5 --fused-ce")
    IFS=',' read -ra sets <<< "${QWEN_SETS-,--label-buckets 1.5,--fused-ce,--label-buckets 1.5 --fused-ce}"
    for f in "${sets[@]}"; do
      PYTHONPATH=$PWD/src:$PWD/benchmarks timeout 135 python benchmarks/graph_bench.py --llama1b --shape qwen05b \
        --skip-equality --micro-batches 64 --styles eq,nl --llama-methods kava --llama-modes graphs --largest-first $f \
        --out $OUT/graph_bench_qwen$(echo $f | tr -d ' .-').json 2>&1 | quiet | grep "^qwen05b"; done ;;
  eval)  # latent vs cot questions/s at batch 64 and 256, one profiled batch per mode
    PYTHONPATH=$PWD/src timeout 560 python benchmarks/step_bench.py --shapes ${SHAPE:-llama1b} --eval-only \
      --eval-batch-sizes 64,256 --eval-profile $OUT/eval_profile.txt --out $OUT/eval_bench.json 2>&1 | quiet \
      | grep "eval\|profile" ;;
esac
