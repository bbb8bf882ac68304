"""Sentence boundaries for ``--split-sentences``, cut from a document's own tokens.

Megatron-LM tokenizes each sentence on its own, which drops the whitespace between sentences
and changes the tokens at every boundary. Here the document is tokenized once and its token
sequence is cut where sentences start, so the sentences of a document concatenate to exactly
the tokens a document-level run writes, whitespace and newlines included.

Sentences are found with pysbd (rule-based, no download). A token belongs to the sentence that
holds its first non-whitespace character, so a space the tokenizer merges into the next word
(SentencePiece's ``▁word``, GPT-2's ``Ġword``) starts the next sentence, while whitespace-only
tokens (newlines, runs of spaces) stay at the end of the sentence they follow.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SINGLE_NEWLINE = re.compile(r"(?<!\n)\n(?!\n)")


class SentenceSplitter:
    """Finds where sentences start in a text (character offsets)."""

    def __init__(self, language: str = "en", split_on_newlines: bool = False) -> None:
        import pysbd

        self._segmenter = pysbd.Segmenter(language=language, clean=False, char_span=True)
        self.split_on_newlines = split_on_newlines

    def sentence_starts(self, text: str) -> list[int]:
        """Offsets of the first non-whitespace character of every sentence after the first.

        Unless ``split_on_newlines``, a single line break is read as a space (verse and
        wrapped prose keep their sentences whole); a blank line still ends a sentence.
        """
        if not text.strip():
            return []
        probe = text if self.split_on_newlines else _SINGLE_NEWLINE.sub(" ", text)
        starts: list[int] = []
        first = len(text) - len(text.lstrip())
        for span in self._segmenter.segment(probe):
            pos = max(int(span.start), 0)
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text) or pos <= first:
                continue
            if not starts or pos > starts[-1]:
                starts.append(pos)
        return starts


def token_anchors(text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token span, the offset of its first non-whitespace character (or its start)."""
    anchors = []
    for start, end in spans:
        piece = text[start:end]
        stripped = piece.lstrip()
        anchors.append(start + len(piece) - len(stripped) if stripped else start)
    return anchors


def sentence_lengths(
    text: str, spans: Sequence[tuple[int, int]], starts: Sequence[int]
) -> list[int]:
    """Cut a token sequence into sentences; returns the (positive) token count of each.

    ``spans`` are the tokens' character spans in ``text`` and ``starts`` the sentence starts
    from ``SentenceSplitter.sentence_starts``. The lengths always sum to ``len(spans)``.
    """
    lengths: list[int] = []
    current = 0
    boundary = 0
    for anchor in token_anchors(text, spans):
        while boundary < len(starts) and anchor >= starts[boundary]:
            if current:
                lengths.append(current)
                current = 0
            boundary += 1
        current += 1
    if current:
        lengths.append(current)
    return lengths
