"""A project tokenizer as Hugging Face tokenizer files that ``transformers.AutoTokenizer`` loads.

``export_hf_tokenizer`` writes ``tokenizer.json`` (read verbatim: ``tokenizer_config.json``
names ``PreTrainedTokenizerFast``), ``tokenizer_config.json`` and ``special_tokens_map.json``
with the tokenizer's real BOS/EOS/UNK/PAD, and no BOS/EOS inserted when encoding, so the folder
encodes text to the ids the project's tokenizer gives:

* ``SentencePieceTokenizer``: the ``.model`` is rebuilt with the ``tokenizers`` library
  (``sentencepiece_to_tokenizers``): same pieces and ids, the model's normalization (precompiled
  character map, whitespace removal, dummy prefix, ``▁`` for spaces), BPE merges ranked by piece
  score (or the unigram scores), byte fallback, user-defined pieces kept whole, and decoding
  that drops the dummy prefix. The ``.model`` is copied too.
* ``HuggingFaceTokenizer``: its ``tokenizer.json`` (added tokens included) without the
  post-processor, since pretraining text is encoded without BOS/EOS.
* ``GPT2BPETokenizer``: ``vocab.json`` + ``merges.txt`` and the equivalent ``tokenizer.json``.

Known differences, all on text that spells out the tokenizer's own markup: a named special
token written in the text (``</s>``) is encoded by transformers as that token, where
SentencePiece spells it out in pieces; after a SentencePiece user-defined piece (``<sent>``),
text that is exactly one vocabulary piece is given that piece directly; and a unigram model may
match a byte piece's name (``<0x41>``) written in the text when some of its characters are
outside the vocabulary. With a non-identity normalization, ``tokenizers``' precompiled
character map also differs from SentencePiece's on a few rare grapheme clusters (a combining
mark after a space that the map rewrites).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from megatron_latent.data.tokenizers import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
)

__all__ = ["NAMED_TOKENS", "export_hf_tokenizer", "sentencepiece_to_tokenizers"]

NAMED_TOKENS: tuple[str, ...] = ("bos", "eos", "unk", "pad")
"""The named special tokens written to ``tokenizer_config.json`` (as ``<name>_token``)."""

_SPACE = "\u2581"  # SentencePiece's visible space "▁"
# ModelProto.SentencePiece.Type and TrainerSpec.ModelType values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_UNREACHABLE_SCORE = -1e9  # unigram pieces SentencePiece never matches in text


def _read_model_proto(model_file: str) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(model_file, "rb") as handle:
            proto.ParseFromString(handle.read())
    except Exception as err:  # protobuf's DecodeError, OSError
        raise TokenizerError(f"{model_file!r} is not a SentencePiece model: {err}") from None
    return proto


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Every pair of mergeable pieces whose concatenation is a piece, best score first.

    SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring piece; ranking the pairs by that score makes ``tokenizers``' BPE do the same.
    """
    mergeable = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for piece, index in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-pieces[index][1], index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_to_tokenizers(model_file: str) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes text as the SentencePiece ``model_file`` does.

    Ids are the model's piece ids; control pieces (``<s>``, ``</s>``, ...) and the unknown piece
    are special added tokens. Raises TokenizerError for options it cannot reproduce (whitespace
    as suffix, denormalization rules, word/char models).
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    proto = _read_model_proto(model_file)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    if trainer.treat_whitespace_as_suffix:
        raise TokenizerError(f"{model_file!r}: treat_whitespace_as_suffix cannot be exported")
    if proto.denormalizer_spec.precompiled_charsmap:
        raise TokenizerError(f"{model_file!r}: denormalization rules cannot be exported")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unknown = [i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN]
    if not unknown:
        raise TokenizerError(f"{model_file!r} has no unknown piece")
    if trainer.model_type == _BPE:
        model = models.BPE(
            vocab={piece: i for i, (piece, _, _) in enumerate(pieces)},
            merges=_bpe_merges(pieces),
            unk_token=pieces[unknown[0]][0],
            byte_fallback=trainer.byte_fallback,
            fuse_unk=True,
            # A user-defined piece is split off whole below; this emits it as one token.
            ignore_merges=any(kind == _USER_DEFINED for _, _, kind in pieces),
        )
    elif trainer.model_type == _UNIGRAM:
        scored = [(piece, score if kind in (_NORMAL, _USER_DEFINED) else _UNREACHABLE_SCORE)
                  for piece, score, kind in pieces]
        model = models.Unigram(scored, unk_id=unknown[0], byte_fallback=trainer.byte_fallback)
    else:
        raise TokenizerError(
            f"{model_file!r}: only BPE and unigram SentencePiece models can be exported"
        )
    tok = RustTokenizer(model)

    steps: list[Any] = []
    if spec.precompiled_charsmap:
        charsmap = normalizers.Precompiled(spec.precompiled_charsmap)
        # tokenizers maps a grapheme as a whole, SentencePiece "\r\n" as "\r" then "\n".
        crlf = charsmap.normalize_str("\r") + charsmap.normalize_str("\n")
        if charsmap.normalize_str(crlf) == crlf:
            steps.append(normalizers.Replace("\r\n", crlf))
        steps.append(charsmap)
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)

    user_defined = sorted((p for p, _, kind in pieces if kind == _USER_DEFINED),
                          key=len, reverse=True)
    if user_defined:
        if spec.escape_whitespaces:
            user_defined = [p.replace(" ", _SPACE) for p in user_defined]
        pattern = "|".join(re.escape(p) for p in user_defined)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)])
    decode: list[Any] = []
    if spec.escape_whitespaces:
        decode.append(decoders.Replace(_SPACE, " "))
    decode += [decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    return tok


def _backend_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json text for ``tokenizer``: no post-processor, appended tokens included."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        model_file = tokenizer.files["tokenizer_model"]
        tok = sentencepiece_to_tokenizers(model_file)
        base = tok.get_vocab_size(with_added_tokens=True)
        appended = sorted((i, t) for t, i in tokenizer.special_tokens.items() if i >= base)
        if appended:
            from tokenizers import AddedToken

            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for _, t in appended])
        data = json.loads(tok.to_str())
    elif isinstance(tokenizer, HuggingFaceTokenizer):
        data = json.loads(tokenizer.backend.to_str())
    else:
        raise TokenizerError(f"cannot export a {type(tokenizer).__name__} for Hugging Face")
    data["post_processor"] = None
    return json.dumps(data, ensure_ascii=False, indent=2)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def export_hf_tokenizer(
    tokenizer: Tokenizer, directory: str, model_max_length: int | None = None
) -> dict[str, int | None]:
    """Write ``tokenizer`` to ``directory`` for ``AutoTokenizer.from_pretrained(directory)``.

    Returns the ``{bos,eos,unk,pad}_token_id`` ids (None where the tokenizer has none); EOS is
    the end-of-document id. Also writes the project's own files (``Tokenizer.save``: the
    ``.model``, or ``vocab.json`` + ``merges.txt``), so ``--tokenizer-model <directory>``
    rebuilds the same tokenizer.
    """
    os.makedirs(directory, exist_ok=True)
    inverse = tokenizer.inv_vocab
    ids: dict[str, int | None] = {}
    for name in NAMED_TOKENS:
        value = tokenizer.eod if name == "eos" else getattr(tokenizer, name)
        ids[f"{name}_token_id"] = value if value is not None and value >= 0 else None
    named = {f"{name}_token": inverse[ids[f"{name}_token_id"]]
             for name in NAMED_TOKENS if ids[f"{name}_token_id"] is not None}

    tokenizer.save(directory)
    _write_text(os.path.join(directory, "tokenizer.json"), _backend_json(tokenizer))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    _write_text(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2))
    _write_text(os.path.join(directory, "special_tokens_map.json"), json.dumps(named, indent=2))
    return ids
