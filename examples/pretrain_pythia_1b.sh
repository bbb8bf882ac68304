#!/usr/bin/env bash
# Pythia-1b, plain next-token training, following the Pythia suite's recipe
# (EleutherAI/pythia models/1b/pythia-1b.yml): lr 2.5e-4 -> 2.5e-05 cosine, 1% warmup,
# batch 1024 x 2048 tokens, 143,000 iterations (300B tokens), Adam (0.9, 0.95, 1e-8),
# weight decay 0.1, clipping 1.0, ZeRO-1 (--use-distributed-optimizer), activation recompute.
# Precision bf16 (Pythia used fp16; PRECISION=--fp16 reproduces that). Flags given after the
# script name override these.
#
#   DATA_PATH=/data/pile_text_document TOKENIZER_MODEL=/data/20B_tokenizer.json \
#   CHECKPOINT_PATH=/ckpt/pythia-1b bash examples/pretrain_pythia_1b.sh [flags...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env DATA_PATH TOKENIZER_MODEL CHECKPOINT_PATH
require_gpus

launch --model pythia-1b --method vanilla \
  --micro-batch-size 16 --global-batch-size 1024 --train-iters 143000 \
  --lr 2.5e-4 --min-lr 2.5e-05 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
  --use-distributed-optimizer --recompute-granularity full "$@"
