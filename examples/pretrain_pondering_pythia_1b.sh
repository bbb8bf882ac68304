#!/usr/bin/env bash
# PonderingPythia-1b: Pythia-1b's shape trained with pondering (k=3 extra passes that feed a
# probability-weighted embedding back into the input; docs/pondering.md), following the
# official pondering scripts for this size: lr 2.5e-4 -> 2.5e-05 cosine, 1% warmup, weight decay 0.01,
# AdamW (0.9, 0.95), batch 1024 x 2048 tokens, 143,000 iterations (~300B tokens), bf16,
# full-vocabulary mixing, scaled embeddings (--ponder-scale-embeds: E_0 and the mixing table
# times sqrt(hidden); every official Pythia script passes --scale_embeds true),
# multiply-pondering-steps on (E_0 scaled by k). Memory: each step keeps
# activations of k+1 passes, hence a smaller micro-batch than the plain script and full activation recompute.
# Flags after the script name override these (e.g. --micro-batch-size, --ponder-steps).
#
#   DATA_PATH=/data/pile_text_document TOKENIZER_MODEL=/data/20B_tokenizer.json \
#   CHECKPOINT_PATH=/ckpt/pondering-1b bash examples/pretrain_pondering_pythia_1b.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env DATA_PATH TOKENIZER_MODEL CHECKPOINT_PATH
require_gpus

launch --model pythia-1b --method pondering --ponder-steps 3 --ponder-top-k 0 \
  --ponder-scale-embeds --ponder-multiply-steps \
  --micro-batch-size 4 --global-batch-size 1024 --train-iters 143000 \
  --lr 2.5e-4 --min-lr 2.5e-05 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
  --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
  --use-distributed-optimizer --recompute-granularity full "$@"
