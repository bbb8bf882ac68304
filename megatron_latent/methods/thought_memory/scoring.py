"""lm-eval log-likelihoods of a thought-memory model (the method's `score_continuations` hook).

One request (context, continuation) becomes one sentence stream, laid out as training lays out
a validation document:

* Tokens: as lm-eval's causal backends, trailing whitespace of the context moves to the
  continuation, ``context + continuation`` is tokenized once and the continuation's tokens are
  those after the first ``len(tokenize(context))`` (an empty context: every token).
* Sentences: the whole text is cut at sentence starts with the splitter of
  ``tools/preprocess_data.py --split-sentences`` (``data.sentences``: pysbd, a token belongs to
  the sentence holding its first non-whitespace character), so the sentences are the tokens
  preprocessing writes for a document with that text. A sentence over ``max_content`` tokens
  becomes consecutive fragments, one row each (streams.py).
* Rows: every sentence (fragment) but the last is a closed row ``BOS + content + EOS`` whose
  vector is written to the memory and seeds the next row's BOS. The last is an open row
  ``BOS + content``: no EOS, no EOD, nothing after it, so the continuation's end is never
  scored as a sentence or document end. The first row starts with an unseeded BOS and an
  empty memory (also for an empty context).
* Scores: each continuation token is a content target of its row, predicted at the position
  before it in that row. A continuation token that opens a sentence (or fragment) is predicted
  from that row's BOS, seeded by the previous sentence's vector; the EOS targets of the closed
  rows in between are not scored. Σ log p over the model's whole (padded) vocabulary and
  whether every token is the argmax (lowest id on ties); vocabulary shards are reduced across
  TP (evaluation.vocab_scores.vocab_parallel_scores), so every TP size gives the same numbers.
* Batches: streams sorted longest first, padded with PAD rows to the longest in the batch;
  ``valid`` marks the real rows (padding rows write nothing and follow every real row). The
  context is never cut: the stream holds all its sentences (the FIFO memory keeps the last
  ``memory_size`` vectors).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy
import torch

from ...data.sentences import SentenceSplitter, sentence_lengths
from ...evaluation.vocab_scores import vocab_parallel_scores
from ...inference.stepping import unwrap_model
from .streams import StreamLayout, encode_row


@dataclass
class ScoredStream:
    """One request laid out as rows: ids and targets [T, L] and where its tokens are scored."""

    input_ids: numpy.ndarray
    targets: numpy.ndarray
    #: (row, position) of the logits that predict each continuation token, in order.
    positions: list[tuple[int, int]]
    continuation_tokens: list[int]
    #: Token counts of the sentences of context + continuation (before fragmenting).
    sentence_lengths: list[int]


@functools.lru_cache(maxsize=4)
def _splitter(language: str, split_on_newlines: bool) -> SentenceSplitter:
    return SentenceSplitter(language, split_on_newlines)


def encode_request(tokenizer, context: str, continuation: str
                   ) -> tuple[str, list[int], list[tuple[int, int]], int]:
    """(text, token ids, token spans, number of context tokens) as lm-eval's causal backends
    split a pair: trailing context whitespace joins the continuation; the text is tokenized
    whole and the first len(tokenize(context)) tokens are the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    text = context + continuation
    ids, spans = tokenizer.tokenize_with_offsets(text)
    n_context = len(tokenizer.tokenize(context)) if context else 0
    return text, [int(i) for i in ids], list(spans), min(n_context, len(ids))


def layout_request(tokenizer, context: str, continuation: str, layout: StreamLayout,
                   splitter: SentenceSplitter | None = None) -> ScoredStream:
    """The rows of one request and the positions scoring its continuation (module docstring)."""
    splitter = splitter or _splitter("en", False)
    text, ids, spans, n_context = encode_request(tokenizer, context, continuation)
    lengths = sentence_lengths(text, spans, splitter.sentence_starts(text)) if ids else []
    rows: list[list[int]] = []  # content tokens of each row
    first_index: list[int] = []  # index in `ids` of each row's first content token
    start = 0
    for length in lengths:
        for offset in range(0, length, layout.max_content):
            piece = min(layout.max_content, length - offset)
            rows.append(ids[start:start + piece])
            first_index.append(start)
            start += piece
    T, L = max(len(rows), 1), layout.L
    input_ids = numpy.full((T, L), layout.pad, dtype=numpy.int64)
    targets = numpy.full((T, L), layout.pad, dtype=numpy.int64)
    positions: list[tuple[int, int]] = []
    for r, content in enumerate(rows):
        row = encode_row(numpy.asarray(content), layout, eod=False)
        if r == len(rows) - 1:
            row = row[:-1]  # the open last row: no EOS
        input_ids[r, :len(row)] = row
        targets[r, :len(row) - 1] = row[1:]
        for k in range(len(content)):
            if first_index[r] + k >= n_context:
                positions.append((r, k))
    return ScoredStream(input_ids, targets, positions, ids[n_context:], lengths)


def _batches(streams: list[ScoredStream], batch_size: int) -> list[list[int]]:
    """Request indices grouped longest first (rows, then scored tokens), batch_size each."""
    order = sorted(range(len(streams)), key=lambda i: (-len(streams[i].input_ids),
                                                       -len(streams[i].positions), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_streams(model: torch.nn.Module, streams: Sequence[ScoredStream],
                  batch_size: int = 8) -> list[tuple[float, bool]]:
    """(Σ log p of each stream's scored tokens, whether each is the argmax), batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layout: StreamLayout = unwrap_model(model).layout
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = [(0.0, True)] * len(streams)
    todo = [s for s in streams if s.positions]
    index = [i for i, s in enumerate(streams) if s.positions]
    for group in _batches(todo, batch_size):
        T = max(len(todo[i].input_ids) for i in group)
        shape = (len(group), T, layout.L)
        inputs = torch.full(shape, layout.pad, dtype=torch.long)
        targets = torch.full(shape, layout.pad, dtype=torch.long)
        valid = torch.zeros(len(group), T, dtype=torch.bool)
        b_idx, r_idx, p_idx, tokens = [], [], [], []
        for b, i in enumerate(group):
            stream = todo[i]
            n = len(stream.input_ids)
            inputs[b, :n] = torch.from_numpy(stream.input_ids)
            targets[b, :n] = torch.from_numpy(stream.targets)
            valid[b, :n] = True
            for (r, p), token in zip(stream.positions, stream.continuation_tokens, strict=True):
                b_idx.append(b)
                r_idx.append(r)
                p_idx.append(p)
                tokens.append(token)
        _, aux = model(inputs.to(device), targets.to(device), valid=valid.to(device),
                       return_logits=True)
        picked = aux["logits"][b_idx, r_idx, p_idx]  # [n, V/tp]
        wanted = torch.tensor(tokens, dtype=torch.long, device=picked.device)
        logprobs, argmax = vocab_parallel_scores(picked, wanted)
        logprobs = logprobs.double().tolist()
        greedy = (argmax == wanted).tolist()
        offset = 0
        for i in group:
            n = len(todo[i].positions)
            results[index[i]] = (float(sum(logprobs[offset:offset + n])),
                                 all(greedy[offset:offset + n]))
            offset += n
    return results


def score_continuations(model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]],
                        batch_size: int = 8, language: str = "en",
                        split_on_newlines: bool = False) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), is_greedy) per (context, continuation) pair.

    The pair is one sentence stream (module docstring); an empty continuation scores
    (0.0, True). `language` and `split_on_newlines` are the sentence splitter's settings
    (those of preprocessing: ``--lang``, ``--split-on-newlines``).
    """
    layout: StreamLayout = unwrap_model(model).layout
    splitter = _splitter(language, split_on_newlines)
    streams = [layout_request(tokenizer, context, continuation, layout, splitter)
               for context, continuation in pairs]
    return score_streams(model, streams, batch_size)


__all__ = ["ScoredStream", "encode_request", "layout_request", "score_continuations",
           "score_streams"]
