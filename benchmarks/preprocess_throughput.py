#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py on the demo corpus with 1 and 2 workers.

Prepares the Shakespeare demo corpus and a 4096-piece SentencePiece BPE tokenizer in a
temporary directory (or reuses --corpus/--tokenizer-model), then tokenizes the corpus several
times per worker count and prints the best run of each as a table (MB/s of JSONL input,
documents/s, tokens/s). --sentences adds --split-sentences runs.

    python benchmarks/preprocess_throughput.py [--repeats 3] [--sentences]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns on import that the GPU kernel libraries are absent; data tools use none.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def prepare(work: str, corpus: str | None, model: str | None) -> tuple[str, str]:
    from megatron_latent.data.demo_corpus import find_plays, play_documents, write_jsonl
    from megatron_latent.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_sentencepiece,
    )

    if corpus is None:
        corpus = os.path.join(work, "shakespeare.jsonl")
        write_jsonl(corpus, [d for p in find_plays() for d in play_documents(p)])
    if model is None:
        config = TokenizerTrainingConfig(
            input=[corpus], output_prefix=os.path.join(work, "tokenizer"), vocab_size=4096
        )
        model = train_sentencepiece(config, log=lambda m: None)
    return corpus, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="JSONL corpus (default: the demo corpus, all plays).")
    parser.add_argument("--tokenizer-model", help="SentencePiece model (default: train 4k BPE).")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sentences", action="store_true", help="Also time --split-sentences.")
    args = parser.parse_args(argv)

    import torch

    from megatron_latent.data.preprocess import PreprocessConfig, preprocess

    with tempfile.TemporaryDirectory() as work:
        corpus, model = prepare(work, args.corpus, args.tokenizer_model)
        size = os.path.getsize(corpus) / 2**20
        print(f"corpus: {corpus} ({size:.2f} MB), tokenizer: {model}, "
              f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
        modes = [False, True] if args.sentences else [False]
        rows = []
        for split in modes:
            for workers in args.workers:
                best = None
                for r in range(args.repeats):
                    config = PreprocessConfig(
                        input=[corpus],
                        output_prefix=os.path.join(work, f"out_{workers}_{r}"),
                        tokenizer_type="SentencePieceTokenizer",
                        tokenizer_model=model,
                        append_eod=True,
                        split_sentences=split,
                        workers=workers,
                        log_interval=0,
                    )
                    stats = preprocess(config, log=lambda m: None)
                    if best is None or stats.seconds < best.seconds:
                        best = stats
                rows.append((split, workers, best))
        header = (f"{'level':<9} {'workers':>7} {'seconds':>8} {'MB/s':>7} {'docs/s':>8} "
                  f"{'tokens/s':>11} {'sequences':>10} {'tokens':>10}")
        print(header)
        print("-" * len(header))
        for split, workers, s in rows:
            print(
                f"{'sentence' if split else 'document':<9} {workers:>7} {s.seconds:>8.2f} "
                f"{s.bytes / s.seconds / 2**20:>7.2f} {s.documents / s.seconds:>8.0f} "
                f"{s.tokens / s.seconds:>11.0f} {s.sequences:>10} {s.tokens:>10}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
