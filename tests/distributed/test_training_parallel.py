"""Training across two gloo processes: DP=2 and TP=2 reach the same losses, a DP=2 run
resumes bit for bit, and a checkpoint written at TP=1 is re-cut for TP=2."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_latent.config import ConfigError  # noqa: E402

from training_fixtures import (  # noqa: E402
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)


@pytest.fixture(scope="module")
def shared_dir(world):
    """A directory both ranks see (rank 0 creates it)."""
    box = [tempfile.mkdtemp(prefix="ml-dist-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


@pytest.fixture(scope="module")
def corpus(shared_dir):
    if dist.get_rank() == 0:
        write_token_dataset(str(shared_dir / "data" / "tokens"))
        write_wordlevel_tokenizer(str(shared_dir / "tokenizer"))
    dist.barrier()
    return str(shared_dir / "data" / "tokens"), str(shared_dir / "tokenizer" / "tokenizer.json")


def flags(corpus, *extra):
    prefix, tokenizer = corpus
    return TINY_FLAGS + [
        "--data-path", prefix, "--split", "90,10,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", "2", "--global-batch-size", "8",
        "--eval-iters", "1", "--eval-interval", "100", *extra,
    ]


def losses(summary):
    return [entry["lm_loss"] for entry in summary.history]


def test_dp2_and_tp2_train_alike_and_resume_exactly(use_parallel, corpus, shared_dir):
    data_parallel, _ = run_training(flags(corpus, "--train-iters", "6"))
    tensor_parallel, trainer = run_training(
        flags(corpus, "--train-iters", "6", "--tensor-model-parallel-size", "2"))
    assert trainer.dp_size == 1
    assert losses(tensor_parallel) == pytest.approx(losses(data_parallel), rel=1e-5, abs=1e-6)

    sequence_parallel, _ = run_training(
        flags(corpus, "--train-iters", "6", "--tensor-model-parallel-size", "2",
              "--sequence-parallel"))
    assert losses(sequence_parallel) == pytest.approx(losses(data_parallel), rel=1e-5, abs=1e-6)

    ckpt = str(shared_dir / "ckpt_dp2")
    first, _ = run_training(flags(corpus, "--train-iters", "6", "--exit-interval", "3",
                                  "--save", ckpt))
    resumed, trainer = run_training(flags(corpus, "--train-iters", "6", "--load", ckpt))
    assert trainer.dp_size == 2
    assert losses(first) + losses(resumed) == losses(data_parallel)  # bit for bit


def test_dp2_resume_with_dropout_is_exact(use_parallel, corpus, shared_dir):
    """Each data-parallel rank draws its own dropout masks; a resume restores every rank's
    generator and nothing draws from it before training continues."""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--eval-interval", "2"]
    full, trainer = run_training(flags(corpus, "--train-iters", "6", *dropout))
    assert trainer.dp_size == 2
    ckpt = str(shared_dir / "ckpt_dp2_dropout")
    run_training(flags(corpus, "--train-iters", "6", "--exit-interval", "3", "--save", ckpt,
                       *dropout))
    resumed, _ = run_training(flags(corpus, "--train-iters", "6", "--load", ckpt, *dropout))
    assert losses(resumed) == losses(full)[3:]  # bit for bit


def first_step_gradients(argv):
    """Gradients (full, canonical names, same on every rank) and the logged grad norm of the
    first optimizer step of a run."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.distributed import tp_group, tp_size
    from megatron_latent.models import hf_gpt_neox as mapping
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(argv)
    trainer = Trainer(run)
    trainer.setup()
    batches = next(trainer.data.train_steps()).microbatches
    result = trainer.engine.train_step(batches)
    model = trainer.engine.unwrapped_model()
    grads = mapping.canonical_state_dict({n: p.grad.clone() for n, p in model.named_parameters()})
    if tp_size() > 1:
        shards = [None] * tp_size()
        dist.all_gather_object(shards, grads, group=tp_group())
        grads = mapping.merge_shards(shards)
    return grads, result


def test_dp2_and_tp2_take_the_same_gradient_step(use_parallel, corpus):
    """Unequal loss tokens per rank (--eod-mask-loss): DP=2 (two micro-batches on each rank,
    summed across ranks by DDP) and TP=2 (all four on one model) give the same gradients and
    grad norm (clipping off, so the gradients are compared as computed)."""
    extra = ("--train-iters", "2", "--eod-mask-loss", "--clip-grad", "0")
    dp_grads, dp_result = first_step_gradients(flags(corpus, *extra))
    tp_grads, tp_result = first_step_gradients(
        flags(corpus, *extra, "--tensor-model-parallel-size", "2"))
    assert dp_result.lm_loss == pytest.approx(tp_result.lm_loss, rel=1e-6)
    assert dp_result.grad_norm == pytest.approx(tp_result.grad_norm, rel=1e-5)
    assert set(dp_grads) == set(tp_grads)
    for name, grad in dp_grads.items():
        torch.testing.assert_close(grad, tp_grads[name], atol=1e-7, rtol=1e-4, msg=name)


def test_tp1_checkpoint_recut_for_tp2(use_parallel, corpus, shared_dir):
    ckpt = str(shared_dir / "ckpt_tp1")
    _, source = run_training(flags(corpus, "--train-iters", "2", "--save", ckpt))
    full_weights = source.engine.model_state()
    with pytest.raises(ConfigError, match="--no-load-optim"):
        run_training(flags(corpus, "--train-iters", "4", "--load", ckpt,
                           "--tensor-model-parallel-size", "2"))

    from megatron_latent.arguments import parse_run_config
    from megatron_latent.distributed import tp_rank
    from megatron_latent.models.hf_gpt_neox import shard_for_rank
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(flags(corpus, "--train-iters", "4", "--load", ckpt,
                                    "--tensor-model-parallel-size", "2", "--no-load-optim"))
    trainer = Trainer(run)
    trainer.setup()
    assert trainer.state.iteration == 2
    expected = shard_for_rank(full_weights, 2, tp_rank())
    for name, tensor in trainer.engine.model_state().items():
        assert torch.equal(tensor, expected[name]), name


def test_tp2_checkpoint_converts_to_hugging_face(use_parallel, corpus, shared_dir):
    transformers = pytest.importorskip("transformers")
    import importlib.util

    from megatron_latent.distributed import gather_tensor_parallel

    ckpt, hf_dir = shared_dir / "ckpt_tp2", shared_dir / "hf_tp2"
    _, trainer = run_training(flags(corpus, "--train-iters", "2", "--save", str(ckpt),
                                    "--tensor-model-parallel-size", "2"))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    model = trainer.engine.unwrapped_model().eval()
    with torch.no_grad():
        ours = gather_tensor_parallel(model(ids), dim=-1)
    if dist.get_rank() == 0:
        path = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
        spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.main(["to-hf", "--load", str(ckpt), "--output", str(hf_dir)]) == 0
        hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).float().eval()
        with torch.no_grad():
            theirs = hf_model(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
    dist.barrier()
