# Shared by examples/pretrain_*.sh: environment checks and the torchrun launch.
# Source it; then call `require_env NAME...` and `launch <pretrain.py flags>`.
#
# Flags: launch() puts its own (data, tokenizer, checkpoints, logging, eval, $PRECISION,
# $EXTRA_ARGS) first and the caller's flags last. pretrain.py keeps the last occurrence of a
# flag, so a script's recipe overrides launch()'s defaults and the flags given after the
# script's name override both.
#
# Signals: SIGTERM (kill, scancel --signal=TERM, preemption) and SIGUSR1 (Slurm's warning
# before the time limit) mean "save a checkpoint and exit 0". pretrain.py does that on either
# signal. torchrun's agent would do otherwise (on SIGTERM it raises, forwards the signal,
# SIGKILLs workers still saving after its shutdown timeout and exits 1), so launch() keeps
# these signals away from torchrun and hands them to the trainers itself:
#   - torchrun starts in the background from a subshell that ignores TERM and USR1; an
#     ignored signal stays ignored across exec, and its workers inherit that too;
#   - PET_SIGNALS_TO_HANDLE (torchrun's --signals-to-handle, read from the environment, so an
#     older torchrun without the flag is not bothered) leaves SIGTERM out, so torchrun does
#     not install a TERM handler of its own. An older torchrun does: a TERM that reaches it
#     (Slurm signals every process of a step) then goes torchrun's way, 30 s limit included;
#     a TERM to this shell alone, and USR1 however sent, still end in a clean save;
#     TORCH_ELASTIC_SHUTDOWN_TIMEOUT is left alone: every torchrun that reads it also knows
#     --signals-to-handle, and a longer value would only delay the SIGKILL of ranks left
#     hanging in a collective after another rank crashed;
#   - pretrain.py installs its save-and-exit handler first thing, so a trainer that is still
#     importing or setting up keeps the signal and stops at the first iteration;
#   - this shell traps TERM and USR1 (from the moment it sources this file) and sends the
#     signal once to every trainer (torchrun's children) as soon as the trainer has its
#     handler in place (SigCgt in /proc), also to trainers started after the signal; then it
#     waits for torchrun and exits with its status. A signal before torchrun starts means
#     there is nothing to save: launch() then exits 0 without starting it.
# Under Slurm every process of the step gets the signal at once (this shell, torchrun and the
# trainers): the outcome is the same, a trainer saves once however many copies it receives.

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${EXAMPLES_DIR}/.." && pwd)"

# From here on a TERM or USR1 is remembered (and, once torchrun runs, forwarded).
_stop_signal=""
_signalled=" "
_torchrun_pid=""
trap '_stop_signal=TERM; _forward_stop' TERM
trap '_stop_signal=USR1; _forward_stop' USR1

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
      echo "  TENSORBOARD_DIR (\$CHECKPOINT_PATH/tensorboard), PRECISION (--bf16; empty: fp32),"
      echo "  EXTRA_ARGS (flags added to launch()'s defaults; the script's and yours win)"
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
  : "${TOKENIZER_TYPE:=HuggingFaceTokenizer}" "${PRECISION=--bf16}"
  : "${TENSORBOARD_DIR:=${CHECKPOINT_PATH}/tensorboard}"
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  # shellcheck disable=SC2206
  local data=(${DATA_PATH})
  # shellcheck disable=SC2206
  local cmd=(torchrun --nproc_per_node "${GPUS_PER_NODE}" --nnodes "${NNODES}"
    --node_rank "${NODE_RANK}" --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}"
    "${REPO_DIR}/pretrain.py"
    --data-path "${data[@]}" --split 969,30,1
    --tokenizer-type "${TOKENIZER_TYPE}" --tokenizer-model "${TOKENIZER_MODEL}"
    --save "${CHECKPOINT_PATH}" --load "${CHECKPOINT_PATH}" --save-interval 1000
    --eval-interval 1000 --eval-iters 10 --log-interval 10
    --tensorboard-dir "${TENSORBOARD_DIR}" ${PRECISION} ${EXTRA_ARGS:-}
    "$@")
  echo "${cmd[*]}"
  run_torchrun "${cmd[@]}"
}

# run_torchrun <torchrun command...>: runs it with the signal handling described at the top;
# returns torchrun's exit status (0 without starting it when a stop came before).
run_torchrun() {
  if [[ -n "${_stop_signal}" ]]; then
    echo "received SIG${_stop_signal} before the start: nothing to save, not starting" >&2
    return 0
  fi
  export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}"
  ( trap '' TERM USR1; exec "$@" ) &
  _torchrun_pid=$!
  while kill -0 "${_torchrun_pid}" 2>/dev/null; do
    if [[ -n "${_stop_signal}" ]]; then
      _forward_stop   # trainers that were not ready (or not started) when the signal came
      sleep 1
    else
      wait "${_torchrun_pid}" || true   # returns early when a trapped signal arrives
    fi
  done
  local status=0
  wait "${_torchrun_pid}" || status=$?
  return "${status}"
}

# Sends $_stop_signal once to each child of torchrun that has a handler for it.
_forward_stop() {
  local child
  [[ -n "${_torchrun_pid}" ]] || return 0
  for child in $(pgrep -P "${_torchrun_pid}" 2>/dev/null); do
    if [[ "${_signalled}" == *" ${child} "* ]] || ! _catches "${child}" "${_stop_signal}"; then
      continue
    fi
    kill -s "${_stop_signal}" "${child}" 2>/dev/null || true
    _signalled+="${child} "
  done
}

# _catches PID SIGNAL: whether PID has installed a handler for SIGNAL. A trainer inherits
# TERM and USR1 ignored and installs its handler when its Python starts; a signal sent before
# that would be lost. Without /proc (not Linux) every process counts as ready.
_catches() {
  local mask
  [[ -r "/proc/$1/status" ]] || return 0
  mask="$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null)"
  [[ -n "${mask}" ]] || return 1
  (( (16#${mask} >> ($(kill -l "$2") - 1)) & 1 ))
}
