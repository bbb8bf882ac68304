"""``HuggingFaceTokenizer``: a Hugging Face ``tokenizer.json`` behind the ``Tokenizer`` interface.

Read with the ``tokenizers`` library (no ``transformers`` needed); no BOS/EOS is inserted when
encoding. The named tokens come from ``tokenizer_config.json`` next to the file, else from common
names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from megatron_latent.data.tokenizer_base import (
    PUBLIC_MODULE,
    Tokenizer,
    TokenizerError,
    _as_int_list,
    _load_failure,
)

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|padding|>", "[PAD]")
_UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library.

    The named tokens (EOS/EOD, BOS, PAD, UNK) come from ``tokenizer_config.json`` next to the
    file when there is one, else from common names (``<|endoftext|>``, ``</s>``, ...).
    ``eod_token`` overrides the end-of-document token.
    """

    __module__ = PUBLIC_MODULE

    tokenizer_type: ClassVar[str] = "HuggingFaceTokenizer"

    def __init__(
        self,
        tokenizer_file: str,
        special_tokens: Sequence[str] = (),
        eod_token: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if os.path.isdir(tokenizer_file):
            tokenizer_file = os.path.join(tokenizer_file, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise TokenizerError(f"--tokenizer-model: {tokenizer_file!r} does not exist")
        try:
            tok = RustTokenizer.from_file(tokenizer_file)
        except Exception as err:
            raise _load_failure(
                "--tokenizer-model", tokenizer_file,
                "a Hugging Face tokenizer.json (the JSON file the tokenizers library saves)",
                err) from None
        config = _read_tokenizer_config(os.path.dirname(tokenizer_file))
        self._init_from(tokenizer_file, tok, config, special_tokens, eod_token)

    def _init_from(
        self,
        path: str,
        tok: Any,
        config: dict[str, Any],
        special_tokens: Sequence[str],
        eod_token: str | None,
    ) -> None:
        Tokenizer.__init__(self, path)
        self._tok = tok
        self._named: dict[str, str | None] = {}
        vocab = tok.get_vocab(with_added_tokens=True)
        for name, candidates in (
            ("eos", _EOS_CANDIDATES),
            ("bos", _BOS_CANDIDATES),
            ("pad", _PAD_CANDIDATES),
            ("unk", _UNK_CANDIDATES),
        ):
            chosen = _config_token(config, f"{name}_token")
            if chosen is None:
                chosen = next((c for c in candidates if c in vocab), None)
            self._named[name] = chosen if chosen in vocab else None
        if eod_token is not None:
            if eod_token not in vocab:
                raise TokenizerError(f"end-of-document token {eod_token!r} is not in {path!r}")
            self._named["eos"] = eod_token
        self.add_special_tokens(special_tokens)

    @property
    def backend(self) -> Any:
        """The ``tokenizers.Tokenizer`` that encodes (added special tokens included)."""
        return self._tok

    # encoding
    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)

    # vocabulary
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def special_tokens(self) -> dict[str, int]:
        added = self._tok.get_added_tokens_decoder()
        return {t.content: i for i, t in sorted(added.items()) if t.special}

    def _add_special(self, tokens: list[str]) -> list[int]:
        from tokenizers import AddedToken

        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self._tok.token_to_id(t) for t in tokens]

    # named ids
    def _eod_id(self) -> int:
        return self._named_id("eos")

    def _named_id(self, name: str) -> int:
        token = self._named.get(name)
        if token is None:
            return -1
        i = self._tok.token_to_id(token)
        return -1 if i is None else i

    def _eod_hint(self) -> str:
        return "name it with eod_token / --eod-token or an eos_token in tokenizer_config.json"

    # persistence
    @property
    def files(self) -> dict[str, str]:
        return {"tokenizer_model": self.path}

    def _save_files(self, directory: str) -> dict[str, str]:
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        return {"tokenizer_model": "tokenizer.json"}

    def _save_options(self) -> dict[str, Any]:
        return {"eod_token": self._named.get("eos"), "named_tokens": dict(self._named)}


def _read_tokenizer_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerError(f"cannot read {path!r}: {err}") from None
    return data if isinstance(data, dict) else {}


def _config_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
