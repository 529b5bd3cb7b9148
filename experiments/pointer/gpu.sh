#!/usr/bin/env bash
# The pointer-chasing instrument (issue 22 §2) on one GPU, in one call of at most 9 minutes wall:
#   OUT=/path/that/comes/back bash experiments/pointer/gpu.sh
# Run from the repo root (PYTHONPATH=$PWD/src; torch, transformers, accelerate, tokenizers preinstalled).
#
# For each depth L in LAYERS (default "2 3": 2 is the issue's model; 3 is a hedge in case the 2-layer CoT does
# not form its lookup circuit in the time, and No-CoT with 3 layers still has about one hop), concurrently in the
# background on the one GPU:
#   backbone-L<L>       synth_pointer_backbone with L layers: CoT from scratch; stopped by validation
#                       (watch.py: val >= BB_STOP, or a plateau at >= 0.9) or at BB_BUDGET s
#   nocot-scratch-L<L>  the same model and data with method=nocot from scratch, for the full optim.max_steps or
#                       until the time left runs out (no early stop: No-CoT gets at least the samples any latent
#                       method gets), best/ by validation
#   <m>-L<L>-s42        for m in STUDENTS (default nocot), once backbone-L<L> ends: synth_pointer_student from
#                       its best/, the full optim.max_steps or until the time left runs out, best/ by validation
# then `kava eval` of every run's best/ on synth-test and synth-hard, accuracy by k (per_depth.py, chance in every
# table), the validation curves with a plateau flag (watch.py curves) -> summary.md.
#
# $OUT receives at most 4 files: env.txt, driver.log, summary.md, pointer.tgz (every log, metrics.jsonl,
# config, eval summary/predictions and table; no checkpoints; with PACK_BACKBONE=1 also the backbones' best/).
# Packing runs on exit, also after an error or a TERM.
#
# Knobs (environment): LAYERS ("2 3"), WALL (s from start to packed archive, 510), BB_BUDGET (240), BB_STOP
# (0.995), EVAL_RESERVE (s kept for eval + packing, 100), STUDENTS ("nocot"; e.g. "nocot cot"), SCRATCH (1: train
# nocot-scratch), BB_SETS / NC_SETS / ST_SETS (space-separated key=value overrides for the backbones /
# nocot-scratch / students), DATA_SETS (data.* overrides for every job and the data generation, e.g. a smaller
# synth_train_size for a CPU check), W (work dir, /tmp/pointer), PY (python).
# CPU check of the logic (tiny model, ~3 min): the "driver check" command in results/pointer/README.md.
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
LAYERS=${LAYERS:-2 3}
DATA_SETS=${DATA_SETS:-}
T0=$(date +%s)
mkdir -p "$OUT" "$W/logs" "$W/results"
LOG=$OUT/driver.log
log() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( T0 + WALL - $(date +%s) )); }
sets() { local s; for s in $1; do printf -- '--set\n%s\n' "$s"; done; }
PIDS=()       # this shell's background jobs (trainings, variant pipelines, evals)
PACKED=0

runs() {  # the run dirs under $W, in start order
  local d
  for d in $(ls -dtr "$W"/*/ 2>/dev/null); do
    d=${d%/}
    [ -f "$d/config.yaml" ] && echo "$d"
  done
}

pack() {
  [ "$PACKED" = 1 ] && return
  PACKED=1
  log "packing"
  local p r
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  local R=($(runs))
  {
    echo "# Pointer-chasing instrument, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "Chance: 1/N = $($PY -c "import json,glob; m=json.load(open(glob.glob('$W/_data/pointer_*/meta.json')[0])); print(f\"{100*m['chance']:.1f}% (N={m['num_symbols']}), train k {m['min_hops']}..{m['max_hops']}, hard k {m['hard_hops']}\")" 2>/dev/null || echo '?')"
    echo
    echo "## Validation curves (the trainer's val/accuracy, each method in its own mode)"
    echo
    [ ${#R[@]} -gt 0 ] && $PY experiments/pointer/watch.py curves "${R[@]}" 2>&1
    for split in test hard; do
      echo
      echo "## synth-$split by k"
      echo
      cat "$W/results/$split/depth.md" 2>/dev/null || echo "(no table: see driver.log)"
    done
    echo
    echo "## How each training ended, and its throughput"
    echo
    for r in "${R[@]}"; do
      r=$(basename "$r")
      echo "- $r: $(tail -1 "$W/logs/$r.watch.log" 2>/dev/null) $(grep -a 'steps/s' "$W/logs/$r.log" 2>/dev/null | tail -1)"
    done
  } > "$OUT/summary.md"
  local keep=(--exclude='*/best')
  [ "${PACK_BACKBONE:-0}" = 1 ] && keep=()
  tar czf "$OUT/pointer.tgz" -C "$W" --exclude='*/checkpoints' "${keep[@]}" --exclude='*/final' \
    --exclude='_data' --exclude='*/tb' --exclude='*/tokenizer_src' --exclude='.*.tmp' . 2>>"$LOG"
  ls -la "$OUT" >> "$LOG"
}
trap pack EXIT
trap 'log "TERM"; exit 143' TERM INT

# train NAME BUDGET_S "WATCH ARGS" kava-train-args...: `kava train` under `timeout`, with its watcher when WATCH
# ARGS is not empty; runs in the foreground (callers put it in the background). Returns train's status.
train() {
  local name=$1 budget=$2 wargs=$3 pid rc
  shift 3
  trap - EXIT  # a background subshell: the main shell packs
  if [ "$budget" -lt 20 ]; then log "$name: not started (${budget}s left)"; return 1; fi
  log "$name: starting (at most ${budget}s)"
  timeout -k 15 "$budget" $PY -m kava.cli train --no-progress "$@" $(sets "$DATA_SETS") \
    --set "run.output_dir=$W" --set "run.name=$name" > "$W/logs/$name.log" 2>&1 &
  pid=$!
  trap 'kill -TERM $pid 2>/dev/null; exit 143' TERM  # timeout passes it on to kava train
  if [ -n "$wargs" ]; then
    $PY experiments/pointer/watch.py watch "$W/$name" --pid "$pid" $wargs >> "$W/logs/$name.watch.log" 2>&1 &
  else
    echo "[watch $name] none: trained to optim.max_steps or the time budget, best/ by validation" > "$W/logs/$name.watch.log"
  fi
  wait "$pid"; rc=$?
  log "$name: ended rc=$rc (0: optim.max_steps; 124: time budget; 143: stopped by its watcher) $(
    tail -1 "$W/logs/$name.watch.log" 2>/dev/null | cut -c1-160); best: $(tr -d '\n ' < "$W/$name/best/meta.json" 2>/dev/null | cut -c1-100)"
  return $rc
}

variant() {  # variant L: backbone-L<L>, then its students, in this subshell
  local L=$1 m sp=()
  trap - EXIT
  train "backbone-L$L" "$BB_BUDGET" "--stop-at $BB_STOP --patience 4 --floor 0.9" --config synth_pointer_backbone \
    --set "model.from_scratch.num_hidden_layers=$L" $(sets "$BB_SETS")  # its TERM trap stops the backbone
  trap 'for p in "${sp[@]}"; do kill -TERM "$p" 2>/dev/null; done; exit 143' TERM
  if [ ! -d "$W/backbone-L$L/best" ]; then log "backbone-L$L has no best/: no students"; return; fi
  for m in $STUDENTS; do
    train "$m-L$L-s42" $(( $(left) - EVAL_RESERVE )) "" --config synth_pointer_student --set "method=$m" \
      --set "model.init_from=$W/backbone-L$L/best" $(sets "$ST_SETS") &
    sp+=($!)
  done
  wait
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
[ -n "$DATA" ] || { log "no data generated (see above)"; exit 1; }
log "data: $DATA"

for L in $LAYERS; do
  variant "$L" &
  PIDS+=($!)
  if [ "$SCRATCH" = 1 ]; then
    train "nocot-scratch-L$L" $(( $(left) - EVAL_RESERVE )) "" --config synth_pointer_backbone --set method=nocot \
      --set "model.from_scratch.num_hidden_layers=$L" --set data.cot_style=equation --set run.seed=42 \
      $(sets "$BB_SETS") $(sets "$NC_SETS") &
    PIDS+=($!)
  fi
done
wait
log "training over"

log "eval"
R=($(runs))
for r in "${R[@]}"; do
  if [ -d "$r/best" ]; then
    t=$(( $(left) - 25 )); [ "$t" -lt 30 ] && t=30
    ( trap - EXIT
      timeout -k 10 "$t" $PY -m kava.cli eval --checkpoint "$r" --datasets synth-test,synth-hard \
        --batch-size 500 > "$W/logs/$(basename "$r").eval.log" 2>&1 &
      e=$!
      trap 'kill -TERM $e 2>/dev/null; exit 143' TERM
      wait $e; rc=$?
      [ $rc = 0 ] || log "$(basename "$r"): eval ended rc=$rc (124: out of time)" ) &
    PIDS+=($!)
  else
    log "$(basename "$r"): no best/ to evaluate"
  fi
done
wait
for split in test hard; do
  $PY experiments/per_depth.py "${R[@]}" --data-dir "$DATA" --split "$split" --output "$W/results/$split" \
    >> "$LOG" 2>&1 || log "per_depth $split failed"
done
log "done in $(( $(date +%s) - T0 ))s"
exit 0
