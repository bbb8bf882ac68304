"""``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``.

Built on ``HuggingFaceTokenizer`` (the ``tokenizers`` library's BPE); the end of document token
is ``<|endoftext|>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

from megatron_latent.data.tokenizer_base import (
    PUBLIC_MODULE,
    TokenizerError,
    _copy_into,
    _load_failure,
)
from megatron_latent.data.tokenizer_huggingface import HuggingFaceTokenizer

GPT2_EOD_TOKEN = "<|endoftext|>"


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; EOD is ``<|endoftext|>``."""

    __module__ = PUBLIC_MODULE

    tokenizer_type: ClassVar[str] = "GPT2BPETokenizer"

    def __init__(
        self, vocab_file: str, merge_file: str, special_tokens: Sequence[str] = ()
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            with open(vocab_file, encoding="utf-8") as f:
                if not isinstance(json.load(f), dict):
                    raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise _load_failure("--vocab-file", vocab_file,
                                "a GPT-2 vocab.json (a JSON object token -> id)", err) from None
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as err:
            raise _load_failure(
                "--merge-file", merge_file, f"a GPT-2 merges.txt for {vocab_file!r} (one "
                "'left right' pair of vocabulary tokens per line)", err) from None
        tok = RustTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        self._vocab_file = vocab_file
        self._merge_file = merge_file
        if tok.token_to_id(GPT2_EOD_TOKEN) is None:
            raise TokenizerError(f"GPT-2 vocabulary {vocab_file!r} has no {GPT2_EOD_TOKEN!r}")
        config = {"eos_token": GPT2_EOD_TOKEN, "bos_token": GPT2_EOD_TOKEN}
        self._init_from(vocab_file, tok, config, [GPT2_EOD_TOKEN, *special_tokens], None)
        self._added_special.remove(GPT2_EOD_TOKEN)

    @property
    def files(self) -> dict[str, str]:
        return {"vocab_file": self._vocab_file, "merge_file": self._merge_file}

    def _save_files(self, directory: str) -> dict[str, str]:
        return {
            "vocab_file": _copy_into(self._vocab_file, directory, "vocab.json"),
            "merge_file": _copy_into(self._merge_file, directory, "merges.txt"),
        }

    def _save_options(self) -> dict[str, Any]:
        return {}
