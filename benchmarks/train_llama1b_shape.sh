#!/usr/bin/env bash
# `kava train` with a LLaMA-3.2-1B-shaped random-init model and the llama1b_aug preset: 20 optimizer steps at
# the preset's effective batch (128 = 4 x micro-batch 32) on GSM8k-AUG text (the 3,000-record sample of
# ../shared/data/gsm8k-aug copied to DATA for the GPU machine; never committed).
# Usage: bash benchmarks/train_llama1b_shape.sh DATA OUT
set -euo pipefail
DATA=${1:-.data/gsm8k-aug}
OUT=${2:-runs/bench}
python -m kava.cli train --config llama1b_aug --no-progress \
  --set model.name_or_path=null \
  --set 'model.from_scratch={family: llama, hidden_size: 2048, intermediate_size: 8192, num_hidden_layers: 16, num_attention_heads: 32, num_key_value_heads: 8, head_dim: 64, vocab_size: 128256, tie_word_embeddings: true, max_position_embeddings: 2048}' \
  --set data.source=$DATA/middletrain.txt --set data.valid_source=$DATA/valid.txt --set data.valid_limit=64 \
  --set data.tokenizer_vocab_size=8000 --set optim.max_steps=20 --set run.eval_every=20 --set run.log_every=1 \
  --set 'run.log=[jsonl,stdout]' --set run.output_dir=$OUT --set run.name=llama1b_shape_kava
