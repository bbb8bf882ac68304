"""Sentence streams for thought-memory: rows, streams, global batches, DP shares, schedules.

Layout decisions (see ../shared/methods/thought_gestalt.md, "Decisions" 1-3, 7, 8):

* Documents come from a ``--split-sentences`` indexed dataset (one sequence per sentence). The
  tokenizer's EOD that ``--append-eod`` put on a document's last sentence is dropped; the row
  layout writes its own ``EOD EOS``. Empty sentences are skipped; documents with fewer than 2
  (non-empty) sentences are dropped. Sentences over ``max_content`` tokens become consecutive
  ``<= max_content`` fragments (no tokens lost); each fragment is a row of its own and counts as
  one sentence of a stream.
* A row is ``BOS + content + EOS``; the document's last row is ``BOS + content + EOD + EOS``;
  PAD after. The row length is ``L = max_content + 3`` by default, so an EOD row always fits and
  nothing is cut. With ``row_length=max_content + 2`` (the paper's L=66) an over-long EOD row
  has its content cut from the left, BOS kept.
* Targets are next tokens within the row (BOS -> first content token, ..., EOS and EOD targets
  included); the position of the final EOS and PAD positions have target PAD and weight 0.
  Weights: ``w_eos`` on EOS targets, 1 on every other real target (EOD included).
* Training documents are cut into consecutive, non-overlapping streams of ``<= S`` rows; only a
  document's last stream carries EOD. Validation documents are never cut (``cut=False``).
* Packing (a pure function of the dataset, seed, S, budget and window): the streams are permuted
  with ``numpy.random.RandomState(seed)``; each window of ``window`` consecutive streams is
  sorted longest first (rows, then tokens, then stream id) and packed greedily into global
  batches of at most ``token_budget`` non-pad tokens (a stream over the budget gets a batch of
  its own); the window's batches are then permuted with the same generator. Pass
  ``seed + epoch`` for a new order every epoch.
* Data parallelism: a global batch's streams are sorted as above and DP rank ``r`` of ``D``
  takes positions ``r, r + D, ...``; every rank pads to the global batch's longest stream, so
  shapes along the sentence axis agree. A rank may get no stream when a batch has fewer than
  ``D`` streams. Resuming is by consumed global batches (``batches(start=...)``), or by consumed
  streams through ``batches_for_consumed_streams``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy
import torch

#: Defaults from the notes.
MAX_CONTENT = 64
BASE_STREAM_LENGTH = 30
STREAM_LENGTH_STEP = 12
EPOCHS_PER_STEP = 5
EOS_WEIGHT_FIRST = 1.0
EOS_WEIGHT_AFTER = 0.05
TOKEN_BUDGET = 20_000


def special_token_ids(vocab_size: int) -> tuple[int, int, int, int]:
    """(PAD, BOS, EOS, EOD): four new ids right after the tokenizer's vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return vocab_size, vocab_size + 1, vocab_size + 2, vocab_size + 3


@dataclass(frozen=True)
class StreamLayout:
    """Special ids and sizes of the sentence rows; ``row_length`` defaults to max_content + 3."""

    pad: int
    bos: int
    eos: int
    eod: int
    max_content: int = MAX_CONTENT
    max_sentences: int = BASE_STREAM_LENGTH
    row_length: int | None = None

    def __post_init__(self) -> None:
        if len({self.pad, self.bos, self.eos, self.eod}) != 4:
            raise ValueError("PAD, BOS, EOS and EOD must be four different ids")
        if self.max_content < 1 or self.max_sentences < 1:
            raise ValueError("max_content and max_sentences must be >= 1")
        if self.row_length is None:
            object.__setattr__(self, "row_length", self.max_content + 3)
        if self.row_length < self.max_content + 2:
            raise ValueError(f"row_length must be >= max_content + 2, got {self.row_length}")

    @classmethod
    def for_vocab(cls, vocab_size: int, **kwargs) -> StreamLayout:
        pad, bos, eos, eod = special_token_ids(vocab_size)
        return cls(pad=pad, bos=bos, eos=eos, eod=eod, **kwargs)

    @property
    def L(self) -> int:
        """The row length (the notes' L)."""
        return int(self.row_length)


def encode_row(content: numpy.ndarray, layout: StreamLayout, eod: bool) -> numpy.ndarray:
    """``BOS + content (+ EOD) + EOS``, unpadded; an EOD row too long is cut from the left."""
    tail = [layout.eod, layout.eos] if eod else [layout.eos]
    keep = layout.L - 1 - len(tail)
    content = numpy.asarray(content, dtype=numpy.int64)
    if len(content) > keep:
        content = content[len(content) - keep :]
    return numpy.concatenate([[layout.bos], content, tail]).astype(numpy.int64)


def row_arrays(
    content: numpy.ndarray, layout: StreamLayout, eod: bool, w_eos: float
) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """(input ids, targets, weights) of one row, each of length L, PAD / weight 0 after."""
    row = encode_row(content, layout, eod)
    n = len(row)
    inputs = numpy.full(layout.L, layout.pad, dtype=numpy.int64)
    targets = numpy.full(layout.L, layout.pad, dtype=numpy.int64)
    weights = numpy.zeros(layout.L, dtype=numpy.float32)
    inputs[:n] = row
    targets[: n - 1] = row[1:]
    weights[: n - 1] = numpy.where(row[1:] == layout.eos, w_eos, 1.0)
    return inputs, targets, weights


@dataclass
class SentenceRows:
    """The rows of the kept documents of a ``_sentence`` dataset (fragments of sentences).

    Row ``i`` is tokens ``[offset[i], offset[i] + length[i])`` of sequence ``sequence[i]``;
    the rows of kept document ``d`` are ``doc_rows[d]:doc_rows[d + 1]``.
    """

    dataset: object
    sequence: numpy.ndarray
    offset: numpy.ndarray
    length: numpy.ndarray
    doc_rows: numpy.ndarray
    documents_read: int = 0
    documents_dropped: int = 0

    @classmethod
    def from_dataset(
        cls, dataset, max_content: int = MAX_CONTENT, eod_id: int | None = None
    ) -> SentenceRows:
        """Read a dataset (an ``IndexedDataset`` or its path prefix).

        ``eod_id``: the tokenizer's end-of-document id; when a document's last sentence ends
        with it (``--append-eod``), it is dropped. None keeps every token.
        """
        if isinstance(dataset, str):
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            dataset = IndexedDataset(dataset)
        lengths = numpy.asarray(dataset.sequence_lengths, dtype=numpy.int64).copy()
        bounds = numpy.asarray(dataset.document_indices, dtype=numpy.int64)
        n_docs = len(bounds) - 1
        if eod_id is not None:
            for d in range(n_docs):
                last = bounds[d + 1] - 1
                if bounds[d + 1] > bounds[d] and lengths[last] > 0:
                    token = dataset.get(int(last), offset=int(lengths[last]) - 1, length=1)
                    if int(token[0]) == eod_id:
                        lengths[last] -= 1
        doc_of_seq = numpy.repeat(numpy.arange(n_docs), numpy.diff(bounds))
        nonempty = lengths > 0
        sentences = numpy.bincount(doc_of_seq[nonempty], minlength=n_docs)
        keep_seq = nonempty & (sentences[doc_of_seq] >= 2)
        seqs = numpy.flatnonzero(keep_seq)
        frags = -(-lengths[seqs] // max_content)
        sequence = numpy.repeat(seqs, frags)
        first_row = numpy.cumsum(frags) - frags
        k = numpy.arange(len(sequence)) - numpy.repeat(first_row, frags)
        offset = k * max_content
        length = numpy.minimum(max_content, lengths[sequence] - offset)
        row_docs = doc_of_seq[sequence]
        kept_docs = numpy.flatnonzero(sentences >= 2)
        rows_per_doc = numpy.bincount(row_docs, minlength=n_docs)[kept_docs]
        doc_rows = numpy.concatenate([[0], numpy.cumsum(rows_per_doc)]).astype(numpy.int64)
        return cls(
            dataset=dataset,
            sequence=sequence,
            offset=offset.astype(numpy.int64),
            length=length.astype(numpy.int64),
            doc_rows=doc_rows,
            documents_read=n_docs,
            documents_dropped=n_docs - len(kept_docs),
        )

    @property
    def num_documents(self) -> int:
        return len(self.doc_rows) - 1

    def content(self, row: int) -> numpy.ndarray:
        """The content tokens of one row."""
        return numpy.asarray(
            self.dataset.get(
                int(self.sequence[row]), offset=int(self.offset[row]), length=int(self.length[row])
            ),
            dtype=numpy.int64,
        )


@dataclass
class Streams:
    """Streams as arrays: rows ``first[i]:first[i] + rows[i]``, EOD flag, non-pad tokens."""

    first: numpy.ndarray
    rows: numpy.ndarray
    eod: numpy.ndarray
    tokens: numpy.ndarray

    def __len__(self) -> int:
        return len(self.first)


def build_streams(rows: SentenceRows, layout: StreamLayout, cut: bool = True) -> Streams:
    """Cut every document into consecutive streams of <= S rows (one stream when not ``cut``)."""
    per_doc = numpy.diff(rows.doc_rows)
    size = layout.max_sentences if cut else max(int(per_doc.max(initial=1)), 1)
    chunks = -(-per_doc // size)
    doc = numpy.repeat(numpy.arange(len(per_doc)), chunks)
    k = numpy.arange(len(doc)) - numpy.repeat(numpy.cumsum(chunks) - chunks, chunks)
    first = rows.doc_rows[doc] + k * size
    end = numpy.minimum(first + size, rows.doc_rows[doc + 1])
    eod = end == rows.doc_rows[doc + 1]
    csum = numpy.concatenate([[0], numpy.cumsum(rows.length + 2)])
    tokens = csum[end] - csum[first]
    if len(first):
        last_len = rows.length[end - 1] + 3
        tokens = tokens + numpy.where(eod, numpy.minimum(last_len, layout.L) - last_len + 1, 0)
    return Streams(first=first, rows=end - first, eod=eod, tokens=tokens.astype(numpy.int64))


def _longest_first(streams: Streams, ids: numpy.ndarray) -> numpy.ndarray:
    """``ids`` sorted by rows (desc), tokens (desc), id (asc)."""
    ids = numpy.asarray(ids, dtype=numpy.int64)
    return ids[numpy.lexsort((ids, -streams.tokens[ids], -streams.rows[ids]))]


def pack_streams(
    streams: Streams, seed: int, token_budget: int, window: int = 1024
) -> list[numpy.ndarray]:
    """Global batches of stream ids (each sorted longest first); see the module docstring."""
    if token_budget < 1 or window < 1:
        raise ValueError("token_budget and window must be >= 1")
    rng = numpy.random.RandomState(seed)
    order = rng.permutation(len(streams))
    batches: list[numpy.ndarray] = []
    for start in range(0, len(order), window):
        packed: list[numpy.ndarray] = []
        current: list[int] = []
        used = 0
        for sid in _longest_first(streams, order[start : start + window]):
            tokens = int(streams.tokens[sid])
            if current and used + tokens > token_budget:
                packed.append(numpy.asarray(current, dtype=numpy.int64))
                current, used = [], 0
            current.append(int(sid))
            used += tokens
        if current:
            packed.append(numpy.asarray(current, dtype=numpy.int64))
        batches.extend(packed[i] for i in rng.permutation(len(packed)))
    return batches


@dataclass
class StreamBatch:
    """One DP rank's share of a global batch; the sentence axis is padded to the global max."""

    input_ids: torch.Tensor  # [streams, S_max, L] int64
    targets: torch.Tensor  # [streams, S_max, L] int64
    weights: torch.Tensor  # [streams, S_max, L] float32
    valid: torch.Tensor  # [streams, S_max] bool: row t valid iff t < stream length
    stream_ids: torch.Tensor  # [streams] int64, ids into the batcher's streams
    index: int  # the global batch's position in the epoch
    global_streams: int  # streams in the whole global batch
    global_tokens: int  # non-pad tokens in the whole global batch


class StreamBatcher:
    """Deterministic, resumable global batches of sentence streams, split over DP ranks."""

    def __init__(
        self,
        rows: SentenceRows,
        layout: StreamLayout,
        seed: int,
        token_budget: int = TOKEN_BUDGET,
        cut: bool = True,
        window: int = 1024,
    ) -> None:
        self.rows = rows
        self.layout = layout
        self.streams = build_streams(rows, layout, cut=cut)
        self.global_batches = pack_streams(self.streams, seed, token_budget, window)
        counts = numpy.array([len(b) for b in self.global_batches], dtype=numpy.int64)
        self._streams_before = numpy.concatenate([[0], numpy.cumsum(counts)])

    def __len__(self) -> int:
        return len(self.global_batches)

    def batches_for_consumed_streams(self, consumed_streams: int) -> int:
        """The number of global batches that hold exactly ``consumed_streams`` streams."""
        i = int(numpy.searchsorted(self._streams_before, consumed_streams))
        if i >= len(self._streams_before) or self._streams_before[i] != consumed_streams:
            raise ValueError(f"{consumed_streams} consumed streams is not a batch boundary")
        return i

    def streams_before(self, batch_index: int) -> int:
        """Streams in global batches ``0 .. batch_index - 1`` (the consumed-streams counter)."""
        return int(self._streams_before[batch_index])

    def rank_stream_ids(self, index: int, dp_rank: int = 0, dp_size: int = 1) -> numpy.ndarray:
        """Stream ids of rank ``dp_rank`` of ``dp_size`` in global batch ``index``."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
        return _longest_first(self.streams, self.global_batches[index])[dp_rank::dp_size]

    def batch(
        self, index: int, w_eos: float = EOS_WEIGHT_FIRST, dp_rank: int = 0, dp_size: int = 1
    ) -> StreamBatch:
        """Global batch ``index``, this rank's share, as tensors."""
        whole = self.global_batches[index]
        s_max = int(self.streams.rows[whole].max())
        ids = self.rank_stream_ids(index, dp_rank, dp_size)
        L = self.layout.L
        inputs = numpy.full((len(ids), s_max, L), self.layout.pad, dtype=numpy.int64)
        targets = numpy.full((len(ids), s_max, L), self.layout.pad, dtype=numpy.int64)
        weights = numpy.zeros((len(ids), s_max, L), dtype=numpy.float32)
        valid = numpy.zeros((len(ids), s_max), dtype=bool)
        for b, sid in enumerate(ids):
            first, n = int(self.streams.first[sid]), int(self.streams.rows[sid])
            for t in range(n):
                eod = bool(self.streams.eod[sid]) and t == n - 1
                row = row_arrays(self.rows.content(first + t), self.layout, eod, w_eos)
                inputs[b, t], targets[b, t], weights[b, t] = row
            valid[b, :n] = True
        return StreamBatch(
            input_ids=torch.from_numpy(inputs),
            targets=torch.from_numpy(targets),
            weights=torch.from_numpy(weights),
            valid=torch.from_numpy(valid),
            stream_ids=torch.from_numpy(numpy.asarray(ids, dtype=numpy.int64)),
            index=index,
            global_streams=len(whole),
            global_tokens=int(self.streams.tokens[whole].sum()),
        )

    def batches(
        self, start: int = 0, w_eos: float = EOS_WEIGHT_FIRST, dp_rank: int = 0, dp_size: int = 1
    ) -> Iterator[StreamBatch]:
        """Global batches ``start, start + 1, ...`` (``start`` = consumed global batches)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start ({start}) must be in [0, {len(self)}]")
        for index in range(start, len(self)):
            yield self.batch(index, w_eos, dp_rank, dp_size)


# -- schedules ------------------------------------------------------------------------------


def _epoch(epoch: int | None, tokens: int | None, tokens_per_epoch: int | None) -> int:
    """The (virtual) epoch: ``epoch``, or ``tokens // tokens_per_epoch`` for single-epoch runs."""
    if (epoch is None) == (tokens is None):
        raise ValueError("give exactly one of epoch and tokens")
    if epoch is not None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return int(epoch)
    if not tokens_per_epoch or tokens_per_epoch < 1 or tokens < 0:
        raise ValueError("tokens needs tokens >= 0 and tokens_per_epoch >= 1")
    return int(tokens // tokens_per_epoch)


def stream_length_at(
    *,
    epoch: int | None = None,
    tokens: int | None = None,
    tokens_per_epoch: int | None = None,
    base: int = BASE_STREAM_LENGTH,
    step: int = STREAM_LENGTH_STEP,
    every: int = EPOCHS_PER_STEP,
    cap: int | None = None,
) -> int:
    """S = base + step * floor(epoch / every), at most ``cap``; by tokens: epoch = tokens // tpe."""
    s = base + step * (_epoch(epoch, tokens, tokens_per_epoch) // every)
    return min(s, cap) if cap is not None else s


def eos_weight_at(
    *,
    epoch: int | None = None,
    tokens: int | None = None,
    tokens_per_epoch: int | None = None,
    first: float = EOS_WEIGHT_FIRST,
    after: float = EOS_WEIGHT_AFTER,
    first_epochs: int = 1,
) -> float:
    """EOS-target weight: ``first`` during the first ``first_epochs`` epochs, ``after`` later."""
    return first if _epoch(epoch, tokens, tokens_per_epoch) < first_epochs else after


def tokens_per_virtual_epoch(total_tokens: int, epochs: int = 50) -> int:
    """``tokens_per_epoch`` that maps a single-epoch run onto the paper's ``epochs`` epochs."""
    return max(1, math.ceil(total_tokens / epochs))
