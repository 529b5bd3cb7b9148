#!/usr/bin/env bash
# Device call: backbone (brought back as bf16 chunks for later calls), the main table, eval, report.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
O=/tmp/synth
R="python experiments/synthetic/driver.py --out $O --results $O/results"
STUD="--student-steps ${STEPS:-250} --student-set optim.effective_batch=${EB:-128} --student-set optim.micro_batch=${MB:-64} --student-set run.eval_every=${STEPS:-250} --student-set optim.lr=5e-4"
if [ -d .data/backbone ]; then   # carried from an earlier call
  mkdir -p $O && cp -r .data/backbone $O/ && cat .data/backbone_parts/part* > $O/backbone/final/model/model.safetensors
  $R --stage backbone --backbone-set optim.max_steps=1000 --backbone-set run.eval_every=1000 | tail -2  # data only
else
  $R --stage backbone --backbone-set optim.max_steps=1000 --backbone-set run.eval_every=1000
  python - <<'PY'
import torch, os
from safetensors.torch import load_file, save_file
p = "/tmp/synth/backbone/final/model/model.safetensors"
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(p).items()}, "/tmp/bb_bf16.safetensors")
PY
  split -b 15M /tmp/bb_bf16.safetensors $OUT/bbpart_
  (cd $O && tar czf $OUT/backbone_rest.tgz --exclude='checkpoints' --exclude='best' --exclude='model.safetensors' --exclude='tb' backbone)
fi
timeout ${MAIN_TIMEOUT:-330} $R --stage ${STAGE:-main} --parallel ${PAR:-30} $STUD ${ONLY:+--only $ONLY}
$R --stage eval --parallel 15 ${ONLY:+--only $ONLY}
$R --stage report > /dev/null 2>&1
cd $O && tar czf $OUT/results.tgz --exclude='*/checkpoints' --exclude='*/best' --exclude='*/final' --exclude='_data' --exclude='*/tb' --exclude='*/tokenizer_src' . 2>/dev/null
ls -la $OUT
