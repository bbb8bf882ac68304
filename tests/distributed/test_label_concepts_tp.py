"""tools/label_concepts.py with a tensor-parallel teacher (torchrun, TP=2: the vocabulary-
sharded next-token loss, whole h and g on every rank, rank 0 writing) gives the labels of
plain autograd on the unsharded Hugging Face model with the same weights. Results are
gathered before anything is asserted."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_concept_labels import K, random_sae, reference_labels, tool  # noqa: E402

from megatron_latent.models import hf_gpt_neox as mapping  # noqa: E402
from megatron_latent.sae.files import write_sae  # noqa: E402
from megatron_latent.training.checkpointing import write_weights_checkpoint  # noqa: E402
from megatron_latent.training.config import RunConfig  # noqa: E402

from hf_reference import make_gpt_neox  # noqa: E402
from training_fixtures import write_token_dataset  # noqa: E402

VOCAB, SEQ = 512, 32


@pytest.fixture(scope="module")
def teacher(world):
    """(root, HF model, data prefix, SAE folder) in a directory both ranks see."""
    box = [tempfile.mkdtemp(prefix="ml-label-tp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    root = Path(box[0])
    hf = make_gpt_neox(vocab_size=VOCAB, layers=2, hidden=32, heads=4, seed=5,
                       max_positions=64).float().eval()
    if dist.get_rank() == 0:
        config = mapping.hf_config_to_model_config(hf.config.to_dict())
        write_weights_checkpoint(str(root / "ckpt"), mapping.hf_to_canonical(hf.state_dict(),
                                                                             VOCAB),
                                 RunConfig(model=config).to_dict())
        write_token_dataset(str(root / "tokens"), num_documents=12)
        write_sae(random_sae(32, 48, 6), str(root / "sae"))
    dist.barrier()
    yield root, hf, str(root / "tokens"), str(root / "sae")
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)


def test_tp2_teacher_labels_equal_plain_autograd(use_parallel, teacher):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_latent.sae import read_sae
    from megatron_latent.sae.labels import read_labels, window_bounds

    use_parallel(2)
    root, hf, prefix, sae_dir = teacher
    out = root / "labels"
    code = tool("label_concepts").main([
        "--load", str(root / "ckpt"), "--layer", "0", "--sae", sae_dir, "--data-path", prefix,
        "--seq-length", str(SEQ), "--output-prefix", str(out), "--batch-size", "4",
        "--chunk-windows", "5", "--tensor-model-parallel-size", "2", "--device", "cpu",
        "--no-progress"])
    dist.barrier()
    problems: list[str] = []
    checked = 0
    if code != 0:
        problems.append(f"exit status {code}")
    else:
        labels = read_labels(str(out), prefix)
        ids = np.concatenate([labels.sequence(i)[0] for i in range(len(labels))])
        data = IndexedDataset(prefix)
        tokens = np.concatenate([np.array(data[i]) for i in range(len(data))]).astype(np.int64)
        sae = read_sae(sae_dir)
        for start, end in window_bounds(len(tokens), SEQ)[:5]:
            top, score = reference_labels(hf, sae, torch.from_numpy(tokens[start:end])[None], 0)
            for t in range(end - start - 1):
                ranked = torch.sort(-score[0, t], stable=True).values
                if 0 < (ranked[K] - ranked[K - 1]).abs() < 1e-5:
                    continue  # a near-tie
                want = np.sort(top[0, t].numpy())
                if not np.array_equal(ids[start + t], want):
                    problems.append(f"token {start + t}: {ids[start + t]} != {want}")
                checked += 1
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (problems[:5], checked))
    for rank, (found, count) in enumerate(seen):
        assert not found, (rank, found)
        assert count > 100, (rank, count)


def test_a_world_other_than_tp_is_refused(use_parallel, teacher, capsys):
    root, _, prefix, sae_dir = teacher
    code = tool("label_concepts").main([
        "--load", str(root / "ckpt"), "--layer", "0", "--sae", sae_dir, "--data-path", prefix,
        "--output-prefix", str(root / "never"), "--tensor-model-parallel-size", "1",
        "--device", "cpu", "--no-progress"])
    message = capsys.readouterr().err
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (code, message))
    for rank, (status, text) in enumerate(seen):
        assert status == 2, (rank, text)
        assert "needs exactly 1 processes (torchrun --nproc_per_node 1); this run has 2" in text
