"""Chunking a document for latent thoughts (BoLT; ../shared/methods/latent_thoughts.md).

The rule is the BoLT code's (``apps/main/gen_utils/chunk_gen.py``), decision 1 of the notes:

- **Units**: paragraphs (split at blank lines), then sentences inside each paragraph, found
  with the project's pysbd splitter (``megatron_latent.data.sentences``: rule-based, no
  download; a single line break reads as a space, a blank line ends a sentence). The
  whitespace between two units stays with the *next* unit (the text's leading whitespace with
  the first, its trailing whitespace with the last): units are cut where the whitespace before
  a paragraph or sentence begins, so ``"".join(split_units(text)) == text`` exactly.
  (The code keeps a paragraph's closing blank line with that paragraph and drops a text's
  leading newlines; here nothing is dropped and inter-unit whitespace always goes forward.)
- **Chunk lengths**: drawn per document from ``document_rng(text)``, numpy
  ``default_rng((int(md5(text), 16) + 42) & 0xFFFFFFFF)``; each chunk takes
  ``1 + Poisson(7)`` units, capped at 20 and at what remains. The draw depends on the text
  only, so the chunks are the same for the teacher and every EM iteration, in any process, in
  any order and for any number of workers or shards.
- **Uniform chunks** (the validation ELBO): ``ceil(units / 8)`` chunks with boundaries
  ``numpy.linspace(0, units, chunks + 1).astype(int)``; the prefix is the whole preceding
  document.
- **Prefixes** of chunk ``i``: the teacher sees the previous chunk's text, the literal
  ``"N/A"`` for ``i = 0``; the E-step sees the raw previous 3 chunks (no latents), nothing for
  ``i = 0``.

Each chunk's text is tokenised once, without BOS/EOS (``tokenize_chunks``); prefixes and the
chunks x are concatenations of those ids, and from then on everything is ids.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import numpy

#: Chunk-length rule (the code's defaults): 1 + Poisson(MEAN_UNITS - MIN_UNITS) units, at most
#: MAX_UNITS; the seed offset added to the text's md5.
CHUNK_SEED = 42
MEAN_UNITS_PER_CHUNK = 8
MIN_UNITS_PER_CHUNK = 1
MAX_UNITS_PER_CHUNK = 20
#: The teacher's prefix for the first chunk, and how many raw chunks the E-step's prefix holds.
TEACHER_FIRST_PREFIX = "N/A"
ESTEP_PREFIX_CHUNKS = 3

_BLANK_LINE = re.compile(r"\n\s*\n")


@cache
def _splitter(language: str) -> Any:
    from megatron_latent.data.sentences import SentenceSplitter

    return SentenceSplitter(language, split_on_newlines=False)


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every paragraph: from its first non-whitespace character to the
    blank line (or text end) that closes it. Whitespace-only stretches are no paragraph."""
    spans = []
    position = 0
    for piece_end, next_start in [(m.start(), m.end()) for m in _BLANK_LINE.finditer(text)] + [
        (len(text), len(text))
    ]:
        piece = text[position:piece_end]
        stripped = piece.lstrip()
        if stripped.strip():
            spans.append((position + len(piece) - len(stripped), piece_end))
        position = next_start
    return spans


def unit_starts(text: str, language: str = "en") -> list[int]:
    """Character offsets where the units of ``text`` after the first begin: where the
    whitespace before each later paragraph or sentence starts (so it goes with that unit)."""
    anchors: list[int] = []  # first non-whitespace character of every paragraph and sentence
    for begin, end in _paragraph_spans(text):
        anchors.append(begin)
        anchors.extend(begin + s for s in _splitter(language).sentence_starts(text[begin:end]))
    cuts: list[int] = []
    for anchor in anchors[1:]:
        cut = anchor
        while cut > 0 and text[cut - 1].isspace():
            cut -= 1
        if cut > (cuts[-1] if cuts else 0):
            cuts.append(cut)
    return cuts


def split_units(text: str, language: str = "en") -> list[str]:
    """Paragraphs, then sentences; ``"".join(split_units(text)) == text``.

    An empty text has no units; a text of whitespace only is one unit.
    """
    if not text:
        return []
    cuts = [0, *unit_starts(text, language), len(text)]
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def document_rng(text: str, chunk_seed: int = CHUNK_SEED) -> numpy.random.Generator:
    """The document's chunking rng: ``default_rng((int(md5(text), 16) + 42) & 0xFFFFFFFF)``."""
    digest = int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)
    return numpy.random.default_rng((digest + chunk_seed) & 0xFFFFFFFF)


def chunk_lengths(num_units: int, rng: numpy.random.Generator) -> list[int]:
    """Units per chunk: ``1 + Poisson(7)``, capped at 20 and at what remains (sums to
    ``num_units``)."""
    lengths = []
    remaining = num_units
    while remaining > 0:
        length = int(rng.poisson(MEAN_UNITS_PER_CHUNK - MIN_UNITS_PER_CHUNK)) + MIN_UNITS_PER_CHUNK
        length = min(length, MAX_UNITS_PER_CHUNK, remaining)
        lengths.append(length)
        remaining -= length
    return lengths


def _join(units: Sequence[str], lengths: Iterable[int]) -> list[str]:
    chunks, position = [], 0
    for length in lengths:
        chunks.append("".join(units[position:position + length]))
        position += length
    return chunks


def chunk_document(text: str, language: str = "en") -> list[str]:
    """The document's chunks (random lengths from ``document_rng(text)``);
    ``"".join(chunks) == text``."""
    units = split_units(text, language)
    return _join(units, chunk_lengths(len(units), document_rng(text)))


def uniform_chunks(text: str, n: int = MEAN_UNITS_PER_CHUNK, language: str = "en") -> list[str]:
    """The validation ELBO's chunks: ``ceil(units / n)`` chunks, boundaries
    ``linspace(0, units, chunks + 1)`` cast to int; ``"".join(chunks) == text``."""
    if n < 1:
        raise ValueError(f"units per chunk must be at least 1, got {n}")
    units = split_units(text, language)
    if not units:
        return []
    count = math.ceil(len(units) / n)
    bounds = numpy.linspace(0, len(units), count + 1).astype(int)
    return ["".join(units[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def tokenize_chunks(
    tokenizer: Any, chunks: Sequence[str], forbidden_ids: Iterable[int] = ()
) -> list[list[int]]:
    """Each chunk's text tokenised once, without BOS/EOS (``tokenizer.tokenize``).

    ``forbidden_ids`` (e.g. the four latent-thought ids) must not come out of any text:
    special tokens enter only as ids (decision 2); raises ValueError naming the chunk.
    """
    forbidden = set(forbidden_ids)
    out = []
    for i, chunk in enumerate(chunks):
        ids = [int(t) for t in tokenizer.tokenize(chunk)]
        if forbidden:
            found = sorted(forbidden.intersection(ids))
            if found:
                raise ValueError(
                    f"chunk {i}'s text tokenises into reserved id(s) {found} (the text holds a "
                    "special token's string); special tokens may enter only as ids"
                )
        out.append(ids)
    return out


def teacher_prefix(chunks: Sequence[str], i: int) -> str:
    """The teacher's prefix of chunk ``i``: the previous chunk's text, ``"N/A"`` for ``i = 0``."""
    _check_index(chunks, i)
    return TEACHER_FIRST_PREFIX if i == 0 else chunks[i - 1]


def estep_prefix_ids(
    chunk_ids: Sequence[Sequence[int]], i: int, count: int = ESTEP_PREFIX_CHUNKS
) -> list[int]:
    """The E-step's prefix of chunk ``i``: the raw ids of the previous ``count`` (3) chunks
    concatenated, without latents; empty for ``i = 0``."""
    _check_index(chunk_ids, i)
    return [t for ids in chunk_ids[max(0, i - count):i] for t in ids]


def elbo_prefix_ids(chunk_ids: Sequence[Sequence[int]], i: int) -> list[int]:
    """The validation ELBO's prefix of chunk ``i``: the whole preceding document's ids."""
    _check_index(chunk_ids, i)
    return [t for ids in chunk_ids[:i] for t in ids]


def _check_index(chunks: Sequence[Any], i: int) -> None:
    if not 0 <= i < len(chunks):
        raise IndexError(f"chunk {i} of a document with {len(chunks)} chunks")


__all__ = [
    "CHUNK_SEED",
    "ESTEP_PREFIX_CHUNKS",
    "MAX_UNITS_PER_CHUNK",
    "MEAN_UNITS_PER_CHUNK",
    "TEACHER_FIRST_PREFIX",
    "chunk_document",
    "chunk_lengths",
    "document_rng",
    "elbo_prefix_ids",
    "estep_prefix_ids",
    "split_units",
    "teacher_prefix",
    "tokenize_chunks",
    "uniform_chunks",
    "unit_starts",
]
