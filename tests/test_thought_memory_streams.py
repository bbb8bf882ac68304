"""thought-memory sentence streams: row layout, documents, streams, packing, DP, resume, schedules."""

from __future__ import annotations

import numpy
import pytest
import torch

from megatron_latent.methods.thought_memory.streams import (
    SentenceRows,
    StreamBatcher,
    StreamLayout,
    eos_weight_at,
    special_token_ids,
    stream_length_at,
    tokens_per_virtual_epoch,
)

from data_fixtures import sentencepiece_model, write_indexed, write_jsonl

VOCAB = 100
TOK_EOD = 99  # the "tokenizer's" end-of-document id, as --append-eod writes it
PAD, BOS, EOS, EOD = 100, 101, 102, 103


def _layout(**kw) -> StreamLayout:
    base = {"max_content": 4, "max_sentences": 30}
    base.update(kw)
    return StreamLayout.for_vocab(VOCAB, **base)


def _rows(tmp_path, documents, name="ds", max_content=4, eod_id=TOK_EOD) -> SentenceRows:
    prefix = write_indexed(str(tmp_path / name), documents, VOCAB)
    return SentenceRows.from_dataset(prefix, max_content=max_content, eod_id=eod_id)


def _one_stream(tmp_path, documents, w_eos=1.0, **layout_kw):
    layout = _layout(**layout_kw)
    rows = _rows(tmp_path, documents, max_content=layout.max_content)
    batcher = StreamBatcher(rows, layout, seed=0, token_budget=10_000)
    assert len(batcher) == 1
    return batcher.batch(0, w_eos=w_eos)


def test_special_ids_and_row_length():
    assert special_token_ids(50257) == (50257, 50258, 50259, 50260)
    layout = StreamLayout.for_vocab(50257)
    assert (layout.pad, layout.bos, layout.eos, layout.eod) == (50257, 50258, 50259, 50260)
    assert layout.max_content == 64 and layout.max_sentences == 30 and layout.L == 67
    assert StreamLayout.for_vocab(50257, row_length=66).L == 66
    with pytest.raises(ValueError):
        StreamLayout.for_vocab(50257, row_length=65)
    with pytest.raises(ValueError):
        StreamLayout(pad=1, bos=1, eos=2, eod=3)


def test_three_sentence_document(tmp_path):
    batch = _one_stream(tmp_path, [[[1, 2], [3], [4, 5, 6, TOK_EOD]]], w_eos=0.05)
    P = PAD
    assert batch.input_ids.tolist() == [
        [
            [BOS, 1, 2, EOS, P, P, P],
            [BOS, 3, EOS, P, P, P, P],
            [BOS, 4, 5, 6, EOD, EOS, P],
        ]
    ]
    assert batch.targets.tolist() == [
        [
            [1, 2, EOS, P, P, P, P],
            [3, EOS, P, P, P, P, P],
            [4, 5, 6, EOD, EOS, P, P],
        ]
    ]
    w = 0.05
    expected = [
        [1, 1, w, 0, 0, 0, 0],
        [1, w, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, w, 0, 0],  # the EOD target keeps weight 1
    ]
    assert torch.allclose(batch.weights[0], torch.tensor(expected, dtype=torch.float32))
    assert batch.valid.tolist() == [[True, True, True]]
    assert batch.global_tokens == int((batch.input_ids != PAD).sum()) == 4 + 3 + 6


def test_overlong_sentence_becomes_fragments(tmp_path):
    docs = [[list(range(1, 11)), [11, TOK_EOD]], [list(range(20, 30)) + [TOK_EOD]]]
    rows = _rows(tmp_path, docs)
    assert rows.num_documents == 1 and rows.documents_dropped == 1  # one sentence, 3 fragments
    assert [rows.content(i).tolist() for i in range(len(rows.length))] == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        [9, 10],
        [11],
    ]
    batch = _one_stream(tmp_path, docs[:1])
    assert batch.input_ids[0, :, 0].tolist() == [BOS] * 4
    assert batch.input_ids[0, 3].tolist() == [BOS, 11, EOD, EOS, PAD, PAD, PAD]
    assert batch.input_ids[0, 0].tolist() == [BOS, 1, 2, 3, 4, EOS, PAD]


def test_eod_row_fits_by_default_and_is_cut_from_the_left_at_max_plus_two(tmp_path):
    docs = [[[1, 2], [3, 4, 5, 6, TOK_EOD]]]
    full = _one_stream(tmp_path, docs)
    assert full.input_ids[0, 1].tolist() == [BOS, 3, 4, 5, 6, EOD, EOS]
    assert full.targets[0, 1].tolist() == [3, 4, 5, 6, EOD, EOS, PAD]
    cut = _one_stream(tmp_path, docs, row_length=6)
    assert cut.input_ids[0].tolist() == [[BOS, 1, 2, EOS, PAD, PAD], [BOS, 4, 5, 6, EOD, EOS]]
    assert cut.global_tokens == int((cut.input_ids != PAD).sum()) == 4 + 6


def test_short_documents_dropped(tmp_path):
    docs = [
        [[5, 6, TOK_EOD]],  # one sentence
        [[7, 8], [TOK_EOD]],  # the second "sentence" is only the appended EOD
        [[1], [], [2, TOK_EOD]],  # an empty sentence is skipped; two remain
    ]
    rows = _rows(tmp_path, docs)
    assert (rows.documents_read, rows.documents_dropped, rows.num_documents) == (3, 2, 1)
    assert [rows.content(i).tolist() for i in range(len(rows.length))] == [[1], [2]]


def test_without_eod_id_nothing_is_dropped(tmp_path):
    rows = _rows(tmp_path, [[[1], [2, TOK_EOD]]], eod_id=None)
    assert rows.content(1).tolist() == [2, TOK_EOD]


def test_append_eod_from_preprocess_is_not_duplicated(tmp_path):
    from megatron_latent.data.preprocess import PreprocessConfig, preprocess
    from megatron_latent.data.tokenizers import build_tokenizer

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model())
    texts = [
        "One thing. Two things! Three?",
        "A single sentence only",
        "First here. Then a second one. And a third. Finally a fourth.",
    ]
    data = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in texts])
    per_run = {}
    for append in (True, False):
        name = f"out_{append}"
        preprocess(
            PreprocessConfig(
                input=[data],
                output_prefix=str(tmp_path / name),
                split_sentences=True,
                append_eod=append,
                tokenizer_type="SentencePieceTokenizer",
                tokenizer_model=sentencepiece_model(),
                log_interval=0,
            ),
            log=lambda m: None,
        )
        rows = SentenceRows.from_dataset(
            str(tmp_path / f"{name}_text_sentence"), max_content=64, eod_id=tok.eod
        )
        per_run[append] = [rows.content(i).tolist() for i in range(len(rows.length))]
        assert rows.documents_dropped == 1 and rows.num_documents == 2
    assert per_run[True] == per_run[False]
    assert all(tok.eod not in r for r in per_run[True])
    assert tok.detokenize(per_run[True][0]).strip() == "One thing."

    layout = StreamLayout.for_vocab(tok.vocab_size)
    rows = SentenceRows.from_dataset(str(tmp_path / "out_True_text_sentence"), eod_id=tok.eod)
    batcher = StreamBatcher(rows, layout, seed=0, token_budget=10_000)
    (batch,) = list(batcher.batches())
    assert int((batch.input_ids == tok.eod).sum()) == 0
    assert int((batch.input_ids == layout.eod).sum()) == 2  # one per document
    for b in range(2):
        n = int(batch.valid[b].sum())
        last = batch.input_ids[b, n - 1]
        real = last[last != layout.pad].tolist()
        assert real[-2:] == [layout.eod, layout.eos] and real.count(layout.eod) == 1


def _doc_of(n_sentences: int, start: int) -> list[list[int]]:
    doc = [[start + i] for i in range(n_sentences)]
    doc[-1] = doc[-1] + [TOK_EOD]
    return doc


def test_training_documents_cut_validation_documents_not(tmp_path):
    rows = _rows(tmp_path, [_doc_of(5, 1), _doc_of(2, 50)])
    train = StreamBatcher(rows, _layout(max_sentences=2), seed=0, token_budget=10_000)
    s = train.streams
    assert s.rows.tolist() == [2, 2, 1, 2]
    assert s.eod.tolist() == [False, False, True, True]
    (batch,) = list(train.batches())
    assert int((batch.input_ids == EOD).sum()) == 2
    firsts = {int(i): batch.input_ids[k, 0, 1].item() for k, i in enumerate(batch.stream_ids)}
    assert firsts == {0: 1, 1: 3, 2: 5, 3: 50}  # consecutive, non-overlapping chunks
    valid = StreamBatcher(rows, _layout(max_sentences=2), seed=0, token_budget=10_000, cut=False)
    assert valid.streams.rows.tolist() == [5, 2] and valid.streams.eod.tolist() == [True, True]
    (vb,) = list(valid.batches())
    assert vb.valid.tolist() == [[True] * 5, [True, True, False, False, False]]
    assert vb.input_ids[1, 2:].eq(PAD).all()


def _random_corpus(tmp_path, n_docs=80, seed=3) -> SentenceRows:
    rng = numpy.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(1, 40))
        doc = [rng.integers(1, 90, size=int(rng.integers(1, 12))).tolist() for _ in range(n)]
        doc[-1].append(TOK_EOD)
        docs.append(doc)
    return _rows(tmp_path, docs, name="random", max_content=8)


def _batcher(rows, seed=7, s=6, budget=400, window=64, cut=True) -> StreamBatcher:
    layout = _layout(max_content=8, max_sentences=s)
    return StreamBatcher(rows, layout, seed=seed, token_budget=budget, window=window, cut=cut)


def _key(batch) -> tuple:
    return (
        batch.index,
        batch.stream_ids.tolist(),
        batch.input_ids.tolist(),
        batch.targets.tolist(),
        batch.weights.tolist(),
        batch.valid.tolist(),
    )


def test_packing_covers_every_stream_once_within_budget_and_is_seeded(tmp_path):
    rows = _random_corpus(tmp_path)
    a, b, other = _batcher(rows), _batcher(rows), _batcher(rows, seed=8)
    assert len(a) > 10
    assert [x.tolist() for x in a.global_batches] == [x.tolist() for x in b.global_batches]
    assert [x.tolist() for x in a.global_batches] != [x.tolist() for x in other.global_batches]
    ids = numpy.concatenate(a.global_batches)
    assert sorted(ids.tolist()) == list(range(len(a.streams)))
    assert all(int(a.streams.tokens[g].sum()) <= 400 for g in a.global_batches)
    assert a.streams.rows.max() == 6
    for batch in a.batches(w_eos=0.05):
        assert batch.global_tokens == int((batch.input_ids != PAD).sum()) <= 400
        assert batch.input_ids.shape[1] == int(batch.valid.sum(1).max())
        # weights: 0 exactly where the target is PAD, w_eos on EOS targets
        assert torch.equal(batch.weights == 0, batch.targets == PAD)
        assert torch.allclose(batch.weights[batch.targets == EOS], torch.tensor(0.05))
        assert (batch.weights[(batch.targets != EOS) & (batch.targets != PAD)] == 1).all()
        assert (batch.input_ids[~batch.valid] == PAD).all()
    assert [_key(x) for x in a.batches()] == [_key(x) for x in b.batches()]


def test_data_parallel_shares_union_to_the_single_rank_batch(tmp_path):
    rows = _random_corpus(tmp_path)
    batcher = _batcher(rows)
    for index in range(len(batcher)):
        whole = batcher.batch(index)
        parts = [batcher.batch(index, dp_rank=r, dp_size=2) for r in range(2)]
        assert abs(len(parts[0].stream_ids) - len(parts[1].stream_ids)) <= 1
        assert all(p.input_ids.shape[1:] == whole.input_ids.shape[1:] for p in parts)
        got = {}
        for p in parts:
            for k, sid in enumerate(p.stream_ids.tolist()):
                assert sid not in got
                got[sid] = (p.input_ids[k], p.targets[k], p.weights[k], p.valid[k])
        assert sorted(got) == sorted(whole.stream_ids.tolist())
        for k, sid in enumerate(whole.stream_ids.tolist()):
            mine = (whole.input_ids[k], whole.targets[k], whole.weights[k], whole.valid[k])
            assert all(torch.equal(x, y) for x, y in zip(mine, got[sid]))


def test_resume_from_a_counter_continues_exactly(tmp_path):
    rows = _random_corpus(tmp_path)
    full = [_key(b) for b in _batcher(rows).batches(dp_rank=1, dp_size=2)]
    for c in (0, 1, 5, len(full) - 1, len(full)):
        fresh = _batcher(rows)  # a new process after a restart
        start = fresh.batches_for_consumed_streams(fresh.streams_before(c))
        assert start == c
        assert [_key(b) for b in fresh.batches(start, dp_rank=1, dp_size=2)] == full[c:]
    batcher = _batcher(rows)
    with pytest.raises(ValueError):
        batcher.batches_for_consumed_streams(batcher.streams_before(1) + 1)


def test_validation_streams_are_whole_documents(tmp_path):
    rows = _random_corpus(tmp_path)
    valid = _batcher(rows, cut=False, budget=500)
    assert len(valid.streams) == rows.num_documents
    assert valid.streams.eod.all()
    assert valid.streams.rows.tolist() == numpy.diff(rows.doc_rows).tolist()
    assert valid.streams.rows.max() > 6


def test_curriculum_and_eos_weight_schedules():
    assert [stream_length_at(epoch=e) for e in (0, 4, 5, 9, 10, 44, 45, 49)] == [
        30,
        30,
        42,
        42,
        54,
        126,
        138,
        138,
    ]
    assert stream_length_at(epoch=49, cap=64) == 64
    tpe = tokens_per_virtual_epoch(50_000_000, epochs=50)
    assert tpe == 1_000_000
    assert stream_length_at(tokens=4_999_999, tokens_per_epoch=tpe) == 30
    assert stream_length_at(tokens=5_000_000, tokens_per_epoch=tpe) == 42
    assert stream_length_at(tokens=49_000_000, tokens_per_epoch=tpe) == 138
    assert eos_weight_at(epoch=0) == 1.0
    assert eos_weight_at(epoch=1) == eos_weight_at(epoch=30) == 0.05
    assert eos_weight_at(tokens=999_999, tokens_per_epoch=tpe) == 1.0
    assert eos_weight_at(tokens=1_000_000, tokens_per_epoch=tpe) == 0.05
    with pytest.raises(ValueError):
        stream_length_at()
    with pytest.raises(ValueError):
        eos_weight_at(epoch=1, tokens=5, tokens_per_epoch=1)
