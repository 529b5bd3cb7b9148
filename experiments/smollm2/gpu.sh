#!/usr/bin/env bash
# The SmolLM2 table (experiments/smollm2/driver.py) on one device machine, over several device calls of one lease.
#
# The GGUF file (98 MB) is larger than one call carries (64 MiB), so it travels in two halves, and what a later
# call needs is kept outside the working tree (ignored paths a call does not carry are removed between calls).
# Here, once:
#   bash experiments/smollm2/gpu.sh prepare        # .carry/a: half A + the data; .carry/b: half B + the gguf wheel
# Then device calls, each within the 30 s warm window of the one before:
#   call 1, carry [.carry/a]:  bash experiments/smollm2/gpu.sh part1     # half A and the data -> /root/smol
#   call 2, carry [.carry/b]:  bash experiments/smollm2/gpu.sh part2     # join, check, convert, start the jobs (setsid)
#   calls 3..:                 bash experiments/smollm2/gpu.sh wait 560  # progress; returns at "all done" or after 560 s
#   last call:                 bash experiments/smollm2/gpu.sh collect [S] # after up to S s more: $OUT/results.tgz (no weights)
# The jobs run from a copy of the source in /root/smol/src, so later calls' tree copies cannot change them.
# PAR (parallel jobs), BUDGET (seconds), SEEDS, METHODS, STYLES and EXTRA (more --set) tune part2.
set -uo pipefail
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SIZE=98362432
S=${SMOL_ROOT:-/root/smol}
case "${1:-}" in
prepare)
  src=${SMOLLM2_DIR:-$HOME/.cache/kava/smollm2}/$GGUF
  data=${DATA:-../shared/data}
  rm -rf .carry/a .carry/b && mkdir -p .carry/a/data .carry/b
  grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
  split -b 49500000 "$src" .carry/part_ && mv .carry/part_aa .carry/a/ && mv .carry/part_ab .carry/b/
  for f in gsm8k/train.jsonl gsm8k/test.jsonl gsm8k-aug/train_no_aug.txt gsm8k-aug/valid.txt gsm8k-aug/test.txt \
           gsm8k-hard/gsmhardv2.jsonl svamp/SVAMP.json; do
    mkdir -p .carry/a/data/$(dirname $f) && cp "$data/$f" .carry/a/data/$f
  done
  python3 -m pip download -q --no-deps --only-binary=:all: -d .carry/b gguf==0.19.0
  { git rev-parse HEAD; git status --short; } > .carry/b/revision
  du -sh .carry/a .carry/b ;;
part1)
  mkdir -p $S && cp .carry/a/part_aa $S/ && cp -r .carry/a/data $S/ && ls -la $S && du -sh $S/data
  # CUDA MPS lets the jobs' small kernels run side by side instead of time-sliced; used only if it works here
  if command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=$S/mps/pipe CUDA_MPS_LOG_DIRECTORY=$S/mps/log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d && sleep 2
    t="import torch; x = torch.randn(4096, 4096, device='cuda'); g = torch.cuda.CUDAGraph()
y = x @ x
with torch.cuda.graph(g): y = x @ x
g.replay(); torch.cuda.synchronize(); print('mps client ok', float(y.abs().sum()) > 0)"
    (timeout 90 python3 -c "$t" > $S/mps1.log 2>&1; echo $? >> $S/mps1.log) & (timeout 90 python3 -c "$t" > $S/mps2.log 2>&1; echo $? >> $S/mps2.log) & wait
    cat $S/mps1.log $S/mps2.log
    if [ "$(tail -1 $S/mps1.log)" = 0 ] && [ "$(tail -1 $S/mps2.log)" = 0 ]; then touch $S/mps_ok; echo "MPS: on"
    else echo quit | nvidia-cuda-mps-control; echo "MPS: off (test failed)"; fi
  else echo "MPS: not available"; fi ;;
part2)
  export PYTHONPATH=$S/site:$S/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  python3 -m pip install -q --no-index --no-deps --no-compile --target $S/site .carry/b/gguf-*.whl || exit 1
  mkdir -p ~/.cache/kava/smollm2 && cat $S/part_aa .carry/b/part_ab > ~/.cache/kava/smollm2/$GGUF
  n=$(stat -c %s ~/.cache/kava/smollm2/$GGUF); [ "$n" = "$SIZE" ] || { echo "size $n != $SIZE"; exit 1; }
  rm -rf $S/src && mkdir -p $S/src && cp -r src/kava $S/src/ && cp experiments/smollm2/driver.py $S/driver.py
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)"
  python3 -c "from kava.model.pretrained import gguf_dir; print(gguf_dir('~/.cache/kava/smollm2', '$GGUF'))" > $S/convert.log 2>&1
  tail -1 $S/convert.log
  cp .carry/b/revision $S/revision
  [ -f $S/mps_ok ] && export CUDA_MPS_PIPE_DIRECTORY=$S/mps/pipe CUDA_MPS_LOG_DIRECTORY=$S/mps/log && echo "MPS: on"
  cd $S && setsid nohup python3 driver.py run --data $S/data --out $S/out --parallel ${PAR:-12} \
    --budget ${BUDGET:-1260} ${SEEDS:+--seeds $SEEDS} ${METHODS:+--methods $METHODS} ${STYLES:+--styles $STYLES} \
    ${EXTRA:-} > $S/driver.log 2>&1 < /dev/null &
  sleep 45; cat $S/driver.log; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  tail -3 $S/out/logs/*.log 2>/dev/null | tail -40 ;;
wait)
  end=$(( $(date +%s) + ${2:-560} ))
  while [ $(date +%s) -lt $end ] && ! grep -q '"all done"' $S/driver.log 2>/dev/null; do sleep 10; done
  grep -c '"start"' $S/driver.log; grep '"end"\|not started' $S/driver.log | tail -40
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  for f in $S/out/logs/*.log; do echo "== $f"; grep -v Warn $f | tail -2; done 2>/dev/null | tail -80
  cp $S/driver.log $S/out/status.jsonl $OUT/ 2>/dev/null
  # every call brings back what has finished: the lease can end before a `collect` call (it did on 2026-12-02)
  cp $S/revision $S/driver.log $S/out/ 2>/dev/null; python3 $S/driver.py collect --out $S/out --tar $OUT/results.tgz ;;
collect)
  export PYTHONPATH=$S/src
  wait_end=$(( $(date +%s) + ${2:-0} ))
  while [ $(date +%s) -lt $wait_end ] && ! grep -q '"all done"' $S/driver.log 2>/dev/null; do sleep 10; done
  grep '"end"\|not started\|all done' $S/driver.log | tail -40
  cp $S/revision $S/driver.log $S/out/ 2>/dev/null
  python3 $S/driver.py collect --out $S/out --tar $OUT/results.tgz && ls -la $OUT ;;
*)
  echo "usage: $0 prepare|part1|part2|wait [seconds]|collect"; exit 2 ;;
esac
