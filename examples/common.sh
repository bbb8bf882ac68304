# Shared by examples/pretrain_*.sh: environment checks and the torchrun launch.
# Source it; then call `require_env NAME...` and `launch <pretrain.py flags>`.

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${EXAMPLES_DIR}/.." && pwd)"

require_env() {
  local missing=()
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then missing+=("${name}"); fi
  done
  if (( ${#missing[@]} )); then
    {
      echo "error: missing environment variable(s): ${missing[*]}"
      echo "  DATA_PATH        prefix of a Megatron .bin/.idx dataset (or a blend: \"0.7 a 0.3 b\")"
      echo "  TOKENIZER_MODEL  tokenizer file: GPT-NeoX 20B_tokenizer.json (HuggingFaceTokenizer)"
      echo "                   or a SentencePiece .model (set TOKENIZER_TYPE=SentencePieceTokenizer)"
      echo "  CHECKPOINT_PATH  directory for checkpoints; a requeued job resumes from it"
      echo "optional: GPUS_PER_NODE (default: GPUs visible), NNODES (1), NODE_RANK (0),"
      echo "  MASTER_ADDR (localhost), MASTER_PORT (6000), TOKENIZER_TYPE (HuggingFaceTokenizer),"
      echo "  TENSORBOARD_DIR (\$CHECKPOINT_PATH/tensorboard), PRECISION (--bf16)"
      echo "example: DATA_PATH=/data/pile_text_document TOKENIZER_MODEL=/data/20B_tokenizer.json \\"
      echo "         CHECKPOINT_PATH=/ckpt/run1 bash $0"
    } >&2
    exit 2
  fi
}

require_gpus() {
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then return; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPUS_PER_NODE="$(nvidia-smi -L | grep -c '^GPU')"
  else
    GPUS_PER_NODE=0
  fi
  if (( GPUS_PER_NODE == 0 )); then
    {
      echo "error: no NVIDIA GPU is visible on $(hostname)."
      echo "  $(basename "$0") trains a Pythia-scale model (bf16, distributed optimizer,"
      echo "  activation recompute) on megatron-core's CUDA engine; it would not finish on CPUs."
      echo "  Run it on a GPU node (torchrun, examples/slurm/pretrain.sbatch, or the Dockerfile)."
      echo "  To try the pipeline on this machine: make demo (a tiny model on the CPU engine)."
      echo "  To force a launch anyway, set GPUS_PER_NODE to the number of processes."
    } >&2
    exit 3
  fi
}

launch() {
  : "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}"
  : "${TOKENIZER_TYPE:=HuggingFaceTokenizer}" "${PRECISION:=--bf16}"
  : "${TENSORBOARD_DIR:=${CHECKPOINT_PATH}/tensorboard}"
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  # shellcheck disable=SC2206
  local data=(${DATA_PATH})
  local cmd=(torchrun --nproc_per_node "${GPUS_PER_NODE}" --nnodes "${NNODES}"
    --node_rank "${NODE_RANK}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}"
    "${REPO_DIR}/pretrain.py" "$@"
    --data-path "${data[@]}" --split 969,30,1
    --tokenizer-type "${TOKENIZER_TYPE}" --tokenizer-model "${TOKENIZER_MODEL}"
    --save "${CHECKPOINT_PATH}" --load "${CHECKPOINT_PATH}" --save-interval 1000
    --eval-interval 1000 --eval-iters 10 --log-interval 10
    --tensorboard-dir "${TENSORBOARD_DIR}" ${PRECISION}
    ${EXTRA_ARGS:-})
  echo "${cmd[*]}"
  # exec: Slurm's and torchrun's signals reach the trainer, which saves and exits 0.
  exec "${cmd[@]}"
}
