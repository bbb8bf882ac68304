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
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_latent.config import ConfigError
from megatron_latent.data.tokenizer_args import RESERVED_SPECIAL_TOKENS, TOKENIZER_TYPE_NAMES

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

METADATA_FILE = "megatron_latent_tokenizer.json"
"""Written by ``Tokenizer.save``: which tokenizer, its files and its added special tokens."""

GPT2_EOD_TOKEN = "<|endoftext|>"

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
_PAD_CANDIDATES = ("<pad>", "<|padding|>", "[PAD]")
_UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")


class TokenizerError(ConfigError):
    """A tokenizer that cannot be built or used as asked (bad type, missing file, no EOD)."""


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


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model``); EOD is the model's EOS piece."""

    tokenizer_type: ClassVar[str] = "SentencePieceTokenizer"

    def __init__(self, model_file: str, special_tokens: Sequence[str] = ()) -> None:
        import sentencepiece

        super().__init__(model_file)
        self._model_file = model_file
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as err:
            raise _load_failure(
                "--tokenizer-model", model_file,
                "a SentencePiece model (the binary .model file SentencePiece training writes)",
                err) from None
        self._base_size = self._sp.get_piece_size()
        self._special: dict[str, int] = {}
        self._extra: list[str] = []  # appended after the model's pieces
        self._extra_pattern: re.Pattern[str] | None = None
        for i in range(self._base_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                self._special[self._sp.id_to_piece(i)] = i
        for i in self._user_defined_ids():
            self._special[self._sp.id_to_piece(i)] = i
        self.add_special_tokens(special_tokens)

    def _user_defined_ids(self) -> list[int]:
        try:
            from sentencepiece import sentencepiece_model_pb2
        except ImportError:  # protobuf missing: user-defined pieces are then not listed
            return []
        proto = sentencepiece_model_pb2.ModelProto()
        with open(self._model_file, "rb") as f:
            proto.ParseFromString(f.read())
        user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        return [i for i, p in enumerate(proto.pieces) if p.type == user_defined]

    # encoding
    def _segments(self, text: str) -> Iterable[tuple[int, int, int | None]]:
        """(start, end, special id or None) pieces of ``text`` split at appended tokens."""
        if self._extra_pattern is None:
            yield 0, len(text), None
            return
        pos = 0
        for m in self._extra_pattern.finditer(text):
            if m.start() > pos:
                yield pos, m.start(), None
            yield m.start(), m.end(), self._special[m.group(0)]
            pos = m.end()
        if pos < len(text):
            yield pos, len(text), None

    def tokenize(self, text: str) -> list[int]:
        if self._extra_pattern is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for start, end, special in self._segments(text):
            if special is None:
                ids.extend(self._sp.encode(text[start:end]))
            else:
                ids.append(special)
        return ids

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for start, end, special in self._segments(text):
            if special is not None:
                ids.append(special)
                spans.append((start, end))
                continue
            mapping = self._sp.encode_as_offset_mapping(text[start:end])
            ids.extend(mapping["ids"])
            spans.extend((start + a, start + b) for a, b in mapping["offsets"])
        return ids, spans

    def detokenize(self, ids: Iterable[int]) -> str:
        ids = _as_int_list(ids)
        if not self._extra:
            return self._sp.decode(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i >= self._base_size:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._extra[i - self._base_size])
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    # vocabulary
    @property
    def vocab_size(self) -> int:
        return self._base_size + len(self._extra)

    @property
    def vocab(self) -> dict[str, int]:
        out = {self._sp.id_to_piece(i): i for i in range(self._base_size)}
        out.update({t: self._base_size + k for k, t in enumerate(self._extra)})
        return out

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        i = self._sp.piece_to_id(token)
        if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
            return None
        return i

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def _add_special(self, tokens: list[str]) -> list[int]:
        ids = []
        for token in tokens:
            if token not in self._special:
                existing = self.token_to_id(token)
                if existing is None:
                    existing = self.vocab_size
                    self._extra.append(token)
                self._special[token] = existing
            ids.append(self._special[token])
        if self._extra:
            alternatives = sorted(self._extra, key=len, reverse=True)
            self._extra_pattern = re.compile("|".join(re.escape(t) for t in alternatives))
        return ids

    # named ids
    def _eod_id(self) -> int:
        return self._sp.eos_id()

    def _named_id(self, name: str) -> int:
        return {"bos": self._sp.bos_id, "pad": self._sp.pad_id, "unk": self._sp.unk_id}[name]()

    def _eod_hint(self) -> str:
        return "train it with an EOS piece (eos_id >= 0; tools/train_tokenizer.py does)"

    # persistence
    @property
    def files(self) -> dict[str, str]:
        return {"tokenizer_model": self._model_file}

    def _save_files(self, directory: str) -> dict[str, str]:
        return {"tokenizer_model": _copy_into(self._model_file, directory, "tokenizer.model")}


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library.

    The named tokens (EOS/EOD, BOS, PAD, UNK) come from ``tokenizer_config.json`` next to the
    file when there is one, else from common names (``<|endoftext|>``, ``</s>``, ...).
    ``eod_token`` overrides the end-of-document token.
    """

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


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; EOD is ``<|endoftext|>``."""

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


TOKENIZER_TYPES: dict[str, type[Tokenizer]] = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": SentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "GPT2BPETokenizer": GPT2BPETokenizer,
}
"""``--tokenizer-type`` values (Megatron-LM's names) -> class."""
assert tuple(TOKENIZER_TYPES) == TOKENIZER_TYPE_NAMES


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
