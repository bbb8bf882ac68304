"""A checkpoint grown with the four latent-thought tokens loads at TP=2 on two gloo processes
and gives TP=1's logits (old and new token ids)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core import parallel_state  # noqa: E402
from test_latent_tokens import WORD_VOCAB, write_checkpoint  # noqa: E402

from megatron_latent.latent import LatentTokenIds  # noqa: E402
from megatron_latent.latent.tokens import (  # noqa: E402
    add_latent_tokens_to_tokenizer,
    grow_checkpoint,
    latent_token_ids,
)

from training_fixtures import write_wordlevel_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def grown(world):
    """A grown checkpoint (source at TP=1, written for TP=1) in a directory both ranks see."""
    box = [tempfile.mkdtemp(prefix="ml-latent-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    root = Path(box[0])
    if dist.get_rank() == 0:
        tok = write_wordlevel_tokenizer(str(root / "tok"), WORD_VOCAB)
        write_checkpoint(root / "ckpt", tok)
        new_tok = add_latent_tokens_to_tokenizer(tok, "HuggingFaceTokenizer",
                                                 str(root / "tok_latent")).output_path
        grow_checkpoint(str(root / "ckpt"), str(root / "grown"), WORD_VOCAB + 4,
                        "HuggingFaceTokenizer", new_tok)
    dist.barrier()
    yield root / "grown"
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)


def _logits(checkpoint: Path, tp: int, ids: torch.Tensor) -> torch.Tensor:
    from megatron_latent.inference.loading import load_model_for_inference

    loaded = load_model_for_inference(str(checkpoint), tensor_parallel_size=tp,
                                      device=torch.device("cpu"))
    assert latent_token_ids(loaded.tokenizer) == LatentTokenIds.after(WORD_VOCAB)
    with torch.no_grad():
        local = loaded.model(ids)  # [b, s, padded vocab / tp]
    shards = [None] * tp
    dist.all_gather_object(shards, local, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def test_grown_checkpoint_tp2_logits_equal_tp1(use_parallel, grown):
    # the old ids and the four new ones, on both vocabulary shards at TP=2
    ids = torch.randint(0, WORD_VOCAB + 4, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = torch.arange(WORD_VOCAB, WORD_VOCAB + 4)
    single = _logits(grown, 1, ids)
    split = _logits(grown, 2, ids)
    assert single.shape[-1] == 192 and split.shape[-1] == 256
    problems = []
    difference = (split[..., :WORD_VOCAB + 4] - single[..., :WORD_VOCAB + 4]).abs().max().item()
    if difference > 1e-5:
        problems.append(f"TP=2 logits differ from TP=1 by {difference}")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    assert gathered == [[]] * dist.get_world_size(), gathered
