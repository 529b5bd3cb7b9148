#!/usr/bin/env bash
# CUDA graphs vs eager on one H200 (benchmarks/RESULTS.md, "CUDA graphs"). Device calls:
#   bash benchmarks/gpu_graphs.sh synth        # synthetic testbeds' speed through the trainer's own stages
#   bash benchmarks/gpu_graphs.sh synth_exact  # the same, with the graph-vs-eager check on the same batches
#   bash benchmarks/gpu_graphs.sh llama        # LLaMA-1B shape, LoRA r=128, effective batch 128
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/benchmarks PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
quiet() { grep -v "Warning\|warnings.warn\|it/s\]\|^\s*$"; }
case "${1:-synth}" in
  synth)
    timeout 330 python benchmarks/graph_bench.py --synth --shapes synth_depth --methods kava,pccot,codi,nocot,cot \
      --steps 30 --warm 5 --out $OUT/graph_bench_synth_depth.json 2>&1 | quiet | tail -40
    timeout 200 python benchmarks/graph_bench.py --synth --shapes synth24m --methods kava,nocot \
      --steps 20 --warm 5 --out $OUT/graph_bench_synth24m.json 2>&1 | quiet | tail -20 ;;
  synth_exact)
    timeout 200 python benchmarks/graph_bench.py --synth --shapes synth_depth --methods kava,codi \
      --steps 20 --warm 5 --out $OUT/graph_bench_synth_exact.json 2>&1 | quiet | tail -20 ;;
  llama2)  # run 2: the same without the leak between measurements that made run 1's later rows run out of memory
    timeout 330 python benchmarks/graph_bench.py --llama1b --skip-equality --micro-batches 64,32 --styles eq,nl \
      --llama-methods kava --out $OUT/graph_bench_llama1b_run2.json 2>&1 | quiet | grep -v "^ \|^Traceback" | tail -20 ;;
  llama3)  # run 3: warm-up before the first capture only (run 2's mb64 warm-up of a second shape ran out of memory)
    timeout 400 python benchmarks/graph_bench.py --llama1b --skip-equality --micro-batches 64,32 --styles eq,nl \
      --llama-methods kava --out $OUT/graph_bench_llama1b_run3.json 2>&1 | quiet | grep -v "^ \|^Traceback" | tail -20 ;;
  codi_determinism)  # is CODI's eager micro-step deterministic by itself? (graphs differed from it by 1.8e-2)
    timeout 200 python benchmarks/graph_bench.py --synth --shapes synth_depth --methods codi --repeat-eager \
      --steps 10 --warm 3 --out $OUT/graph_bench_codi_determinism.json 2>&1 | quiet | tail -8 ;;
  llama)
    timeout 420 python benchmarks/graph_bench.py --llama1b --micro-batches 32,64 --styles eq,nl \
      --llama-methods kava --out $OUT/graph_bench_llama1b.json 2>&1 | quiet | tail -40
    timeout 150 python benchmarks/graph_bench.py --llama1b --skip-equality --micro-batches 32 --styles eq \
      --llama-methods pccot --out $OUT/graph_bench_llama1b_pccot.json 2>&1 | quiet | tail -10 ;;
esac
