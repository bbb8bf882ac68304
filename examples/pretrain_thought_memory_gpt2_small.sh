#!/usr/bin/env bash
# Thought memory at the GPT-2-small-like setting of the Thought Gestalt paper: 12 layers,
# hidden 768, 12 heads, layers alternating S (self-attention) and C (cross-attention to the
# memory), FIFO memory of 40 sentence vectors, rows of BOS + <=64 content tokens + EOS
# (L = 67), <=20,000 non-pad tokens per batch, streams of S = 30 sentences growing by 12
# every 5 epochs, EOS targets weighted 1.0 in the first epoch and 0.05 after, loss as the
# paper's per-sentence-index mean. AdamW (0.9, 0.999, 1e-8), weight decay 0.01 (none on
# biases, norms and gates), clipping 1.0, lr 2.5e-4 with 0.4% linear warmup and cosine to
# 10%. Dropout 0 (the block is this project's Pythia layer; docs/thought_memory.md).
# --train-iters 135000 is 50 epochs of a ~50M-token corpus (~54M tokens per epoch with the
# row markers, ~2,700 batches); set it for your data. --global-batch-size only sets the LR
# schedule's unit here (the token budget makes the batches); --micro-batch-size counts
# streams. Flags given after the script name override these.
#
#   DATA_PATH=/data/wikitext103_text_sentence TOKENIZER_MODEL=/data/gpt2/tokenizer.json \
#   CHECKPOINT_PATH=/ckpt/tm-gpt2-small bash examples/pretrain_thought_memory_gpt2_small.sh
# DATA_PATH is a _sentence prefix: tools/preprocess_data.py --split-sentences --append-eod.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_env DATA_PATH TOKENIZER_MODEL CHECKPOINT_PATH
require_gpus

launch --num-layers 12 --hidden-size 768 --num-attention-heads 12 --method thought-memory \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --tm-memory-size 40 --tm-max-content 64 --tm-token-budget 20000 --tm-loss-mode paper \
  --tm-stream-length 30 --tm-stream-length-step 12 --tm-stream-length-every 5 \
  --tm-eos-weight 1.0 --tm-eos-weight-after 0.05 --tm-eos-weight-epochs 1 \
  --micro-batch-size 8 --global-batch-size 256 --train-iters 135000 \
  --lr 2.5e-4 --min-lr 2.5e-05 --lr-decay-style cosine --lr-warmup-fraction 0.004 \
  --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8 --clip-grad 1.0 \
  "$@"
