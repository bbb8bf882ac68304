"""Tiny tokenizers, corpora and datasets for the data-pipeline tests (built once per session).

Imported by the ``test_data_*`` modules; everything is written under one temporary directory.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from functools import cache

import numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")

# Texts that stress whitespace, Unicode and punctuation handling.
TRICKY_TEXTS = [
    "Hello world.",
    "  leading and trailing spaces  ",
    "tabs\tand\ttabs, double  spaces and\nnew\nlines\n\n\nparagraphs",
    "Windows\r\nline endings\r\n",
    "naïve café — “curly quotes” and ‘single’ ones… 😀 ☃ 中文 العربية",
    "don't I'll we've they're 12345 3.14159 1,000,000",
    "Mr. Smith went to Washington. He arrived at 5 p.m. and left! Did he? Yes.",
    "",
    " ",
    "\n",
]


@cache
def workdir() -> str:
    path = tempfile.mkdtemp(prefix="megatron_latent_data_tests_")
    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def corpus_texts() -> tuple[str, ...]:
    """About 40 short Shakespeare scenes (plain text) from the embedded demo corpus."""
    from megatron_latent.data.demo_corpus import find_plays, play_documents

    plays = {p.slug: p for p in find_plays()}
    docs = play_documents(plays["hamlet"]) + play_documents(plays["macbeth"])
    texts = []
    for doc in docs:
        texts.append(doc.text[:2500])
    return tuple(texts[:40])


@cache
def sentencepiece_model() -> str:
    """A 400-piece lossless BPE SentencePiece model with the reserved special tokens."""
    from megatron_latent.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_sentencepiece,
    )

    corpus = os.path.join(workdir(), "sp_corpus.jsonl")
    write_jsonl(corpus, [{"text": t} for t in corpus_texts()])
    prefix = os.path.join(workdir(), "sp_tiny")
    config = TokenizerTrainingConfig(
        input=[corpus], output_prefix=prefix, vocab_size=400, threads=1
    )
    return train_sentencepiece(config, log=lambda m: None)


@cache
def gpt2_files() -> tuple[str, str]:
    """(vocab.json, merges.txt) of a 600-token GPT-2 style byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus_texts()), trainer)
    directory = os.path.join(workdir(), "gpt2_tiny")
    os.makedirs(directory, exist_ok=True)
    tok.model.save(directory)
    return os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")


@cache
def hf_tokenizer_dir() -> str:
    """A directory with a Unigram/Metaspace ``tokenizer.json`` and a ``tokenizer_config.json``.

    Its post-processor would insert ``<s>``; encoding for pretraining must not.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus_texts()), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    directory = os.path.join(workdir(), "hf_tiny")
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": {"content": "<s>"}, "pad_token": "<pad>"}, f)
    return directory


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_indexed(prefix: str, documents: list[list[list[int]]], vocab_size: int) -> str:
    """Write a dataset with megatron-core's builder: documents of sequences of token ids."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for sequences in documents:
        for sequence in sequences:
            builder.add_item(torch.tensor(sequence, dtype=torch.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def synthetic_dataset(
    prefix: str, low: int, high: int, documents: int, eod: int, seed: int, vocab_size: int
) -> str:
    """Documents of random length whose tokens all lie in ``[low, high)``, each ending in eod."""
    rng = numpy.random.default_rng(seed)
    docs = []
    for _ in range(documents):
        length = int(rng.integers(5, 60))
        tokens = rng.integers(low, high, size=length).tolist() + [eod]
        docs.append([tokens])
    return write_indexed(prefix, docs, vocab_size)


def read_bytes(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    with open(prefix + ".idx", "rb") as f:
        index = f.read()
    return data, index


# -- an independent GPT-2 byte-level BPE, written from the published algorithm -------------

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_alphabet() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ReferenceGPT2BPE:
    """Plain-Python GPT-2 encoder: regex pre-split, byte->unicode map, rank-ordered merges."""

    def __init__(self, vocab_file: str, merges_file: str, specials=("<|endoftext|>",)) -> None:
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        self.ranks = {tuple(ln.split(" ")): i for i, ln in enumerate(lines)}
        self.byte_map = _byte_alphabet()
        self.specials = list(specials)
        import regex  # Unicode classes (\p{L}); installed with transformers

        self.regex = regex
        self.pattern = regex.compile(_GPT2_PATTERN)

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            best = min(
                range(len(parts) - 1),
                key=lambda i: self.ranks.get((parts[i], parts[i + 1]), float("inf")),
            )
            pair = (parts[best], parts[best + 1])
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pattern = "(" + "|".join(self.regex.escape(s) for s in self.specials) + ")"
        for chunk in self.regex.split(pattern, text):
            if chunk in self.specials:
                ids.append(self.vocab[chunk])
                continue
            for word in self.pattern.findall(chunk):
                mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[p] for p in self._bpe(mapped))
        return ids
