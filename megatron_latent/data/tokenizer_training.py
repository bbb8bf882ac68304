"""Train a SentencePiece tokenizer from JSONL, Parquet or plain-text files.

The defaults make a lossless GPT tokenizer: identity normalization and no whitespace
collapsing (``detokenize(tokenize(text)) == text``), byte fallback (no unknown tokens), digits
split, ids 0-3 = ``<unk> <s> </s> <pad>`` (EOS ``</s>`` is the end-of-document token), and the
project's reserved special tokens as user-defined pieces right after them.

SentencePiece trains on lines: each document is split at newlines (newlines themselves are
encoded through byte fallback). When there are more lines than ``max_sentences``, a seeded
reservoir sample is used, so the result depends only on the inputs and the seed.
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from megatron_latent.data.readers import InputError, read_texts, resolve_inputs
from megatron_latent.data.tokenizer_args import RESERVED_SPECIAL_TOKENS

TRAINING_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz",
                     ".parquet", ".txt")
NAMED_PIECES = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass
class TokenizerTrainingConfig:
    """What ``tools/train_tokenizer.py`` takes."""

    input: list[str]
    output_prefix: str
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe | unigram
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    special_tokens: list[str] = field(default_factory=lambda: list(RESERVED_SPECIAL_TOKENS))
    byte_fallback: bool = True
    normalization: str = "identity"  # identity (lossless) | nmt_nfkc | nfkc | ...
    character_coverage: float = 0.9995
    max_sentences: int = 2_000_000
    max_sentence_length: int = 1 << 16
    seed: int = 1234
    threads: int = max(1, os.cpu_count() or 1)


def _check(config: TokenizerTrainingConfig) -> None:
    if config.model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got {config.model_type!r}")
    reserved = len(NAMED_PIECES) + len(config.special_tokens)
    floor = reserved + (256 if config.byte_fallback else 0) + 1
    if config.vocab_size < floor:
        raise ValueError(
            f"--vocab-size {config.vocab_size} is too small: {reserved} special pieces"
            + (" and 256 byte-fallback pieces" if config.byte_fallback else "")
            + f" need at least {floor}"
        )
    clashes = sorted(set(config.special_tokens) & set(NAMED_PIECES))
    if clashes:
        raise ValueError(f"special tokens {clashes} are already the named pieces {NAMED_PIECES}")
    parent = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--output-prefix: cannot write to directory {parent!r}")


def sample_lines(
    texts: Iterable[str], max_lines: int, seed: int
) -> tuple[list[str], int, int]:
    """Non-blank lines of ``texts``; a seeded reservoir sample when there are more than
    ``max_lines``. Returns (lines, number of lines seen, bytes seen)."""
    rng = random.Random(seed)
    kept: list[str] = []
    seen = 0
    nbytes = 0
    for text in texts:
        nbytes += len(text.encode("utf-8"))
        for line in text.split("\n"):
            if not line.strip():
                continue
            seen += 1
            if len(kept) < max_lines:
                kept.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_lines:
                    kept[j] = line
    return kept, seen, nbytes


def train_sentencepiece(
    config: TokenizerTrainingConfig, log: Callable[[str], None] | None = None
) -> str:
    """Train and write ``{output_prefix}.model`` / ``.vocab``; returns the ``.model`` path."""
    import sentencepiece as spm

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    _check(config)
    files = resolve_inputs(config.input, TRAINING_SUFFIXES)
    began = time.time()
    lines, seen, nbytes = sample_lines(
        read_texts(files, config.json_keys), config.max_sentences, config.seed
    )
    if not lines:
        raise InputError("the inputs hold no text to train on")
    log(
        f"Read {seen} lines ({nbytes / 2**20:.1f} MB) from {len(files)} file(s) in "
        f"{time.time() - began:.1f}s; training a {config.vocab_size}-piece "
        f"{config.model_type} model on {len(lines)} lines"
    )
    spm.set_random_generator_seed(config.seed)
    began = time.time()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            byte_fallback=config.byte_fallback,
            normalization_rule_name=config.normalization,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=config.character_coverage,
            user_defined_symbols=list(config.special_tokens),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=NAMED_PIECES[0],
            bos_piece=NAMED_PIECES[1],
            eos_piece=NAMED_PIECES[2],
            pad_piece=NAMED_PIECES[3],
            input_sentence_size=0,
            max_sentence_length=config.max_sentence_length,
            num_threads=config.threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"SentencePiece training failed: {err}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())
    )
    _write_atomic(config.output_prefix + ".vocab", vocab.encode("utf-8"))
    _write_atomic(config.output_prefix + ".model", model.getvalue())
    log(f"Wrote {config.output_prefix}.model and .vocab in {time.time() - began:.1f}s")
    return config.output_prefix + ".model"


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".incomplete"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def special_token_ids(model_file: str, tokens: Sequence[str]) -> dict[str, int]:
    """The ids that a trained model gives to ``tokens`` (for reports)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    return {t: sp.piece_to_id(t) for t in tokens}
