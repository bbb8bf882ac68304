"""Tokenizers behind one interface, usable as megatron-core's dataset tokenizer.

Three kinds, named as Megatron-LM names them (``--tokenizer-type``):

* ``SentencePieceTokenizer`` (alias ``GPTSentencePieceTokenizer``): a SentencePiece ``.model``.
  Text is encoded with the model as is (what Megatron-LM's current tokenizer does), the end of
  document token is the model's EOS.
* ``HuggingFaceTokenizer``: a Hugging Face ``tokenizer.json`` read with the ``tokenizers``
  library (no ``transformers`` needed). No BOS/EOS is inserted when encoding.
* ``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; the end of
  document token is ``<|endoftext|>``.

Every tokenizer subclasses megatron-core's ``MegatronTokenizerBase`` and provides what
``GPTDataset`` reads (``eod``, ``pad``, ``vocab_size``, ``unique_identifiers``), so it can be
passed straight to ``GPTDatasetConfig(tokenizer=...)``. Ids that do not exist are ``-1``
(megatron-core's own "no pad" value), except ``eod``, which raises: GPT data needs one.

Special tokens (e.g. the reserved ``<thought>``, ``</thought>``, ``<sent>``) are best reserved
when the tokenizer is trained (``tools/train_tokenizer.py`` does so by default), so they keep
their ids in the base vocabulary. ``add_special_tokens`` also adds them afterwards: a token the
vocabulary lacks is appended at the end, and ``save``/``load_tokenizer`` keep it.

Where it lives (import everything from here):

* ``tokenizer_base``: the ``Tokenizer`` interface, ``TokenizerError`` and the save metadata file;
* ``tokenizer_sentencepiece``, ``tokenizer_huggingface``, ``tokenizer_gpt2``: one kind each;
* this module: ``TOKENIZER_TYPES``, ``build_tokenizer`` and ``load_tokenizer``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from megatron_latent.data.tokenizer_args import RESERVED_SPECIAL_TOKENS, TOKENIZER_TYPE_NAMES
from megatron_latent.data.tokenizer_base import METADATA_FILE, Tokenizer, TokenizerError
from megatron_latent.data.tokenizer_gpt2 import GPT2_EOD_TOKEN as GPT2_EOD_TOKEN
from megatron_latent.data.tokenizer_gpt2 import GPT2BPETokenizer
from megatron_latent.data.tokenizer_huggingface import HuggingFaceTokenizer
from megatron_latent.data.tokenizer_sentencepiece import SentencePieceTokenizer

__all__ = [
    "RESERVED_SPECIAL_TOKENS",
    "TOKENIZER_TYPES",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "load_tokenizer",
]

TOKENIZER_TYPES: dict[str, type[Tokenizer]] = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": SentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "GPT2BPETokenizer": GPT2BPETokenizer,
}
"""``--tokenizer-type`` values (Megatron-LM's names) -> class."""
assert tuple(TOKENIZER_TYPES) == TOKENIZER_TYPE_NAMES


def _require_file(flag: str, path: str | None, tokenizer_type: str) -> str:
    if not path:
        raise TokenizerError(f"{tokenizer_type} needs {flag}")
    if not os.path.exists(path):
        raise TokenizerError(f"{flag}: {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise TokenizerError(f"{flag}: {path!r} is not readable")
    return path


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    special_tokens: Sequence[str] = (),
    eod_token: str | None = None,
) -> Tokenizer:
    """Build a tokenizer from Megatron-LM style arguments.

    ``tokenizer_model`` is the ``.model`` (SentencePiece) or ``tokenizer.json``/its directory
    (Hugging Face); ``vocab_file`` + ``merge_file`` are GPT-2's files. A directory written by
    ``Tokenizer.save`` is accepted as ``tokenizer_model`` for every type. ``special_tokens``
    are added after loading (see ``Tokenizer.add_special_tokens``).
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(
            f"unknown tokenizer type {tokenizer_type!r}; valid types: "
            f"{', '.join(TOKENIZER_TYPES)}"
        )
    cls = TOKENIZER_TYPES[tokenizer_type]
    if tokenizer_model and os.path.isfile(os.path.join(tokenizer_model, METADATA_FILE)):
        tokenizer = load_tokenizer(tokenizer_model)
        if not isinstance(tokenizer, cls):
            raise TokenizerError(
                f"--tokenizer-model {tokenizer_model!r} holds a {tokenizer.tokenizer_type}, "
                f"not a {tokenizer_type}"
            )
        tokenizer.add_special_tokens(special_tokens)
        return tokenizer
    if cls is SentencePieceTokenizer:
        path = _require_file("--tokenizer-model", tokenizer_model, tokenizer_type)
        return SentencePieceTokenizer(path, special_tokens)
    if cls is GPT2BPETokenizer:
        vocab = _require_file("--vocab-file", vocab_file, tokenizer_type)
        merges = _require_file("--merge-file", merge_file, tokenizer_type)
        return GPT2BPETokenizer(vocab, merges, special_tokens)
    path = _require_file("--tokenizer-model", tokenizer_model, tokenizer_type)
    return HuggingFaceTokenizer(path, special_tokens, eod_token)


def load_tokenizer(directory: str) -> Tokenizer:
    """Rebuild a tokenizer written by ``Tokenizer.save``."""
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise TokenizerError(f"{directory!r} holds no {METADATA_FILE} (not a saved tokenizer)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    kind = meta.get("tokenizer_type")
    files = {k: os.path.join(directory, v) for k, v in meta.get("files", {}).items()}
    specials = meta.get("special_tokens", [])
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        tok: Tokenizer = SentencePieceTokenizer(files["tokenizer_model"], specials)
    elif kind == "GPT2BPETokenizer":
        tok = GPT2BPETokenizer(files["vocab_file"], files["merge_file"], specials)
    elif kind == "HuggingFaceTokenizer":
        tok = HuggingFaceTokenizer(files["tokenizer_model"], specials, meta.get("eod_token"))
        for name, token in meta.get("named_tokens", {}).items():
            tok._named[name] = token
    else:
        raise TokenizerError(f"{meta_path!r} names an unknown tokenizer type {kind!r}")
    if meta.get("vocab_size") not in (None, tok.vocab_size):
        raise TokenizerError(
            f"{directory!r}: saved vocab_size {meta['vocab_size']} but rebuilt {tok.vocab_size}"
        )
    return tok
