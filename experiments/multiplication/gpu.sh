#!/usr/bin/env bash
# experiments/multiplication/driver.py on one device machine, over several calls of one lease.
# Here, once:  bash experiments/multiplication/gpu.sh prepare      # .carry/mult: the published 4x4 / 5x5 files
# Device calls, each within the warm window of the one before:
#   call 1, carry [.carry/mult]:  JOBS=gate,icot BUDGET=1000 bash experiments/multiplication/gpu.sh start 500
#   calls 2..:                    bash experiments/multiplication/gpu.sh wait 560
# Every call packs what exists into $OUT/results.tgz (no weights): a lease that ends early still brings results.
# The jobs run from a copy of the source in /root/mult/src, so later calls' tree copies cannot change them.
set -uo pipefail
S=${MULT_ROOT:-/root/mult}
report() {
  export PYTHONPATH=$S/src
  tail -5 $S/driver.log; python3 $S/driver.py status --out $S/out
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  for f in $S/out/logs/*.log; do echo "== $f"; grep -v Warn $f | tail -2 | cut -c1-400; done 2>/dev/null
  cp $S/driver.log $S/out/ 2>/dev/null; python3 $S/driver.py pack --out $S/out --tar $OUT/results.tgz
}
case "${1:-}" in
prepare)
  data=${DATA:-../shared/data}
  rm -rf .carry/mult && mkdir -p .carry/mult/data/multiplication
  grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
  for n in 4 5; do cp -r "$data/multiplication/${n}x${n}" .carry/mult/data/multiplication/; done
  { git rev-parse HEAD; git status --short; } > .carry/mult/revision
  du -sh .carry/mult ;;
start)
  mkdir -p $S && cp -r .carry/mult/data .carry/mult/revision $S/ && rm -rf $S/src && mkdir -p $S/src
  cp -r src/kava $S/src/ && cp experiments/multiplication/driver.py $S/
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
  # CUDA MPS lets the jobs' small kernels run side by side instead of time-sliced; used only if it works here
  if command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=$S/mps/pipe CUDA_MPS_LOG_DIRECTORY=$S/mps/log
    # the daemon must not hold this call's output open (a `| tail` on the call then waits for it until the limit)
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d >/dev/null 2>&1 </dev/null && sleep 2
    if timeout 60 python3 -c "import torch; x = torch.randn(64, 64, device='cuda'); print(float((x @ x).sum()))"; then
      echo "MPS: on"; else echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; echo "MPS: off"; fi
  fi
  cd $S && PYTHONPATH=$S/src PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True setsid nohup python3 driver.py run \
    --data $S/data --out $S/out --jobs ${JOBS:-gate,icot} --budget ${BUDGET:-1000} ${SEEDS:+--seeds $SEEDS} ${EXTRA:-} \
    > $S/driver.log 2>&1 < /dev/null &
  cd - >/dev/null
  end=$(( $(date +%s) + ${2:-500} ))
  while [ $(date +%s) -lt $end ] && ! grep -q '"all done"' $S/driver.log 2>/dev/null; do sleep 10; done
  report ;;
wait)
  end=$(( $(date +%s) + ${2:-560} ))
  while [ $(date +%s) -lt $end ] && ! grep -q '"all done"' $S/driver.log 2>/dev/null; do sleep 10; done
  report ;;
*) echo "usage: $0 prepare | start [SECONDS] | wait [SECONDS]"; exit 2 ;;
esac
