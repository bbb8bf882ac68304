"""``SentencePieceTokenizer``: a SentencePiece ``.model`` behind the ``Tokenizer`` interface.

Text is encoded with the model as is (what Megatron-LM's current tokenizer does); the end of
document token is the model's EOS. Special tokens the model lacks are appended after its pieces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import ClassVar

from megatron_latent.data.tokenizer_base import (
    PUBLIC_MODULE,
    Tokenizer,
    _as_int_list,
    _copy_into,
    _load_failure,
)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model``); EOD is the model's EOS piece."""

    __module__ = PUBLIC_MODULE

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
