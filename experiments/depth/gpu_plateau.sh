#!/usr/bin/env bash
# Device call: the latent methods of the depth testbed trained longer, with CUDA graphs (optim.cuda_graphs),
# from the depth backbone carried in .carry/.
#   bash experiments/depth/gpu_plateau.sh    (carry: .carry)
# METHODS x SEEDS for up to STEPS steps (killed at TRAIN_S seconds); each run's validation-selected best/ is
# evaluated on synth-test with its latents zeroed beside it.
set -uo pipefail
O=/tmp/plateau
source experiments/depth/carry.sh
pids=()
for m in ${METHODS:-kava pccot codi}; do for s in ${SEEDS:-42 123}; do
  python -m kava.cli train --config synth_depth_student --no-progress --set model.init_from=$O/backbone \
    --set method=$m --set run.seed=$s --set optim.max_steps=${STEPS:-1500} --set run.output_dir=$O \
    --set run.name=$m-eq-s$s --set optim.cuda_graphs=true --set run.grad_share_every=0 > $O/train-$m-s$s.log 2>&1 &
  pids+=($!)
done; done
sleep ${TRAIN_S:-400}; kill ${pids[@]} 2>/dev/null; wait
for r in $O/*-eq-s*; do
  python -m kava.cli eval --checkpoint $r --datasets synth-test --data-dir $D --batch-size 500 \
    --latent-ablations zeros > $r/eval.log 2>&1 &
done; wait
for r in $O/*-eq-s*; do echo "== $(basename $r)"; grep -h '"val/accuracy"' $r/metrics.jsonl | cut -c1-90
  grep -h '"graphs/' $r/metrics.jsonl | tail -1 | grep -o '"graphs/[a-z]*": [0-9]*' | tr '\n' ' '; echo
  grep synth-test $r/eval.log; tail -2 $O/train-$(basename $r | sed 's/-eq-s/-s/').log; done
cd $O && tar czf $OUT/plateau.tgz --exclude='*/checkpoints' --exclude='*/best' --exclude='*/final' --exclude='_data' \
  --exclude='backbone' --exclude='*/tokenizer_src' .
