"""`--method concepts` in the trainer, on labels made by tools/label_concepts.py from a teacher
trained here: the logged LM and concept losses equal the model's own on the step's samples
and labels (read here straight from the label datasets), exact resume, the parameter and FLOP
counts of --dry-run against formulas written here, online labels, and refused inputs."""

from __future__ import annotations

import pytest
import torch
from test_concept_labels import random_sae, tool

from megatron_latent.config import ConfigError

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

C, K = 48, 4


@pytest.fixture(scope="module")
def setup(single_process_parallel, tmp_path_factory):
    from megatron_latent.sae.files import write_sae

    base = tmp_path_factory.mktemp("concepts")
    prefix = write_token_dataset(str(base / "tokens"), num_documents=24)
    tokenizer = write_wordlevel_tokenizer(str(base / "tokenizer"))
    teacher = base / "teacher"
    run_training(TINY_FLAGS + ["--data-path", prefix, "--split", "90,10,0",
                               "--tokenizer-type", "HuggingFaceTokenizer",
                               "--tokenizer-model", tokenizer,
                               "--micro-batch-size", "2", "--global-batch-size", "4",
                               "--train-iters", "3", "--eval-iters", "0", "--save", str(teacher)])
    sae = write_sae(random_sae(32, C, 6), str(base / "sae"))
    labels = base / "labels" / "tokens"
    assert tool("label_concepts").main([
        "--load", str(teacher), "--layer", "0", "--sae", sae, "--data-path", prefix,
        "--seq-length", "32", "--output-prefix", str(labels), "--device", "cpu",
        "--no-progress"]) == 0
    return {"base": base, "prefix": prefix, "tokenizer": tokenizer, "teacher": teacher,
            "sae": sae, "labels": str(labels)}


def flags(s, *extra, labels=True):
    out = TINY_FLAGS + [
        "--method", "concepts", "--num-concepts", str(C), "--concept-insert-layer", "1",
        "--data-path", s["prefix"], "--split", "80,20,0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", s["tokenizer"],
        "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1"]
    if labels:
        out += ["--concept-labels", s["labels"]]
    return out + list(extra)


def test_logged_losses_equal_the_model_on_the_steps_samples(setup):
    """Step 1's LM loss (over the global batch) and concept loss (the mean of the micro-batch
    means, K labels each, the labels' weights) against the initial model run here on the same
    samples, with the labels read from the label datasets by the samples' tokens' documents."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.methods.concepts.model import CONCEPT_CE_KEY, SCALED_LOSS_KEY
    from megatron_latent.training.trainer import Trainer

    argv = flags(setup, "--train-iters", "1", "--concept-loss-weight", "0.25")
    run, _ = parse_run_config(argv)
    trainer = Trainer(run)
    trainer.setup()
    step = next(iter(trainer.data.train_steps()))
    model = trainer.engine.unwrapped_model()
    lm_sum, tokens, concept = 0.0, 0.0, []
    with torch.no_grad():
        for batch in step.microbatches:
            assert batch["concept_ids"].shape == (*batch["tokens"].shape, K)
            lm, aux = model(batch["tokens"], labels=batch["labels"],
                            concept_ids=batch["concept_ids"],
                            concept_weights=batch["concept_weights"])
            lm_sum += float((lm * batch["loss_mask"]).sum())
            tokens += float(batch["loss_mask"].sum())
            concept.append(float(aux[CONCEPT_CE_KEY]))
    summary, _ = run_training(argv)
    first = summary.history[0]
    assert first["lm_loss"] == pytest.approx(lm_sum / tokens, rel=1e-6)
    assert first[CONCEPT_CE_KEY] == pytest.approx(sum(concept) / len(concept), rel=1e-6)
    assert first[SCALED_LOSS_KEY] == pytest.approx(0.25 * first[CONCEPT_CE_KEY], rel=1e-6)
    assert first[CONCEPT_CE_KEY] > 0


def test_labels_follow_the_samples_tokens(setup):
    """A sample's concept ids are the label datasets' entries at its tokens' positions in the
    file. Samples cross documents in shuffled order, so each piece between end-of-document
    tokens is found in the token stream here by value (pieces of 8+ tokens, found once)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    def whole(prefix: str) -> np.ndarray:
        dataset = IndexedDataset(prefix)  # kept open while its memory-mapped rows are copied
        return np.concatenate([np.array(dataset[i]) for i in range(len(dataset))])

    run, _ = parse_run_config(flags(setup, "--train-iters", "1"))
    trainer = Trainer(run)
    trainer.setup()
    stream = whole(setup["prefix"])
    labels = whole(setup["labels"] + "_ids").reshape(-1, K)
    checked = 0
    for batch in next(iter(trainer.data.train_steps())).microbatches:
        for tokens, ids in zip(batch["tokens"].numpy(), batch["concept_ids"].numpy()):
            cuts = [0, *(np.flatnonzero(tokens == 511) + 1), len(tokens)]
            for begin, end in zip(cuts[:-1], cuts[1:]):
                if end - begin < 8:
                    continue
                piece = tokens[begin:end]
                windows = np.lib.stride_tricks.sliding_window_view(stream, len(piece))
                starts = np.flatnonzero((windows == piece).all(axis=1))
                if len(starts) != 1:
                    continue
                at = int(starts[0])
                np.testing.assert_array_equal(ids[begin:end], labels[at:at + len(piece)])
                checked += 1
    assert checked >= 3


def test_resume_is_exact(setup, tmp_path):
    straight, _ = run_training(flags(setup, "--train-iters", "4"))
    run_training(flags(setup, "--train-iters", "4", "--exit-interval", "2", "--save",
                       str(tmp_path / "ckpt"), "--save-interval", "2"))
    resumed, _ = run_training(flags(setup, "--train-iters", "4", "--load",
                                    str(tmp_path / "ckpt"), "--save", str(tmp_path / "ckpt")))
    assert [e["lm_loss"] for e in resumed.history] == [e["lm_loss"] for e in
                                                       straight.history[2:]]
    assert [e["concept_ce"] for e in resumed.history] == [e["concept_ce"] for e in
                                                          straight.history[2:]]


def test_dry_run_counts_parameters_and_flops(setup, capsys):
    """TINY: 2 layers, h 32, f 128, s 32, V 512; insert 1: one block on T, one on 2T."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(flags(setup, "--train-iters", "1", "--concept-top-k", "8"))
    text = Trainer(run).dry_run()
    h, f, s, v = 32, 128, 32, 512
    block = 2 * (4 * h * h + 2 * h * f)
    attention = 2 * 2 * s * h
    forward = block + attention + 2 * block + 4 * attention + 2 * h * v + 2 * h * C + 2 * 8 * h
    assert f"concepts: forward {forward:.4g}, training {3 * forward:.4g}" in text
    pythia = 2 * (12 * h * h + 13 * h) + 2 * h + 2 * v * h
    extra = 2 * h * C + C + 2 * h
    assert f"parameters: {pythia + extra:,}" in text
    assert f"the Pythia model {pythia:,}, concepts adds {extra:,}" in text


def test_online_labels_are_the_teachers_on_the_steps_windows(setup):
    """--concept-sae with a teacher: the step's concept loss equals the model's loss against
    the teacher's attribution labels of the step's own token windows."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.inference.loading import load_model_for_inference
    from megatron_latent.methods.concepts.model import CONCEPT_CE_KEY
    from megatron_latent.sae.attribution import label_windows, split_project_teacher
    from megatron_latent.sae.files import read_sae
    from megatron_latent.training.trainer import Trainer

    argv = flags(setup, "--train-iters", "1", "--concept-sae", setup["sae"],
                 "--concept-teacher-load", str(setup["teacher"]),
                 "--concept-teacher-layer", "0", labels=False)
    run, _ = parse_run_config(argv)
    trainer = Trainer(run)
    trainer.setup()
    step = next(iter(trainer.data.train_steps()))
    model = trainer.engine.unwrapped_model()
    teacher = load_model_for_inference(str(setup["teacher"]), device=torch.device("cpu"),
                                       dtype=torch.float32).model
    split = split_project_teacher(teacher.eval().requires_grad_(False), 0)
    sae = read_sae(setup["sae"])
    expected = []
    for batch in step.microbatches:
        assert "concept_ids" not in batch
        labels = label_windows(split, sae, batch["tokens"], K)
        with torch.no_grad():
            _, aux = model(batch["tokens"], labels=batch["labels"], concept_ids=labels.ids,
                           concept_weights=labels.weights)
        expected.append(float(aux[CONCEPT_CE_KEY]))
    summary, _ = run_training(argv)
    assert summary.history[0][CONCEPT_CE_KEY] == pytest.approx(
        sum(expected) / len(expected), rel=1e-6)


@pytest.mark.parametrize("change,message", [
    (["--num-concepts", "64"], "latents, but --num-concepts is 64"),
    (["--concept-k-attr", "3"], "K=4"),
    (["--concept-labels", "/nonexistent/labels"], "no finished concept labels"),
    (["--reset-attention-mask"], "--reset-attention-mask"),
])
def test_bad_labels_are_refused_before_training(setup, change, message):
    with pytest.raises(ConfigError, match=message):
        run_training(flags(setup, "--train-iters", "1", *change))


def test_missing_labels_are_refused(setup):
    with pytest.raises(ConfigError, match="--concept-labels"):
        run_training(flags(setup, "--train-iters", "1", labels=False))
