#!/usr/bin/env bash
# Pilot of the synthetic replication on one GPU: backbone + one seed of every method on both CoT styles.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUTDIR=/tmp/synth
timeout ${BUDGET:-530} python experiments/synthetic_replication.py --out $OUTDIR --parallel 10 \
  --only nocot-eq-s42,cot-eq-s42,pccot-eq-s42,codi-eq-s42,kava-eq-s42,nocot-nl-s42,cot-nl-s42,pccot-nl-s42,codi-nl-s42,kava-nl-s42 \
  --stage all --results $OUTDIR/results "$@"
cd $OUTDIR && tar czf $OUT/pilot.tgz --exclude='*/checkpoints' --exclude='*/best' --exclude='*/final' --exclude='_data' --exclude='*/tb' . 2>/dev/null
ls -la $OUT
