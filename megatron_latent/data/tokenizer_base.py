"""What every tokenizer shares: the ``Tokenizer`` interface, ``TokenizerError`` and file helpers.

``Tokenizer`` subclasses megatron-core's ``MegatronTokenizerBase`` and holds the special-token
bookkeeping, the named ids (``eod``, ``bos``, ``pad``, ``unk``), megatron-core compatibility
(``unique_identifiers``) and ``save``. The tokenizer kinds subclass it in
``tokenizer_sentencepiece``, ``tokenizer_huggingface`` and ``tokenizer_gpt2``; import them all
from ``megatron_latent.data.tokenizers``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, ClassVar

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_latent.config import ConfigError

PUBLIC_MODULE = "megatron_latent.data.tokenizers"
"""The module the tokenizer classes are imported from. They take it as their ``__module__``, so
the class that ``unique_identifiers`` names (and with it megatron-core's dataset cache) is the
same whichever module defines them."""

METADATA_FILE = "megatron_latent_tokenizer.json"
"""Written by ``Tokenizer.save``: which tokenizer, its files and its added special tokens."""


class TokenizerError(ConfigError):
    """A tokenizer that cannot be built or used as asked (bad type, missing file, no EOD)."""

    __module__ = PUBLIC_MODULE


def _load_failure(flag: str, path: str, expected: str, err: Exception) -> TokenizerError:
    """One-line error: ``flag``'s ``path`` is not the ``expected`` file, and the reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        head = b""
    if expected.startswith("a SentencePiece") and head.startswith((b"{", b"[")):
        expected += "; it holds JSON (a tokenizer.json needs --tokenizer-type HuggingFaceTokenizer)"
    reason = " ".join(str(err).split())
    return TokenizerError(f"{flag} {path!r} is not {expected} ({reason})")


class Tokenizer(MegatronTokenizerBase):
    """The interface every tokenizer of this project implements.

    Subclasses implement the encoding/decoding and the vocabulary; this class holds the
    special-token bookkeeping, megatron-core compatibility and save/load.
    """

    __module__ = PUBLIC_MODULE

    tokenizer_type: ClassVar[str] = ""

    def __init__(self, path: str) -> None:
        super().__init__(path, {})
        self._added_special: list[str] = []  # every add_special_tokens call, in order

    # -- encoding ------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS inserted)."""
        raise NotImplementedError

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and each token's ``(start, end)`` character span in it.

        The ids are exactly ``tokenize(text)``. Spans may be empty for tokens that stand for
        part of a character (byte fallback), and a token's span may start with whitespace that
        the token absorbs (e.g. SentencePiece's ``▁word``).
        """
        raise NotImplementedError

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are written out as their text."""
        raise NotImplementedError

    # -- vocabulary -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included (ids are ``0 .. vocab_size-1``)."""
        raise NotImplementedError

    @property
    def vocab(self) -> dict[str, int]:
        """Token text -> id."""
        raise NotImplementedError

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token text."""
        return {i: t for t, i in self.vocab.items()}

    def token_to_id(self, token: str) -> int | None:
        """The id of one token (as written in the vocabulary), or None."""
        return self.vocab.get(token)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id (control tokens and every added special token)."""
        raise NotImplementedError

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Register special tokens; returns their ids.

        A token already in the vocabulary keeps its id; others are appended in order at the
        end of the vocabulary (``vocab_size`` grows). Special tokens are never split when
        encoding. Adding the same token twice is harmless.
        """
        tokens = list(tokens)
        for token in tokens:
            if not isinstance(token, str) or not token:
                raise TokenizerError(f"special tokens must be non-empty strings, got {token!r}")
        ids = self._add_special(tokens)
        for token in tokens:
            if token not in self._added_special:
                self._added_special.append(token)
        return ids

    def _add_special(self, tokens: list[str]) -> list[int]:
        raise NotImplementedError

    # -- named ids --------------------------------------------------------------------------
    @property
    def eod(self) -> int:
        """End-of-document id, appended by ``--append-eod`` and used by GPTDataset."""
        eod = self._eod_id()
        if eod < 0:
            raise TokenizerError(
                f"{self.tokenizer_type} from {self.path!r} has no end-of-document token; "
                f"{self._eod_hint()}"
            )
        return eod

    @property
    def eos(self) -> int:
        return self._eod_id()

    @property
    def bos(self) -> int:
        return self._named_id("bos")

    @property
    def pad(self) -> int:
        return self._named_id("pad")

    @property
    def unk(self) -> int:
        return self._named_id("unk")

    @property
    def eod_id(self) -> int:
        return self.eod

    @property
    def eos_id(self) -> int:
        return self.eos

    @property
    def bos_id(self) -> int:
        return self.bos

    @property
    def pad_id(self) -> int:
        return self.pad

    @property
    def unk_id(self) -> int:
        return self.unk

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        """Defined named ids, in the shape megatron-core checks pad collisions against."""
        named = {
            "bos_token": self.bos,
            "eos_token": self.eos,
            "pad_token": self.pad,
            "unk_token": self.unk,
        }
        return {k: v for k, v in named.items() if v >= 0}

    def _eod_id(self) -> int:
        raise NotImplementedError

    def _named_id(self, name: str) -> int:
        raise NotImplementedError

    def _eod_hint(self) -> str:
        return "train the tokenizer with an EOS token"

    # -- megatron-core compatibility ----------------------------------------------------------
    @property
    def files(self) -> dict[str, str]:
        """Role -> path of the files this tokenizer was read from."""
        raise NotImplementedError

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What identifies this tokenizer in megatron-core's dataset cache descriptions."""
        ids: OrderedDict[str, Any] = OrderedDict()
        ids["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ids["tokenizer_path"] = [self.files[k] for k in sorted(self.files)]
        ids["special_tokens"] = list(self._added_special)
        return ids

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Write the tokenizer files and its added special tokens to ``directory``.

        ``load_tokenizer(directory)`` (or ``build_tokenizer(type, tokenizer_model=directory)``)
        rebuilds an identical tokenizer, added special tokens and their ids included.
        """
        os.makedirs(directory, exist_ok=True)
        files = self._save_files(directory)
        metadata = {
            "format": 1,
            "tokenizer_type": self.tokenizer_type,
            "files": files,
            "special_tokens": list(self._added_special),
            "vocab_size": self.vocab_size,
        }
        metadata.update(self._save_options())
        with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
        return directory

    def _save_files(self, directory: str) -> dict[str, str]:
        raise NotImplementedError

    def _save_options(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, files={self.files})"


def _as_int_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _copy_into(src: str, directory: str, name: str) -> str:
    dst = os.path.join(directory, name)
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copyfile(src, dst)
    return name
