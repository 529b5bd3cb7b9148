#!/usr/bin/env bash
# Reasoning-depth testbed on one GPU, inside one device lease (issue 11 §3).
#   bash experiments/depth/gpu.sh start   # starts the driver under setsid, waits WAIT s, reports progress
#   bash experiments/depth/gpu.sh wait    # waits WAIT s (keeps the lease), reports progress
#   bash experiments/depth/gpu.sh collect # waits for the driver to finish, packs results (+ seed-42 checkpoints)
# The driver: backbone (configs/synth_depth_backbone.yaml) -> METHODS x SEEDS students on STYLES CoT
# (configs/synth_depth_student.yaml) until TRAIN_BUDGET s -> eval of every run's validation-selected best/ on
# synth-test -> kava report + accuracy by depth (experiments/per_depth.py).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
O=${O:-/tmp/depth}
phase=${1:-start}
progress() {
  echo "== $(date +%T) driver log"; tail -n 25 $O/driver.log 2>/dev/null
  for m in $O/*/metrics.jsonl; do
    [ -f "$m" ] || continue
    echo "$(basename $(dirname $m)): $(grep -c . $m) lines; last val: $(grep '"val/accuracy"' $m | tail -1 | cut -c1-160)"
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}
if [ "$phase" = driver ]; then
  R="python experiments/synthetic/driver.py --out $O --results $O/results --backbone-config synth_depth_backbone
     --student-config synth_depth_student --methods ${METHODS:-nocot,cot,pccot,codi,kava} --styles ${STYLES:-eq}
     --seeds ${SEEDS:-42,123,456} --eval-sets synth-test --parallel ${PAR:-15}"
  t0=$(date +%s)
  $R --stage backbone ${BB_SETS:-}
  python -m kava.cli eval --checkpoint $O/backbone --datasets synth-test --data-dir $(ls -d $O/_data/synth_*) --batch-size 500
  left=$(( ${TRAIN_BUDGET:-1200} - ($(date +%s) - t0) ))
  echo "[driver] students get ${left}s"
  timeout $left $R --stage main ${ST_SETS:-}
  echo "[driver] training stopped at $(date +%T)"
  $R --stage eval --eval-unfinished
  $R --stage report
  python experiments/per_depth.py $O/backbone --data-dir $(ls -d $O/_data/synth_*) --output $O/results/backbone
  touch $O/ALL_DONE
  exit 0
fi
if [ "$phase" = start ]; then
  mkdir -p $O
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt
  python -c "import torch, transformers, peft, accelerate, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" >> $OUT/gpu.txt
  setsid nohup bash experiments/depth/gpu.sh driver > $O/driver.log 2>&1 < /dev/null &
fi
if [ "$phase" = collect ]; then
  end=$(( $(date +%s) + ${WAIT:-540} ))
  while [ ! -f $O/ALL_DONE ] && [ $(date +%s) -lt $end ]; do sleep 5; done
  cd $O && tar czf $OUT/results.tgz --exclude='*/checkpoints' --exclude='*/best' --exclude='*/final' \
    --exclude='_data' --exclude='*/tb' --exclude='*/tokenizer_src' . 2>/dev/null
  for r in ${PACK:-backbone kava-eq-s42 pccot-eq-s42 codi-eq-s42 nocot-eq-s42}; do
    [ -d $O/$r/best ] && tar czf $OUT/ck_$r.tgz -C $O $r/best $r/config.yaml
  done
  cp $O/driver.log $OUT/ 2>/dev/null
  ls -la $OUT
  progress
  exit 0
fi
sleep ${WAIT:-540}
progress | tee $OUT/progress.txt
