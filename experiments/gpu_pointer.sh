#!/usr/bin/env bash
# The pointer-chasing instrument (issue 22 §2) on one GPU, in one call of at most 9 minutes wall:
#   OUT=/path/that/comes/back bash experiments/gpu_pointer.sh
# Run from the repo root (PYTHONPATH=$PWD/src; torch, transformers, accelerate, tokenizers preinstalled).
#
# Jobs, concurrently in the background on the one GPU:
#   backbone       synth_pointer_backbone: 2-layer CoT from scratch; stopped by validation (pointer_watch.py:
#                  val >= BB_STOP or a plateau) or at BB_BUDGET s
#   nocot-scratch  the same model and data with method=nocot, from scratch, for the full optim.max_steps
#                  (no early stop: No-CoT gets at least the samples any latent method gets), best/ by validation
#   <m>-s42        for m in STUDENTS (default nocot): synth_pointer_student from the backbone's best/, the full
#                  optim.max_steps or until the time left runs out, best/ by validation
# then `kava eval` of every run's best/ on synth-test and synth-hard, accuracy by k (per_depth.py, chance in every
# table), the validation curves with a plateau flag (pointer_watch.py curves) -> summary.md.
#
# $OUT receives at most 5 files: env.txt, driver.log, summary.md, pointer.tgz (every log, metrics.jsonl,
# config, eval summary/predictions and table; no checkpoints), and the backbone's best/ as backbone_best.tgz
# when PACK_BACKBONE=1. Packing runs on exit, also after an error or a TERM.
#
# Knobs (environment): WALL (s from start to packed archive, 510), BB_BUDGET (240), BB_STOP (0.995),
# EVAL_RESERVE (s kept for eval + packing, 100), STUDENTS ("nocot"; e.g. "nocot cot"), SCRATCH (1: train
# nocot-scratch), BB_SETS / NC_SETS / ST_SETS (space-separated key=value overrides for the backbone /
# nocot-scratch / students), DATA_SETS (data.* overrides for every job and the data generation, e.g. smaller
# synth_train_size for a CPU check), W (work dir, /tmp/pointer), PY (python).
# CPU check of the logic (tiny, ~3 min): see results/pointer/README.md ("driver check").
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PY:-python}
W=${W:-/tmp/pointer}
WALL=${WALL:-510}
BB_BUDGET=${BB_BUDGET:-240}
BB_STOP=${BB_STOP:-0.995}
EVAL_RESERVE=${EVAL_RESERVE:-100}
STUDENTS=${STUDENTS:-nocot}
SCRATCH=${SCRATCH:-1}
BB_SETS=${BB_SETS:-}
NC_SETS=${NC_SETS:-}
ST_SETS=${ST_SETS:-}
DATA_SETS=${DATA_SETS:-}
T0=$(date +%s)
mkdir -p "$OUT" "$W/logs" "$W/results"
LOG=$OUT/driver.log
log() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( T0 + WALL - $(date +%s) )); }
sets() { local s; for s in $1; do printf -- '--set\n%s\n' "$s"; done; }
declare -A PID=()
RUNS=()
PACKED=0

pack() {
  [ "$PACKED" = 1 ] && return
  PACKED=1
  log "packing"
  for p in "${PID[@]}"; do kill -TERM "$p" 2>/dev/null; done
  {
    echo "# Pointer-chasing instrument, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "Chance: 1/N = $($PY -c "import json,glob; m=json.load(open(glob.glob('$W/_data/pointer_*/meta.json')[0])); print(f\"{100*m['chance']:.1f}% (N={m['num_symbols']}), train k {m['min_hops']}..{m['max_hops']}, hard k {m['hard_hops']}\")" 2>/dev/null || echo '?')"
    echo
    echo "## Validation curves (the trainer's val/accuracy, mode of the method)"
    echo
    $PY experiments/pointer_watch.py curves "${RUNS[@]/#/$W/}" 2>&1
    for split in test hard; do
      echo
      echo "## synth-$split by k"
      echo
      cat "$W/results/$split/depth.md" 2>/dev/null || echo "(no table: see driver.log)"
    done
    echo
    echo "## Throughput (last progress line of each training log)"
    echo
    for r in "${RUNS[@]}"; do echo "- $r: $(grep -a 'steps/s' "$W/logs/$r.log" 2>/dev/null | tail -1)"; done
  } > "$OUT/summary.md"
  tar czf "$OUT/pointer.tgz" -C "$W" --exclude='*/checkpoints' --exclude='*/best' --exclude='*/final' \
    --exclude='_data' --exclude='*/tb' --exclude='*/tokenizer_src' --exclude='.*.tmp' . 2>>"$LOG"
  [ "${PACK_BACKBONE:-0}" = 1 ] && [ -d "$W/backbone/best" ] && tar czf "$OUT/backbone_best.tgz" -C "$W" backbone/best backbone/config.yaml
  ls -la "$OUT" >> "$LOG"
}
trap pack EXIT
trap 'log "TERM"; exit 143' TERM INT

# train NAME BUDGET_S "WATCH ARGS" kava-train-args...: starts `kava train` (and its watcher) in the background
train() {
  local name=$1 budget=$2 wargs=$3
  shift 3
  if [ "$budget" -lt 20 ]; then log "$name: not started (${budget}s left)"; return; fi
  timeout -k 15 "$budget" $PY -m kava.cli train --no-progress "$@" $(sets "$DATA_SETS") --set "run.output_dir=$W" --set "run.name=$name" \
    > "$W/logs/$name.log" 2>&1 &
  PID[$name]=$!
  RUNS+=("$name")
  [ -n "$wargs" ] && $PY experiments/pointer_watch.py watch "$W/$name" --pid "${PID[$name]}" $wargs \
    >> "$W/logs/$name.watch.log" 2>&1 &
  log "$name: started (pid ${PID[$name]}, at most ${budget}s)"
}
finish() {  # finish NAME: wait for it and log how it ended
  local name=$1 rc
  [ -n "${PID[$name]:-}" ] || return
  wait "${PID[$name]}"; rc=$?
  unset "PID[$name]"
  log "$name: ended rc=$rc (0: max_steps reached; 124: time budget; else stopped or failed: see the watch log) $(
    tail -1 "$W/logs/$name.watch.log" 2>/dev/null); best: $(cat "$W/$name/best/meta.json" 2>/dev/null | tr -d '\n ' | cut -c1-120)"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import sys, torch, transformers, accelerate, tokenizers; print(sys.version.split()[0], torch.__version__, transformers.__version__, accelerate.__version__, tokenizers.__version__, torch.cuda.is_available())" 2>&1
  nproc
} > "$OUT/env.txt"
log "env: $(tail -2 "$OUT/env.txt" | tr '\n' ' ')"

# the data once, before the concurrent jobs (every job names the same folder: synthetic_name of the presets)
$PY - "$W" $DATA_SETS <<'EOF' >> "$LOG" 2>&1
import sys, time
from pathlib import Path
from kava.config import load_config
from kava.data.pipeline import synthetic_dir, synthetic_name
t = time.time()
a, b = load_config("synth_pointer_backbone", sys.argv[2:]), load_config("synth_pointer_student", sys.argv[2:])
assert synthetic_name(a) == synthetic_name(b), (synthetic_name(a), synthetic_name(b))
print(f"data: {synthetic_dir(a, Path(sys.argv[1]) / '_data')} in {time.time() - t:.1f}s")
EOF
DATA=$(ls -d "$W"/_data/pointer_* 2>/dev/null | head -1)
[ -n "$DATA" ] || { log "no data generated (BB_SETS/NC_SETS/ST_SETS may change the data keys: set them in the presets instead)"; exit 1; }
log "data: $DATA"

train backbone "$BB_BUDGET" "--stop-at $BB_STOP --patience 4" --config synth_pointer_backbone $(sets "$BB_SETS")
if [ "$SCRATCH" = 1 ]; then
  train nocot-scratch $(( $(left) - EVAL_RESERVE )) "" --config synth_pointer_backbone --set method=nocot \
    --set data.cot_style=equation --set run.seed=42 $(sets "$NC_SETS")
fi
finish backbone
if [ -d "$W/backbone/best" ]; then
  for m in $STUDENTS; do
    train "$m-s42" $(( $(left) - EVAL_RESERVE )) "" --config synth_pointer_student --set "method=$m" \
      --set "model.init_from=$W/backbone/best" $(sets "$ST_SETS")
  done
else
  log "backbone has no best/: no students"
fi
for r in "${RUNS[@]}"; do finish "$r"; done

log "eval"
EV=()
for r in "${RUNS[@]}"; do
  if [ -d "$W/$r/best" ]; then
    t=$(( $(left) - 25 )); [ "$t" -lt 30 ] && t=30
    timeout -k 10 "$t" $PY -m kava.cli eval --checkpoint "$W/$r" --datasets synth-test,synth-hard \
      --batch-size 500 > "$W/logs/$r.eval.log" 2>&1 &
    EV+=($!)
  else
    log "$r: no best/ to evaluate"
  fi
done
for p in "${EV[@]}"; do wait "$p" || log "an eval ended with rc=$?"; done
for split in test hard; do
  $PY experiments/per_depth.py "${RUNS[@]/#/$W/}" --data-dir "$DATA" --split "$split" --output "$W/results/$split" \
    >> "$LOG" 2>&1 || log "per_depth $split failed"
done
log "done in $(( $(date +%s) - T0 ))s"
exit 0
