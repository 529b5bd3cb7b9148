#!/usr/bin/env bash
# Issue 4 acceptance on CPU: each method trains for a few hundred steps on the tiny synthetic config and its
# training loss falls. Usage: bash experiments/cpu_methods/check.sh OUT_DIR
set -euo pipefail
OUT=${1:-runs/cpu_methods}
for m in cot nocot pccot codi kava; do
  kava train --config tiny_synth --no-progress --set method=$m --set optim.max_steps=300 --set optim.lr=2e-3 \
    --set model.from_scratch.hidden_size=64 --set model.from_scratch.intermediate_size=128 \
    --set model.from_scratch.num_hidden_layers=2 --set optim.effective_batch=16 --set optim.micro_batch=16 \
    --set latent.num_latents=6 --set run.eval_every=300 --set data.valid_limit=50 --set run.log=[jsonl] \
    --set run.output_dir=$OUT --set run.name=$m > /dev/null 2>&1
  python - "$OUT/$m" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
tr = [r for r in rows if r.get("split") == "train"]
first, last = statistics.mean(r["loss/total"] for r in tr[:3]), statistics.mean(r["loss/total"] for r in tr[-3:])
val = [r["val/accuracy"] for r in rows if r.get("split") == "val"]
print(f"{sys.argv[1].split('/')[-1]:6s} steps {tr[-1]['step']}: loss/total {first:.3f} (steps 10-30) -> {last:.3f} "
      f"(last 30 steps); falls: {last < first}; val accuracy {val[-1]:.2f}")
PY
done
