#!/usr/bin/env bash
# 3x3 multiplication on a CPU (2 cores, ~25 minutes for the first five runs, ~50 for all): a 2-layer, 4-head, width-128 GPT-2 from scratch; No-CoT,
# CoT, then iCoT from the CoT model at iCoT's rate (8 CoT tokens removed per epoch of 60,000 problems). Not the
# published benchmark (4x4 and 5x5 on a GPU: results/multiplication/README.md), a small instance of it.
#   bash experiments/multiplication/cpu_3x3.sh OUT      # runs in OUT/runs, then each best/ on the generated test split
set -euo pipefail
OUT=${1:?usage: cpu_3x3.sh OUT}
K=${KAVA:-kava}
COMMON=(--config mult4_scratch --no-progress --set data.synth_digits=3 --set data.synth_train_size=60000
  --set data.synth_eval_size=500 --set "data.synth_exclude=[]" --set data.valid_source=null --set data.valid_limit=300
  --set model.from_scratch.n_embd=128 --set model.from_scratch.n_positions=96 --set optim.effective_batch=64
  --set optim.micro_batch=64 --set optim.lr=1e-3 --set run.eval_every=250 --set run.save_every=1000000
  --set run.eval_batch_size=300 --set run.eval_max_cot_tokens=60 --set run.output_dir=$OUT/runs)
# (the CoT is 24 tokens; a budget of 160, as first run, now stops with an error: 7 + 160 + 1 + 24 positions > 96)
$K train "${COMMON[@]}" --set method=nocot --set optim.max_steps=3000 --set run.name=nocot3
$K train "${COMMON[@]}" --set method=cot --set optim.max_steps=2000 --set run.name=cot3
$K train --resume $OUT/runs/cot3 --set optim.max_steps=5000 --no-progress   # (as run on 2026-12-07: 2,000 then 5,000)
$K train "${COMMON[@]}" --set method=icot --set optim.max_steps=4000 --set icot.tokens_per_epoch=8 \
  --set model.init_from=$OUT/runs/cot3 --set run.name=icot3fc
$K train "${COMMON[@]}" --set method=icot --set optim.max_steps=4000 --set icot.tokens_per_epoch=8 --set optim.lr=1e-4 \
  --set model.init_from=$OUT/runs/cot3 --set run.name=icot3fc-lr1e4
# added later the same day: iCoT from the CoT model with the removed tokens' positions kept empty
# (icot.keep_position), and iCoT from scratch at 2 tokens per epoch (one per 469 steps, 3.4x the official rate per
# problem: the official rate would take ~38k steps here)
$K train "${COMMON[@]}" --set method=icot --set optim.max_steps=4000 --set icot.tokens_per_epoch=8 \
  --set icot.keep_position=true --set model.init_from=$OUT/runs/cot3 --set run.name=icot3fc-keep
$K train "${COMMON[@]}" --set method=icot --set optim.max_steps=14000 --set icot.tokens_per_epoch=2 --set run.name=icot3s-r2
TEST=$(ls -d $OUT/runs/_data/mult3_*)/test.txt
for r in nocot3 cot3 icot3fc icot3fc-lr1e4 icot3fc-keep icot3s-r2; do $K eval --checkpoint $OUT/runs/$r --datasets $TEST; done
# 2026-12-07, third session: iCoT from scratch at about twice the official rate per problem (4 tokens per epoch of
# 200,000 problems: one per 781 steps of 64, 50k problems; all 24 gone at ~18.7k steps), with and without the
# removed tokens' positions kept: the CPU twin of the GPU runs icot4-keep-r16 / icot4-off
# (results/multiplication/README.md). ~65 minutes, the two side by side with one thread each (OMP_NUM_THREADS=1)
R=(--set data.synth_train_size=200000 --set method=icot --set icot.tokens_per_epoch=4 --set optim.max_steps=21000
  --set run.eval_every=781)
$K train "${COMMON[@]}" "${R[@]}" --set run.name=icot3s-r4
$K train "${COMMON[@]}" "${R[@]}" --set icot.keep_position=true --set run.name=icot3s-r4-keep
TEST=$(ls -d $OUT/runs/_data/mult3_s0_n200000_*)/test.txt
for r in icot3s-r4 icot3s-r4-keep; do $K eval --checkpoint $OUT/runs/$r --datasets $TEST; done
# then, alone (~25 minutes): iCoT from the CoT model (cot3, 99.8%) at the same rate, with kept positions
$K train "${COMMON[@]}" "${R[@]}" --set icot.keep_position=true --set model.init_from=$OUT/runs/cot3 \
  --set run.name=icot3fc-r4-keep
$K eval --checkpoint $OUT/runs/icot3fc-r4-keep --datasets $TEST
# 2026-12-07, fourth session, revisions 283a1bc and 78fa88a (OUT=/work/cpu4; cot3 trained straight to 5,000 steps,
# `kava train ... --set method=cot --set optim.max_steps=5000 --set run.name=cot3`: the same weights as before, by
# its logged gradient norms). Two runs side by side with one thread each (~70 minutes): the one above again, with
# this revision's validation (teacher-forced accuracy `val/tf_*`, each answer place `val/placeK`), and the same at
# batch 16 (a token every 3,125 steps: 4x the optimizer updates per removed token at the same samples)
export OMP_NUM_THREADS=1
$K train "${COMMON[@]}" "${R[@]}" --set icot.keep_position=true --set model.init_from=$OUT/runs/cot3 \
  --set run.name=icot3fc-r4-keep-tf
$K train "${COMMON[@]}" --set data.synth_train_size=200000 --set method=icot --set icot.tokens_per_epoch=4 \
  --set optim.max_steps=84000 --set run.eval_every=3125 --set optim.effective_batch=16 --set optim.micro_batch=16 \
  --set icot.keep_position=true --set model.init_from=$OUT/runs/cot3 --set run.name=icot3fc-r4-keep-b16
for r in icot3fc-r4-keep-tf icot3fc-r4-keep-b16; do $K eval --checkpoint $OUT/runs/$r --datasets $TEST; done
# then seed 43 with two threads (revision 7d11031, ~35 minutes alone): how often does it internalise?
OMP_NUM_THREADS=2 $K train "${COMMON[@]}" "${R[@]}" --set icot.keep_position=true --set model.init_from=$OUT/runs/cot3 \
  --set run.seed=43 --set run.name=icot3fc-r4-keep-s43t2
$K eval --checkpoint $OUT/runs/icot3fc-r4-keep-s43t2 --datasets $TEST
# 2026-12-07, fifth session (OUT=/work/cpu4): seed 44 with one thread (revision bf7b742, ~60 minutes), then the no-CoT
# tail: seed 43's and seed 44's runs resumed to 45,000 steps (~25 minutes each, one thread), each from a copy of its
# run directory (the first run stays as it ended); then on to 90,000
OMP_NUM_THREADS=1 $K train "${COMMON[@]}" "${R[@]}" --set icot.keep_position=true --set model.init_from=$OUT/runs/cot3 \
  --set run.seed=44 --set run.name=icot3fc-r4-keep-s44t1
$K eval --checkpoint $OUT/runs/icot3fc-r4-keep-s44t1 --datasets $TEST
for r in icot3fc-r4-keep-s43t2 icot3fc-r4-keep-s44t1; do
  cp -r $OUT/runs/$r $OUT/runs/$r-tail && rm -rf $OUT/runs/$r-tail/DONE $OUT/runs/$r-tail/eval
  OMP_NUM_THREADS=1 $K train --resume $OUT/runs/$r-tail --set optim.max_steps=45000 --no-progress
  $K eval --checkpoint $OUT/runs/$r-tail --datasets $TEST
  cp -r $OUT/runs/$r-tail $OUT/runs/$r-tail2 && rm -rf $OUT/runs/$r-tail2/DONE $OUT/runs/$r-tail2/eval
  OMP_NUM_THREADS=1 $K train --resume $OUT/runs/$r-tail2 --set optim.max_steps=90000 --no-progress
  $K eval --checkpoint $OUT/runs/$r-tail2 --datasets $TEST
done
# 2026-12-07, sixth session (OUT=/work/cpu4, revision 9c87228, one thread each, two at a time): is the gap real at a
# larger No-CoT budget, and does a latent student learn the product? No-CoT from scratch for 30,000 steps of the
# 200,000 problems (~40 minutes); No-CoT, KaVa (M 4, T 3, alpha_kv 5) and PCCoT from the CoT model (cot3) for 12,000
# steps each (~15, ~65 and ~65 minutes)
R2=(--set data.synth_train_size=200000 --set run.eval_every=1000)
export OMP_NUM_THREADS=1
$K train "${COMMON[@]}" "${R2[@]}" --set method=nocot --set optim.max_steps=30000 --set run.name=nocot3-long
$K train "${COMMON[@]}" "${R2[@]}" --set method=nocot --set optim.max_steps=12000 --set model.init_from=$OUT/runs/cot3 \
  --set run.name=nocot3fc
$K train "${COMMON[@]}" "${R2[@]}" --set method=kava --set loss.alpha_kv=5 --set optim.max_steps=12000 \
  --set model.init_from=$OUT/runs/cot3 --set run.name=kava3
$K train "${COMMON[@]}" "${R2[@]}" --set method=pccot --set optim.max_steps=12000 --set model.init_from=$OUT/runs/cot3 \
  --set run.name=pccot3   # (stopped by SIGTERM at step 10,027: the session's end; `kava train --resume` continues it)
TEST=$(ls -d $OUT/runs/_data/mult3_s0_n200000_*)/test.txt
for r in nocot3-long nocot3fc; do $K eval --checkpoint $OUT/runs/$r --datasets $TEST; done
for r in kava3 pccot3; do $K eval --checkpoint $OUT/runs/$r --datasets $TEST --diagnostics; done
# 2026-12-07, seventh session (OUT=/work/cpu4, revision 63161a2, one thread each): pccot3 resumed to its 12,000
# steps (~12 minutes); beside it a 4-layer CoT model (5,000 steps, ~30 minutes) and iCoT from it, seed 43 (the seed
# at which the 2-layer configuration gave 5.6%): does depth make the internalisation reliable?
$K train --resume $OUT/runs/pccot3 --no-progress
$K eval --checkpoint $OUT/runs/pccot3 --datasets $TEST --diagnostics
$K train "${COMMON[@]}" --set model.from_scratch.n_layer=4 --set method=cot --set optim.max_steps=5000 --set run.name=cot3-4l
$K eval --checkpoint $OUT/runs/cot3-4l --datasets $TEST
# (the iCoT run with two threads, ~85 minutes: with one it ran at 2.8 steps/s, two hours)
OMP_NUM_THREADS=2 $K train "${COMMON[@]}" "${R[@]}" --set model.from_scratch.n_layer=4 --set icot.keep_position=true \
  --set model.init_from=$OUT/runs/cot3-4l --set run.seed=43 --set run.name=icot3fc-r4-keep-4l-s43 --set run.save_every=2000
$K eval --checkpoint $OUT/runs/icot3fc-r4-keep-4l-s43 --datasets $TEST
# then the no-CoT tail of the 4-layer run, from a copy of its run directory (two threads, ~45 minutes)
cp -r $OUT/runs/icot3fc-r4-keep-4l-s43 $OUT/runs/icot3fc-r4-keep-4l-s43-tail
OMP_NUM_THREADS=2 $K train --resume $OUT/runs/icot3fc-r4-keep-4l-s43-tail --set optim.max_steps=45000 --no-progress
$K eval --checkpoint $OUT/runs/icot3fc-r4-keep-4l-s43-tail --datasets $TEST
