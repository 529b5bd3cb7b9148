#!/usr/bin/env bash
# Behaviour check for a refactor: a fixed-seed tiny run of every method, its evaluation (with the
# latent diagnostics for latent methods), `kava inspect`, `kava ask` and `kava export`, into OUT_DIR.
# Run it on two checkouts, then compare the two trees with experiments/refactor/compare_run_dirs.py:
#
#   git worktree add /tmp/base 8297f61
#   PY=.venv/bin/python bash experiments/refactor/equivalence.sh /tmp/base  /tmp/eq/base
#   PY=.venv/bin/python bash experiments/refactor/equivalence.sh .          /tmp/eq/new
#   python experiments/refactor/compare_run_dirs.py /tmp/eq/base /tmp/eq/new
#
# SRC_ROOT is the checkout whose src/ is imported (PYTHONPATH); PY the interpreter (default python).
set -euo pipefail
SRC=$(cd "${1:?SRC_ROOT}" && pwd)
OUT=${2:?OUT_DIR}
PY=${PY:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$SRC/src" KAVA_CACHE="$OUT/.cache" OMP_NUM_THREADS=1
kava() { "$PY" -m kava.cli "$@"; }
SET=(--set model.from_scratch.hidden_size=64 --set model.from_scratch.intermediate_size=128
     --set model.from_scratch.num_hidden_layers=2 --set optim.effective_batch=16 --set optim.micro_batch=8
     --set optim.max_steps=6 --set run.eval_every=3 --set run.save_every=3 --set run.log_every=1
     --set data.synth_train_size=400 --set data.synth_eval_size=40 --set data.valid_limit=12
     --set latent.num_latents=6 --set run.grad_share_every=2 --set run.log=[jsonl] --set run.output_dir="$OUT")
for m in cot nocot icot pccot codi coconut kava; do
  extra=()  # the curricula: iCoT a token every step; Coconut 3 stages of 2 thoughts (= the 6 latents), 2 steps each
  [ "$m" = icot ] && extra=(--set icot.tokens_per_epoch=25)
  [ "$m" = coconut ] && extra=(--set coconut.max_stages=3 --set coconut.thoughts_per_step=2
                               --set latent.projection=identity --set coconut.epochs_per_stage=0.08)
  kava train --config tiny_synth --no-progress --set method=$m --set run.name=$m "${SET[@]}" "${extra[@]}" \
    > "$OUT/$m.train.out" 2>&1
  diag=(); [ "$m" = cot ] || [ "$m" = nocot ] || [ "$m" = icot ] || diag=(--diagnostics)
  kava eval --checkpoint "$OUT/$m" --datasets synth-test,synth-hard --limit 10 --batch-size 4 "${diag[@]}" \
    > "$OUT/$m.eval.out" 2>&1
  kava ask --checkpoint "$OUT/$m" --question "Tom has 3 apples and buys 4 more. How many?" --device cpu \
    $( [ "$m" = cot ] || [ "$m" = nocot ] || [ "$m" = icot ] || echo --show-latents ) | grep -v '^time:' > "$OUT/$m.ask.out" 2>&1
done
# a second eviction rule and the prefix softmax (what `kava inspect` now honours), random eviction for the RNG
kava train --config tiny_synth --no-progress --set method=kava --set run.name=kava_prefix "${SET[@]}" \
  --set eviction.importance_softmax=prefix --set eviction.method=attention > "$OUT/kava_prefix.train.out" 2>&1
kava train --config tiny_synth --no-progress --set method=kava --set run.name=kava_random "${SET[@]}" \
  --set eviction.method=random > "$OUT/kava_random.train.out" 2>&1
kava eval --checkpoint "$OUT/kava_random" --datasets synth-test --limit 8 --batch-size 4 --diagnostics \
  > "$OUT/kava_random.eval.out" 2>&1
kava inspect --checkpoint "$OUT/kava" --question "Tom has 3 apples and buys 4 more. How many?" \
  --cot "<<3+4=7>>" --answer 7 --output "$OUT/kava.inspect.png" > "$OUT/kava.inspect.out" 2>&1
# a prefix-softmax run: issue 20 fixed `kava inspect` to use it (the base commit used the cot softmax here)
kava inspect --checkpoint "$OUT/kava_prefix" --question "Tom has 3 apples and buys 4 more. How many?" \
  --cot "<<3+4=7>> <<7*2=14>>" --answer 14 --output "$OUT/kava_prefix.inspect.png" > "$OUT/kava_prefix.inspect.out" 2>&1
kava export "$OUT/kava" --output "$OUT/kava.export" > "$OUT/kava.export.out" 2>&1
rm -f "$OUT/kava.inspect.png" "$OUT/kava_prefix.inspect.png"  # matplotlib's PNG carries its version; the printed kept tokens are compared
rm -rf "$OUT/.cache"
echo "done: $OUT"
