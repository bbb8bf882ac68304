"""Checkpoints in Megatron-LM's layout, written atomically and read without pickle.

    <dir>/latest_checkpointed_iteration.txt        the newest complete iteration
    <dir>/iter_0000100/config.json                 the run's resolved configuration
    <dir>/iter_0000100/mp_rank_00[_000]/model_optim_rng.pt
                                                   model shard (canonical names), optimizer,
                                                   LR scheduler, RNG states, progress counters
    <dir>/iter_0000100/mp_rank_00/distrib_optim.pt  distributed-optimizer state (CUDA engine)

A save is written under a temporary directory, renamed into place, and only then is the
tracker file replaced: a job killed mid-save leaves the previous checkpoint as the latest.
Files are read with `torch.load(weights_only=True)`, so loading executes no pickled code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from ..config import ConfigError
from ..fileio import atomic_write_text, fsync_directory
from ..models.hf_gpt_neox import merge_shards, shard_for_rank

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
_ITERATION_DIR = re.compile(r"iter_(\d{7,})")
CHECKPOINT_FILE = "model_optim_rng.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """Progress counters that a resumed run continues from."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    consumed_tokens: int = 0
    #: token positions the model executed (what FLOPs per token count; padding included):
    #: consumed_tokens for GPT data, more for a method that pads (thought memory's rows)
    executed_tokens: int = 0
    skipped_iterations: int = 0
    nan_iterations: int = 0


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_dirname(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron-LM's per-model-parallel-rank directory name."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def read_tracker(root: str) -> int | None:
    """The newest complete iteration recorded under `root`, or None when there is none."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as error:
        raise ConfigError(f"{path}: expected an iteration number, found {text!r}") from error


def read_checkpoint_config(root: str, iteration: int | None = None) -> dict[str, Any] | None:
    """The stored run configuration of the latest (or given) checkpoint, or None."""
    iteration = read_tracker(root) if iteration is None else iteration
    if iteration is None:
        return None
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise ConfigError(
            f"{os.path.join(root, TRACKER_FILE)} names iteration {iteration}, but {directory} "
            "does not exist (deleted or not copied?); point the tracker at an existing "
            "iter_* directory")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {directory} has no {CONFIG_FILE} (not written by this "
                          "project, or an incomplete copy)")
    with open(path) as handle:
        return json.load(handle)


# -- RNG -----------------------------------------------------------------------------------
def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator the run draws from, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# -- helpers ---------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_object(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _this_rank_dirname() -> str:
    return rank_dirname(parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_pipeline_model_parallel_rank(),
                        parallel_state.get_pipeline_model_parallel_world_size())


# -- save --------------------------------------------------------------------------------------
def save_checkpoint(root: str, state: TrainState, engine, scheduler, run_config: dict[str, Any],
                    save_optimizer: bool = True) -> str:
    """Write iteration `state.iteration` under `root` atomically; every rank must call this."""
    rank, _ = _world()
    tmp_root = None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        tmp_root = os.path.join(root, f".tmp_iter_{state.iteration:07d}_{uuid.uuid4().hex[:8]}")
    tmp_root = _broadcast_object(tmp_root)
    dp_rank = parallel_state.get_data_parallel_rank()
    rank_dir = os.path.join(tmp_root, _this_rank_dirname())
    if dp_rank == 0:
        os.makedirs(rank_dir, exist_ok=True)
    _barrier()

    # Only data-parallel rank 0 writes, so only it gathers its shard into host memory; the
    # optimizer state is still asked of every rank (the distributed optimizer gathers it).
    model_state = engine.model_state() if dp_rank == 0 else None
    optimizer_state = engine.optimizer_state(rank_dir) if save_optimizer else None
    rng = capture_rng_state(engine.device)
    rng_states = [rng]
    if parallel_state.get_data_parallel_world_size() > 1:
        rng_states = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(rng_states, rng, group=parallel_state.get_data_parallel_group())
    if dp_rank == 0:
        payload = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": state.iteration,
            "train_state": asdict(state),
            "model": model_state,
            "optimizer": optimizer_state,
            "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng_state": rng_states,
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size":
                parallel_state.get_pipeline_model_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        }
        path = os.path.join(rank_dir, CHECKPOINT_FILE)
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)
    _barrier()

    final = iteration_dir(root, state.iteration)
    if rank == 0:
        with open(os.path.join(tmp_root, CONFIG_FILE), "w") as handle:
            json.dump(run_config, handle, indent=2, sort_keys=True, default=str)
        fsync_directory(tmp_root)
        trash = None
        if os.path.exists(final):
            trash = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
        os.replace(tmp_root, final)
        fsync_directory(root)
        atomic_write_text(os.path.join(root, TRACKER_FILE), str(state.iteration))
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
        for name in os.listdir(root):  # leftovers of saves and deletions that were killed
            if name.startswith((".tmp_iter_", ".deleting_iter_")) and \
                    os.path.join(root, name) != tmp_root:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _barrier()
    return final


def prune_checkpoints(root: str, keep: int, newest: int) -> list[str]:
    """Delete all but the `keep` newest checkpoints up to iteration `newest` (the one just
    saved, which is always kept); checkpoints after it (left by a run that was resumed from an
    earlier one) are not touched. Global rank 0 deletes; returns the deleted directories."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank, _ = _world()
    if rank != 0:
        return []
    saved = []
    for name in os.listdir(root):
        match = _ITERATION_DIR.fullmatch(name)
        if match and int(match.group(1)) <= newest and os.path.isdir(os.path.join(root, name)):
            saved.append(int(match.group(1)))
    deleted = []
    for iteration in sorted(saved, reverse=True)[keep:]:  # `newest` is first: always kept
        path = iteration_dir(root, iteration)
        # Renamed first, so a deletion cut short never leaves a partial iter_* directory.
        trash = os.path.join(root, f".deleting_iter_{iteration:07d}_{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
    return deleted


# -- load --------------------------------------------------------------------------------------
def _load_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unreadable or contains non-tensor objects
        raise ConfigError(f"cannot read checkpoint file {path}: {error}") from error


def _load_recut_model_shard(directory: str, saved_tp: int, saved_pp: int,
                            vocab_rows: int | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's canonical model shard cut from a checkpoint written with another TP/PP
    layout, and the first shard file's payload (for the progress counters)."""
    by_tp, first = [], None
    for tp_rank in range(saved_tp):
        merged: dict[str, torch.Tensor] = {}
        for pp_rank in range(saved_pp):
            name = rank_dirname(tp_rank, pp_rank, saved_pp)
            payload = _load_file(os.path.join(directory, name, CHECKPOINT_FILE))
            first = first or payload
            merged.update(payload["model"])
        by_tp.append(merged)
    full = merge_shards(by_tp)
    shard = shard_for_rank(full, parallel_state.get_tensor_model_parallel_world_size(),
                           parallel_state.get_tensor_model_parallel_rank(), vocab_rows)
    return shard, first


def load_checkpoint(root: str, engine, scheduler, finetune: bool = False,
                    load_optimizer: bool = True, load_rng: bool = True) -> TrainState:
    """Restore the latest checkpoint under `root` into the engine; returns the progress to
    continue from (fresh counters under `finetune`)."""
    iteration = read_tracker(root)
    if iteration is None:
        raise ConfigError(f"--load {root}: no {TRACKER_FILE} (no complete checkpoint there)")
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise ConfigError(f"{TRACKER_FILE} names iteration {iteration} but {directory} is missing")
    saved_parallel = read_checkpoint_config(root, iteration).get("parallel", {})
    saved_tp = saved_parallel.get("tensor_model_parallel_size", 1)
    saved_pp = saved_parallel.get("pipeline_model_parallel_size", 1)
    own_path = os.path.join(directory, _this_rank_dirname(), CHECKPOINT_FILE)
    same_layout = (saved_tp == parallel_state.get_tensor_model_parallel_world_size()
                   and saved_pp == parallel_state.get_pipeline_model_parallel_world_size())
    if load_optimizer and not finetune and not same_layout:
        raise ConfigError(
            f"checkpoint {directory} was written with TP={saved_tp}, PP={saved_pp}; this "
            "run's layout differs, so its optimizer state cannot be restored. Resume with "
            "--no-load-optim (weights are re-cut automatically) or the saved layout."
        )
    if same_layout:
        own = _load_file(own_path)
        engine.load_model_state(own["model"])
    else:
        shard, own = _load_recut_model_shard(
            directory, saved_tp, saved_pp,
            getattr(engine.unwrapped_model(), "vocab_size", None))
        engine.load_model_state(shard)
    if finetune:
        engine.after_weights_loaded_without_optimizer()
        logger.info("loaded weights of iteration %d from %s (--finetune)", iteration, root)
        return TrainState()

    if load_optimizer:
        if own.get("optimizer") is None:
            raise ConfigError(f"{own_path} holds no optimizer state (saved with "
                              "--no-save-optim); resume with --no-load-optim")
        engine.load_optimizer_state(own["optimizer"], os.path.dirname(own_path))
    else:
        engine.after_weights_loaded_without_optimizer()
    if scheduler is not None and own.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(own["opt_param_scheduler"])
    if load_rng and own.get("rng_state"):
        states = own["rng_state"]
        dp_rank = parallel_state.get_data_parallel_rank()
        if len(states) == parallel_state.get_data_parallel_world_size():
            restore_rng_state(states[dp_rank], engine.device)
        else:
            restore_rng_state(states[0], engine.device)
    state = TrainState(**own["train_state"])
    logger.info("resumed from %s at iteration %d", directory, state.iteration)
    return state


# -- offline access (conversion, generation, evaluation) -----------------------------------
def load_full_model_state(root: str, iteration: int | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """(unsharded canonical weights, stored run config, iteration) of a checkpoint, merged
    over every TP/PP shard; needs no process group."""
    iteration = read_tracker(root) if iteration is None else iteration
    if iteration is None:
        raise ConfigError(f"{root}: no {TRACKER_FILE}; is this a checkpoint directory?")
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory} does not exist")
    config = read_checkpoint_config(root, iteration)
    shards = sorted(name for name in os.listdir(directory) if name.startswith("mp_rank_"))
    if not shards:
        raise ConfigError(f"{directory} holds no mp_rank_* shard directories")
    first = _load_file(os.path.join(directory, shards[0], CHECKPOINT_FILE))
    tp, pp = first["tensor_model_parallel_size"], first["pipeline_model_parallel_size"]
    by_tp = []
    for tp_rank in range(tp):
        merged: dict[str, torch.Tensor] = {}
        for pp_rank in range(pp):
            path = os.path.join(directory, rank_dirname(tp_rank, pp_rank, pp), CHECKPOINT_FILE)
            merged.update(_load_file(path)["model"])
        by_tp.append(merged)
    return merge_shards(by_tp), config, iteration


def write_weights_checkpoint(root: str, full: dict[str, torch.Tensor], run_config: dict[str, Any],
                             tensor_parallel_size: int = 1, iteration: int = 0) -> str:
    """Write weights only (no optimizer) in this project's layout, split for a TP size, for
    `--load ... --finetune`; written atomically like a training save."""
    os.makedirs(root, exist_ok=True)
    tmp_root = os.path.join(root, f".tmp_iter_{iteration:07d}_{uuid.uuid4().hex[:8]}")
    for tp_rank in range(tensor_parallel_size):
        rank_dir = os.path.join(tmp_root, rank_dirname(tp_rank, 0, 1))
        os.makedirs(rank_dir)
        payload = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "train_state": asdict(TrainState(iteration=iteration)),
            "model": shard_for_rank(full, tensor_parallel_size, tp_rank),
            "optimizer": None,
            "opt_param_scheduler": None,
            "rng_state": [],
            "tensor_model_parallel_size": tensor_parallel_size,
            "pipeline_model_parallel_size": 1,
            "data_parallel_size": 1,
        }
        torch.save(payload, os.path.join(rank_dir, CHECKPOINT_FILE))
    with open(os.path.join(tmp_root, CONFIG_FILE), "w") as handle:
        json.dump(run_config, handle, indent=2, sort_keys=True, default=str)
    final = iteration_dir(root, iteration)
    if os.path.exists(final):
        raise ConfigError(f"{final} already exists; choose another output directory")
    os.replace(tmp_root, final)
    atomic_write_text(os.path.join(root, TRACKER_FILE), str(iteration))
    return final
