"""`--method thought-memory` in the trainer: the loss normalised over the whole global batch,
validation perplexity with and without special-token targets against sums taken here from the
model's own per-token CE, micro-batching that does not change the step, exact resume across an
epoch (and curriculum) boundary, executed-position accounting, and refused data."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.config import ConfigError

from training_fixtures import (
    TINY_FLAGS,
    TINY_VOCAB,
    run_training,
    write_sentence_dataset,
    write_token_dataset,
    write_wordlevel_tokenizer,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tm_corpus")
    prefix = write_sentence_dataset(str(root / "data" / "corpus_text_sentence"), num_documents=40)
    tokenizer = write_wordlevel_tokenizer(str(root / "tokenizer"))
    return prefix, tokenizer


def flags(corpus, *extra, micro: int = 4, budget: int = 500) -> list[str]:
    """--global-batch-size is only the LR schedule's unit here: the same for every run."""
    prefix, tokenizer = corpus
    return TINY_FLAGS + [
        "--method", "thought-memory", "--data-path", prefix, "--split", "75,25,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", str(micro), "--global-batch-size", "16",
        "--eval-iters", "0", "--tm-token-budget", str(budget), "--tm-max-content", "8",
        "--tm-stream-length", "3", "--tm-memory-size", "4", *extra]


def losses(summary) -> list[float]:
    return [entry["lm_loss"] for entry in summary.history]


def test_loss_is_the_mean_of_index_losses_over_the_whole_global_batch(single_process_parallel,
                                                                      corpus):
    """With one stream per micro-batch, each micro-batch alone would normalise differently:
    the step's loss must be (1/T) Σ_t Σ_rows at t w·CE / Σ_rows at t w over the global batch."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(flags(corpus, "--train-iters", "1", micro=1))
    trainer = Trainer(run)
    trainer.setup()
    data = trainer.data
    whole = data.batcher(0).batch(0, data.options.eos_weight_at(0, 0))
    assert len(whole.stream_ids) >= 3  # several micro-batches of one stream each
    model = trainer.engine.unwrapped_model()
    with torch.no_grad():
        ce, _ = model(whole.input_ids, whole.targets, valid=whole.valid)
    w = whole.weights.double() * whole.valid[..., None].double()
    per_index = w.sum(dim=(0, 2))  # Σ_rows at t of w
    index_losses = [(ce[:, t].double() * w[:, t]).sum() / per_index[t]
                    for t in range(ce.shape[1]) if per_index[t] > 0]
    expected = torch.stack(index_losses).mean().item()
    summary = trainer.train()
    assert summary.history[0]["lm_loss"] == pytest.approx(expected, rel=1e-5)


def test_micro_batching_does_not_change_the_steps(single_process_parallel, corpus):
    """A large hinge weight makes the sentence-vector hinge matter: it too must be normalised
    over the global batch, not per micro-batch."""
    hinge = ["--tm-hinge-weight", "30"]
    one, _ = run_training(flags(corpus, "--train-iters", "3", *hinge, micro=1))
    many, _ = run_training(flags(corpus, "--train-iters", "3", *hinge, micro=16))
    assert losses(one) == pytest.approx(losses(many), rel=1e-5)


def test_validation_perplexity_with_and_without_special_targets(single_process_parallel, corpus):
    summary, trainer = run_training(flags(corpus, "--train-iters", "1", "--eval-iters", "2"))
    vocab = TINY_VOCAB  # the tokenizer's ids; PAD, BOS, EOS, EOD come after
    sets = dict(trainer.data.validation())
    assert set(sets) == {"validation", "all-targets"}
    model = trainer.engine.unwrapped_model()
    sums = {"content": [0.0, 0.0], "every": [0.0, 0.0]}
    pad = model.layout.pad
    with torch.no_grad():
        for batch in sets["validation"]:
            ce, _ = model(batch["tokens"], batch["labels"], valid=batch["valid"])
            labels = batch["labels"]
            rows = batch["valid"][..., None]
            for key, mask in (("content", (labels < vocab) & rows),
                              ("every", (labels != pad) & rows)):
                sums[key][0] += (ce.double() * mask).sum().item()
                sums[key][1] += mask.sum().item()
    content = sums["content"][0] / sums["content"][1]
    every = sums["every"][0] / sums["every"][1]
    assert sums["every"][1] > sums["content"][1] > 0
    assert summary.validation["validation"] == pytest.approx(content, rel=1e-6)
    assert summary.validation["all-targets"] == pytest.approx(every, rel=1e-6)


def test_resume_across_epochs_and_curriculum_phases_is_exact(single_process_parallel, corpus,
                                                             tmp_path):
    curriculum = ["--tm-stream-length-every", "1", "--tm-stream-length-step", "2",
                  "--tm-eos-weight-after", "0.3"]
    full, trainer = run_training(flags(corpus, "--train-iters", "14", *curriculum))
    first_epoch = len(trainer.data.batcher(0))
    assert first_epoch < 10  # the run crosses into epoch 1 (S 3 -> 5, EOS weight 1 -> 0.3)
    run_training(flags(corpus, "--train-iters", "14", "--exit-interval", "10", "--save",
                       str(tmp_path / "ckpt"), *curriculum))
    resumed, again = run_training(flags(corpus, "--train-iters", "14", "--load",
                                        str(tmp_path / "ckpt"), *curriculum))
    assert losses(resumed) == losses(full)[10:]  # bit for bit
    assert again.state.consumed_train_samples == trainer.state.consumed_train_samples
    assert again.state.consumed_tokens == trainer.state.consumed_tokens


def test_consumed_tokens_and_executed_positions(single_process_parallel, corpus):
    summary, trainer = run_training(flags(corpus, "--train-iters", "1", micro=2))
    data = trainer.data
    whole = data.batcher(0).batch(0)
    step = next(data.train_steps())
    assert summary.consumed_samples == len(whole.stream_ids) == step.samples
    # non-pad row tokens: every real input position of every valid row
    assert summary.consumed_tokens == int(((whole.input_ids != data.layout(3).pad)
                                           & whole.valid[..., None]).sum())
    assert step.flop_tokens == sum(batch["tokens"].numel() for batch in step.microbatches)


def test_refuses_data_it_cannot_train_on(single_process_parallel, corpus, tmp_path):
    prefix, tokenizer = corpus
    documents = write_token_dataset(str(tmp_path / "docs" / "corpus_text_document"))
    bad = flags(corpus, "--train-iters", "1")
    at = bad.index("--data-path")
    for data, message in (
        ([documents], "document-level"),
        (["--mock-data"], "--mock-data has no sentences"),
        (["0.5", prefix, "0.5", prefix], "one prefix"),
        ([str(tmp_path / "missing")], "missing"),
    ):
        argv = bad[:at] + (["--data-path"] + data if data[0] != "--mock-data" else data) + \
            bad[at + 2:]
        with pytest.raises(ConfigError, match=message):
            run_training(argv)


def test_the_checkpoint_sweep_scores_the_trainers_validation(single_process_parallel, corpus,
                                                             tmp_path):
    """tools/evaluate_checkpoints.py reaches the method's own validation micro-batches: its
    held-out losses equal the ones the trainer logged at each saved iteration."""
    import json

    from test_evaluation_sweep import FakeEvaluate, run_sweep

    from megatron_latent.evaluation.sweep import read_jsonl

    run_dir = tmp_path / "run"
    run_training(flags(corpus, "--train-iters", "4", "--eval-iters", "2", "--eval-interval", "2",
                       "--save-interval", "2", "--save", str(run_dir)))
    assert run_sweep(run_dir, tmp_path / "evals", FakeEvaluate()) == [2, 4]
    metrics = read_jsonl(str(run_dir / "metrics.jsonl"))
    for iteration in (2, 4):
        record = json.loads((tmp_path / "evals" / f"iter_{iteration:07d}.json").read_text())
        logged = {r["kind"]: r["lm_loss"] for r in metrics if r["iteration"] == iteration
                  and r["kind"].startswith("validation")}
        assert record["valid_loss"]["validation"] == pytest.approx(logged["validation"],
                                                                   rel=1e-6)
        assert record["valid_loss"]["all-targets"] == pytest.approx(
            logged["validation/all-targets"], rel=1e-6)
