"""What each rank does in the engines' shared machinery, on two gloo processes: pipeline
stages draw different seeds, a NaN on one rank skips the step on every rank, and a checkpoint
save gathers the model shard only on the data-parallel rank that writes it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training_fixtures import (  # noqa: E402
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)


def test_pipeline_stages_draw_different_seeds(world):
    from megatron_latent.distributed import destroy_model_parallel_groups, set_seed

    destroy_model_parallel_groups()
    try:
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
        set_seed(1234, torch.device("cpu"))
        seen = [None, None]  # gathered before asserting, so a failure cannot hang a rank
        dist.all_gather_object(seen, (parallel_state.get_pipeline_model_parallel_rank(),
                                      torch.initial_seed(), torch.randn(8)))
        for stage, seed, _ in seen:
            assert seed == 1234 + 100 * stage  # Megatron-LM's offset per pipeline stage
        assert not torch.equal(seen[0][2], seen[1][2])
    finally:
        destroy_model_parallel_groups()
        parallel_state.initialize_model_parallel()
        set_seed(1234, torch.device("cpu"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_gradient_on_one_rank_is_seen_by_every_rank(world, bad):
    from megatron_latent.training.engines.base import any_rank_has_nonfinite

    rank = dist.get_rank()
    clean = [torch.ones(5), torch.arange(4.0)]
    assert not any_rank_has_nonfinite(clean, torch.device("cpu"))
    dirty = [torch.ones(5), torch.arange(4.0)]
    if rank == 1:
        dirty[1][2] = bad
    assert any_rank_has_nonfinite(dirty, torch.device("cpu"))


def test_only_the_writing_rank_gathers_the_model_state_at_save(use_parallel):
    from megatron_latent.training.checkpointing import save_checkpoint

    box = [tempfile.mkdtemp(prefix="ml-save-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    base = Path(box[0])
    if dist.get_rank() == 0:
        write_token_dataset(str(base / "data" / "tokens"))
        write_wordlevel_tokenizer(str(base / "tokenizer"))
    dist.barrier()
    _, trainer = run_training(TINY_FLAGS + [
        "--data-path", str(base / "data" / "tokens"), "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(base / "tokenizer" / "tokenizer.json"),
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1",
        "--eval-iters", "0"])
    assert parallel_state.get_data_parallel_world_size() == 2
    engine = trainer.engine
    calls = []
    original = engine.model_state

    def counting_model_state():
        calls.append(1)
        return original()

    engine.model_state = counting_model_state
    final = save_checkpoint(str(base / "ckpt"), trainer.state, engine, trainer.scheduler,
                            {"note": "test"})
    counts = [None, None]
    dist.all_gather_object(counts, (parallel_state.get_data_parallel_rank(), len(calls)))
    assert sorted(counts) == [(0, 1), (1, 0)]
    saved = torch.load(Path(final) / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert set(saved["model"]) == set(original())
