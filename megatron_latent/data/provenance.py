"""Which tokenizer made a dataset: the sidecar next to ``.bin/.idx`` and the check against a run.

``tools/preprocess_data.py`` writes ``{prefix}.tokenizer.json`` next to every dataset, in the
same atomic commit as the ``.bin/.idx`` (``tools/merge_datasets.py`` carries it over when all
inputs agree). It holds::

    {"format": "megatron-latent dataset tokenizer", "version": 1,
     "tokenizer_type": "SentencePieceTokenizer",
     "tokenizer_files": {"tokenizer_model": "/abs/path/tokenizer.model"},
     "vocab_size": 4096, "eod": 2, "vocab_sha256": "..."}

``vocab_sha256`` is the SHA-256 of the vocabulary itself: the UTF-8 bytes of the compact JSON
array whose element ``i`` is the text of token id ``i`` (``null`` for an id without one). It
does not depend on how the tokenizer is stored, so a copied or re-saved tokenizer matches and a
different one of the same size does not. A tokenizer is identified by its vocabulary size, its
end-of-document id and that hash; its type and file paths are kept for the messages only.

Datasets written by Megatron-LM have no sidecar. For those only the token dtype is checked
against the vocabulary size (``DType.optimal_dtype``: uint16 below 65500 tokens, int32 from
65500 on), which catches a vocabulary on the other side of that line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy

from megatron_latent.data.indexed import (
    DatasetPathError,
    optimal_token_dtype,
    read_index_header,
    sidecar_path,
)

SIDECAR_FORMAT = "megatron-latent dataset tokenizer"
SIDECAR_VERSION = 1
UINT16_VOCAB_LIMIT = 65500  # DType.optimal_dtype: uint16 below this many tokens, int32 from it


@dataclass(frozen=True)
class TokenizerFingerprint:
    """What identifies a tokenizer for a dataset: vocabulary size, EOD id, vocabulary hash."""

    tokenizer_type: str
    vocab_size: int
    eod: int | None
    vocab_sha256: str | None
    tokenizer_files: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The sidecar's JSON object."""
        return {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "tokenizer_type": self.tokenizer_type,
            "tokenizer_files": dict(self.tokenizer_files or {}),
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "vocab_sha256": self.vocab_sha256,
        }

    def describe(self) -> str:
        """One line for messages: type, size, EOD id and files."""
        text = f"{self.tokenizer_type} with {self.vocab_size} tokens, eod {self.eod}"
        if self.tokenizer_files:
            files = ", ".join(f"{k}={v}" for k, v in sorted(self.tokenizer_files.items()))
            text += f", from {files}"
        return text

    def differences(self, other: TokenizerFingerprint) -> list[str]:
        """What differs between two tokenizers (empty when they are the same for the data)."""
        out = []
        if self.vocab_size != other.vocab_size:
            out.append(f"vocabulary sizes differ ({self.vocab_size} vs {other.vocab_size})")
        elif (self.vocab_sha256 and other.vocab_sha256
              and self.vocab_sha256 != other.vocab_sha256):
            out.append(
                f"the vocabularies differ (sha256 {self.vocab_sha256[:12]}... vs "
                f"{other.vocab_sha256[:12]}...)"
            )
        if self.eod != other.eod:
            out.append(f"end-of-document ids differ ({self.eod} vs {other.eod})")
        return out


def vocabulary_sha256(vocab: Mapping[str, int], vocab_size: int) -> str:
    """SHA-256 of the token texts in id order (see the module docstring)."""
    size = max([vocab_size, *(i + 1 for i in vocab.values())])
    texts: list[str | None] = [None] * size
    for text, i in vocab.items():
        texts[i] = text
    encoded = json.dumps(texts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _eod_or_none(tokenizer: Any) -> int | None:
    try:
        eod = int(tokenizer.eod)
    except (AttributeError, NotImplementedError, ValueError, TypeError):
        return None
    return eod if eod >= 0 else None


def tokenizer_fingerprint(tokenizer: Any) -> TokenizerFingerprint:
    """The fingerprint of a tokenizer of ``megatron_latent.data.tokenizers`` (or any tokenizer
    with ``vocab_size``; without a ``vocab`` mapping the vocabulary hash is None)."""
    vocab_size = int(tokenizer.vocab_size)
    try:
        vocab = tokenizer.vocab
    except (AttributeError, NotImplementedError):
        vocab = None
    files = getattr(tokenizer, "files", None)
    return TokenizerFingerprint(
        tokenizer_type=getattr(tokenizer, "tokenizer_type", "") or type(tokenizer).__name__,
        vocab_size=vocab_size,
        eod=_eod_or_none(tokenizer),
        vocab_sha256=vocabulary_sha256(vocab, vocab_size) if vocab else None,
        tokenizer_files={k: os.path.abspath(v) for k, v in files.items()} if files else None,
    )


def read_dataset_tokenizer(prefix: str) -> TokenizerFingerprint | None:
    """The fingerprint in ``prefix``'s sidecar, or None when it has none (Megatron-LM data).

    Raises DatasetPathError naming the sidecar when it exists but cannot be used.
    """
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        return None
    problem = None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        data, problem = None, str(err)
    if problem is None:
        problem = _sidecar_problem(data)
    if problem is not None:
        raise DatasetPathError(
            f"data path {prefix!r}: cannot use the tokenizer sidecar {path!r}: {problem} "
            "(regenerate the dataset, or delete the file to skip the tokenizer check)"
        )
    return TokenizerFingerprint(
        tokenizer_type=data["tokenizer_type"],
        vocab_size=data["vocab_size"],
        eod=data["eod"],
        vocab_sha256=data["vocab_sha256"],
        tokenizer_files=data.get("tokenizer_files") or None,
    )


def _sidecar_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        return f"not a {SIDECAR_FORMAT!r} file"
    if data.get("version") != SIDECAR_VERSION:
        return f"unsupported version {data.get('version')!r}"
    checks = {
        "tokenizer_type": lambda v: isinstance(v, str),
        "vocab_size": lambda v: isinstance(v, int) and v > 0,
        "eod": lambda v: v is None or (isinstance(v, int) and v >= 0),
        "vocab_sha256": lambda v: v is None or isinstance(v, str),
        "tokenizer_files": lambda v: v is None or isinstance(v, dict),
    }
    for key, valid in checks.items():
        if not valid(data.get(key)):
            return f"bad or missing {key!r}: {data.get(key)!r}"
    return None


def _dtype_name(dtype: Any) -> str:
    return numpy.dtype(dtype).name


def check_datasets_tokenizer(prefixes: Sequence[str], tokenizer: Any) -> None:
    """Refuse datasets that were not made with ``tokenizer``; raises DatasetPathError.

    A dataset with a sidecar must match the tokenizer's vocabulary size, EOD id and vocabulary
    hash. Every dataset's token dtype must be the one Megatron's preprocessing picks for the
    tokenizer's vocabulary size. Reads each ``.idx`` header and sidecar only.
    """
    run: TokenizerFingerprint | None = None
    expected = optimal_token_dtype(int(tokenizer.vocab_size))
    for prefix in prefixes:
        header = read_index_header(prefix)
        made_with = read_dataset_tokenizer(prefix)
        if made_with is not None:
            run = run or tokenizer_fingerprint(tokenizer)
            differences = made_with.differences(run)
            if differences:
                raise DatasetPathError(
                    f"data path {prefix!r} was made with {made_with.describe()} (per "
                    f"{sidecar_path(prefix)!r}), but this run's tokenizer is {run.describe()}: "
                    f"{'; '.join(differences)}. Train with the tokenizer that made the data, or "
                    "preprocess the data again with this one"
                )
        if header.dtype != expected:
            stored = _dtype_name(header.dtype)
            if stored == "uint16":
                made = f"a vocabulary of fewer than {UINT16_VOCAB_LIMIT} tokens"
            elif stored == "int32":
                made = f"a vocabulary of {UINT16_VOCAB_LIMIT} tokens or more"
            else:
                made = "a tool other than Megatron's preprocessing"
            raise DatasetPathError(
                f"data path {prefix!r} stores tokens as {stored}, but this run's tokenizer has "
                f"{tokenizer.vocab_size} tokens, which Megatron's preprocessing stores as "
                f"{_dtype_name(expected)} (uint16 below {UINT16_VOCAB_LIMIT} tokens, int32 "
                f"from {UINT16_VOCAB_LIMIT} on): the dataset was made with {made}, so not "
                "with this tokenizer. Train with the tokenizer that made the data, or "
                "preprocess the data again with this one"
            )


def merged_tokenizer(prefixes: Sequence[str]) -> tuple[TokenizerFingerprint | None, str]:
    """The tokenizer a merge of ``prefixes`` was made with, and a note saying how it was found.

    All inputs with sidecars must agree (else DatasetPathError listing them); the result is
    None unless every input has one.
    """
    found = [(prefix, read_dataset_tokenizer(prefix)) for prefix in prefixes]
    known = [(prefix, fp) for prefix, fp in found if fp is not None]
    if any(fp.differences(known[0][1]) for _, fp in known[1:]):
        listing = "; ".join(f"{p}: {f.describe()}" for p, f in known)
        raise DatasetPathError(
            f"the datasets were made with different tokenizers ({listing}); merge only "
            "datasets made with one tokenizer"
        )
    missing = [prefix for prefix, fp in found if fp is None]
    if not known:
        return None, "no input has a tokenizer sidecar, so the output has none"
    if missing:
        return None, (
            f"{len(missing)} of {len(found)} inputs have no tokenizer sidecar (first: "
            f"{missing[0]}), so the output has none"
        )
    return known[0][1], f"tokenizer: {known[0][1].describe()}"
