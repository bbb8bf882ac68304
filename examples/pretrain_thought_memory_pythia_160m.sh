#!/usr/bin/env bash
# Thought memory at Pythia-160m's shape (12 layers, hidden 768, 12 heads; layers alternating
# S and C, FIFO memory of 40 sentence vectors, rows of BOS + <=64 content tokens + EOS) with
# the Pythia suite's optimiser (EleutherAI/pythia models/160m/pythia-160m.yml): lr 6e-4 ->
# 6e-05 cosine, 1% warmup, Adam (0.9, 0.95, 1e-8), weight decay 0.1, clipping 1.0, ZeRO-1,
# bf16, 143,000 iterations. Pythia's batch of 1024 x 2048 tokens becomes a budget of
# 2,097,152 non-pad tokens per batch (~300B tokens in all, row markers included).
# One pass over the data: the EOS weight (1.0, then 0.05) is keyed to tokens, its first
# "epoch" being 1/50 of the run (6e9 tokens); the streams stay at S = 30 sentences (the
# curriculum grows S per pass over the data). --global-batch-size only sets the LR
# schedule's unit (the token budget makes the batches); --micro-batch-size counts streams.
# Flags given after the script name override these.
#
#   DATA_PATH=/data/pile_text_sentence TOKENIZER_MODEL=/data/20B_tokenizer.json \
#   CHECKPOINT_PATH=/ckpt/tm-160m bash examples/pretrain_thought_memory_pythia_160m.sh
# DATA_PATH is a _sentence prefix: tools/preprocess_data.py --split-sentences --append-eod.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env DATA_PATH TOKENIZER_MODEL CHECKPOINT_PATH
require_gpus

launch --model pythia-160m --method thought-memory \
  --tm-memory-size 40 --tm-max-content 64 --tm-token-budget 2097152 \
  --tm-stream-length 30 --tm-eos-weight 1.0 --tm-eos-weight-after 0.05 \
  --tm-schedule-epoch-tokens 6000000000 \
  --micro-batch-size 8 --global-batch-size 1024 --train-iters 143000 \
  --lr 6e-4 --min-lr 6e-05 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
  --use-distributed-optimizer "$@"
