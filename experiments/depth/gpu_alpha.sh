#!/usr/bin/env bash
# Device call: the alpha2 (KV-loss weight) ablation of the depth testbed, from the depth backbone carried in .carry/.
#   bash experiments/depth/gpu_alpha.sh    (carry: .carry)
# Runs kava with loss.alpha_kv in ALPHAS x SEEDS for up to STEPS steps (killed at TRAIN_S seconds; each run's
# validation-selected best/ is evaluated), then `kava eval --latent-ablations zeros,shuffle --kv-match` on synth-test.
set -uo pipefail
O=/tmp/alpha
source experiments/depth/carry.sh
pids=()
for a in ${ALPHAS:-5 10}; do for s in ${SEEDS:-42 123}; do
  python -m kava.cli train --config synth_depth_student --no-progress --set model.init_from=$O/backbone \
    --set loss.alpha_kv=$a --set run.seed=$s --set optim.max_steps=${STEPS:-500} --set run.output_dir=$O \
    --set run.name=kava-a$a-eq-s$s --set preset=kava-alpha$a --set run.grad_share_every=50 > $O/train-a$a-s$s.log 2>&1 &
  pids+=($!)
done; done
sleep ${TRAIN_S:-270}; kill ${pids[@]} 2>/dev/null; wait
for r in $O/kava-a*; do
  python -m kava.cli eval --checkpoint $r --datasets synth-test --data-dir $D --batch-size 500 \
    --latent-ablations zeros,shuffle --kv-match > $r/eval.log 2>&1 &
done; wait
for r in $O/kava-a*; do echo "== $(basename $r)"; grep -h '"val/accuracy"' $r/metrics.jsonl | cut -c1-90; grep synth-test $r/eval.log; done
cd $O && tar czf $OUT/alpha.tgz --exclude='*/checkpoints' --exclude='*/best' --exclude='*/final' --exclude='_data' --exclude='backbone' . 
