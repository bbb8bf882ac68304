"""Helpers for trainer tests: a tiny indexed corpus and in-process training runs."""

from __future__ import annotations

import os

import numpy as np

TINY_VOCAB = 512
TINY_FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--seq-length", "32", "--vocab-size", str(TINY_VOCAB), "--make-vocab-size-divisible-by", "64",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-fraction", "0.25", "--weight-decay", "0.01",
    "--num-workers", "0", "--log-interval", "1", "--seed", "7",
    "--device", "cpu",  # CPU tests stay CPU tests on a machine with a GPU
]


def write_token_dataset(prefix: str, num_documents: int = 64, vocab_size: int = TINY_VOCAB,
                        seed: int = 0, lengths: tuple[int, int] = (20, 120)) -> str:
    """A Megatron .bin/.idx document dataset of random token documents (eod = vocab - 1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_documents):
        length = int(rng.integers(*lengths))
        # Markov-ish tokens so there is something to learn.
        tokens = np.cumsum(rng.integers(1, 4, size=length)) % (vocab_size - 1)
        tokens = np.append(tokens, vocab_size - 1).astype(np.int64)
        builder.add_document(tokens, [len(tokens)])
    builder.finalize(prefix + ".idx")
    return prefix


def write_sentence_dataset(prefix: str, num_documents: int = 48, vocab_size: int = TINY_VOCAB,
                           seed: int = 0, sentences: tuple[int, int] = (2, 10),
                           lengths: tuple[int, int] = (3, 14)) -> str:
    """A sentence-level (--split-sentences style) dataset: documents of several sentences of
    Markov-ish tokens, the last ending in the EOD id (vocab - 1), as --append-eod writes."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_documents):
        pieces = []
        for _ in range(int(rng.integers(*sentences))):
            length = int(rng.integers(*lengths))
            start = int(rng.integers(0, vocab_size - 1))
            pieces.append((start + np.cumsum(rng.integers(1, 4, size=length))) % (vocab_size - 1))
        pieces[-1] = np.append(pieces[-1], vocab_size - 1)
        builder.add_document(np.concatenate(pieces).astype(np.int64), [len(p) for p in pieces])
    builder.finalize(prefix + ".idx")
    return prefix


def write_wordlevel_tokenizer(directory: str, vocab_size: int = TINY_VOCAB) -> str:
    """A Hugging Face tokenizer.json whose ids are the synthetic corpus' ids ("t0", "t1", ...,
    with <|endoftext|> last), so real-data runs need no trained tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    return path


def run_training(argv: list[str]):
    """Parse Megatron-style flags and train in this process; returns (TrainSummary, Trainer)."""
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.trainer import Trainer

    run, _ = parse_run_config(argv)
    trainer = Trainer(run)
    trainer.setup()
    return trainer.train(), trainer
