#!/usr/bin/env bash
# PonderingPythia-160m: Pythia-160m's shape trained with pondering (k=3 extra passes that feed a
# probability-weighted embedding back into the input; docs/pondering.md), following the
# official pondering scripts for this size: lr 6e-4 -> 6e-05 cosine, 1% warmup, weight decay 0.01,
# AdamW (0.9, 0.95), batch 1024 x 2048 tokens, 143,000 iterations (~300B tokens), bf16,
# full-vocabulary mixing, scaled embeddings (--ponder-scale-embeds: E_0 and the mixing table
# times sqrt(hidden); every official Pythia script passes --scale_embeds true),
# multiply-pondering-steps off. Memory: each step keeps
# activations of k+1 passes, hence a smaller micro-batch than the plain script.
# Flags after the script name override these (e.g. --micro-batch-size, --ponder-steps).
#
#   DATA_PATH=/data/pile_text_document TOKENIZER_MODEL=/data/20B_tokenizer.json \
#   CHECKPOINT_PATH=/ckpt/pondering-160m bash examples/pretrain_pondering_pythia_160m.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env DATA_PATH TOKENIZER_MODEL CHECKPOINT_PATH
require_gpus

launch --model pythia-160m --method pondering --ponder-steps 3 --ponder-top-k 0 --ponder-scale-embeds \
  --micro-batch-size 16 --global-batch-size 1024 --train-iters 143000 \
  --lr 6e-4 --min-lr 6e-05 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
  --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
  --use-distributed-optimizer "$@"
