"""preprocess_data: byte identity with an independent writer, inputs, sentences, bad input."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy
import pytest
import sentencepiece

from megatron_latent.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megatron_latent.data.readers import InputError
from megatron_latent.data.tokenizers import TokenizerError, build_tokenizer

from data_fixtures import (
    REPO,
    TOOLS,
    TRICKY_TEXTS,
    corpus_texts,
    gpt2_files,
    read_bytes,
    sentencepiece_model,
    write_jsonl,
)

DOCS = [t for t in TRICKY_TEXTS if t.strip()] + list(corpus_texts())


def _records():
    return [{"text": t, "title": f"doc {i}: {t[:8]}"} for i, t in enumerate(DOCS)]


def _config(inputs, prefix, **kw) -> PreprocessConfig:
    base = dict(
        input=list(inputs) if isinstance(inputs, (list, tuple)) else [inputs],
        output_prefix=str(prefix),
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=sentencepiece_model(),
        log_interval=0,
    )
    base.update(kw)
    return PreprocessConfig(**base)


def _run(inputs, prefix, **kw):
    return preprocess(_config(inputs, prefix, **kw), log=lambda m: None)


def _reference_dataset(prefix, docs_ids, vocab_size, lengths=None):
    """Megatron-LM's writing, done here directly with megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for k, ids in enumerate(docs_ids):
        builder.add_document(ids, lengths[k] if lengths else [len(ids)])
    builder.finalize(prefix + ".idx")
    return read_bytes(prefix)


def _leftovers(directory) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "out*")))


def test_byte_identical_to_an_independent_writer_sentencepiece(tmp_path):
    data = write_jsonl(str(tmp_path / "in.jsonl"), _records())
    stats = _run(data, tmp_path / "out", append_eod=True, json_keys=["text", "title"])
    sp = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model())
    for key in ("text", "title"):
        expected = _reference_dataset(
            str(tmp_path / f"ref_{key}"),
            [sp.encode(r[key]) + [sp.eos_id()] for r in _records()],
            sp.get_piece_size(),
        )
        assert read_bytes(str(tmp_path / f"out_{key}_document")) == expected
    assert stats.documents == len(DOCS)
    assert stats.sequences == 2 * len(DOCS)


def test_byte_identical_to_an_independent_writer_gpt2(tmp_path):
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_files()
    data = write_jsonl(str(tmp_path / "in.jsonl"), _records())
    _run(
        data,
        tmp_path / "out",
        tokenizer_type="GPT2BPETokenizer",
        tokenizer_model=None,
        vocab_file=vocab,
        merge_file=merges,
    )
    ref = GPT2Tokenizer(vocab, merges)
    expected = _reference_dataset(
        str(tmp_path / "ref"), [ref.encode(r["text"]) for r in _records()], len(ref)
    )
    assert read_bytes(str(tmp_path / "out_text_document")) == expected


def test_output_does_not_depend_on_workers_or_partitions(tmp_path):
    data = write_jsonl(str(tmp_path / "in.jsonl"), _records() * 3)
    outputs = []
    for name, workers, partitions in (("a", 1, 1), ("b", 2, 1), ("c", 2, 2)):
        _run(data, tmp_path / name, workers=workers, partitions=partitions, append_eod=True)
        outputs.append(read_bytes(str(tmp_path / f"{name}_text_document")))
    assert outputs[0] == outputs[1] == outputs[2]
    sidecars = [(tmp_path / f"{name}_text_document.tokenizer.json").read_bytes()
                for name in "abc"]  # fmt: skip
    assert sidecars[0] == sidecars[1] == sidecars[2]
    # Partition files are merged and removed.
    assert sorted(os.listdir(tmp_path)) == [
        "a_text_document.bin", "a_text_document.idx", "a_text_document.tokenizer.json",
        "b_text_document.bin", "b_text_document.idx", "b_text_document.tokenizer.json",
        "c_text_document.bin", "c_text_document.idx", "c_text_document.tokenizer.json",
        "in.jsonl",
    ]  # fmt: skip


def test_gzip_parquet_directory_and_glob_inputs_give_the_same_bytes(tmp_path):
    import pyarrow
    import pyarrow.parquet

    records = _records()
    plain = write_jsonl(str(tmp_path / "all.jsonl"), records)
    _run(plain, tmp_path / "plain")
    expected = read_bytes(str(tmp_path / "plain_text_document"))

    with gzip.open(tmp_path / "all.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(open(plain, encoding="utf-8").read())
    _run(str(tmp_path / "all.jsonl.gz"), tmp_path / "gz")
    assert read_bytes(str(tmp_path / "gz_text_document")) == expected

    table = pyarrow.table({"text": [r["text"] for r in records], "n": list(range(len(records)))})
    pyarrow.parquet.write_table(table, tmp_path / "all.parquet", row_group_size=7)
    _run(str(tmp_path / "all.parquet"), tmp_path / "pq")
    assert read_bytes(str(tmp_path / "pq_text_document")) == expected

    shards = tmp_path / "shards"
    shards.mkdir()
    half = len(records) // 2
    write_jsonl(str(shards / "part-000.jsonl"), records[:half])
    with gzip.open(shards / "part-001.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in records[half:]:
            f.write(__import__("json").dumps(r) + "\n")
    (shards / "README.md").write_text("not an input")
    _run(str(shards), tmp_path / "dir")
    assert read_bytes(str(tmp_path / "dir_text_document")) == expected
    _run(str(shards / "part-*"), tmp_path / "glob")
    assert read_bytes(str(tmp_path / "glob_text_document")) == expected


def _document_tokens(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    return [
        [numpy.asarray(ds[i]).tolist() for i in range(bounds[d], bounds[d + 1])]
        for d in range(len(bounds) - 1)
    ]


@pytest.mark.parametrize("tokenizer", ["SentencePieceTokenizer", "GPT2BPETokenizer"])
def test_split_sentences_concatenate_to_the_document_tokens(tmp_path, tokenizer):
    vocab, merges = gpt2_files()
    kw = {"append_eod": True, "tokenizer_type": tokenizer}
    if tokenizer == "GPT2BPETokenizer":
        kw.update(tokenizer_model=None, vocab_file=vocab, merge_file=merges)
    data = write_jsonl(str(tmp_path / "in.jsonl"), _records())
    _run(data, tmp_path / "doc", **kw)
    stats = _run(data, tmp_path / "sent", split_sentences=True, workers=2, **kw)
    assert stats.outputs == [str(tmp_path / "sent_text_sentence")]
    documents = _document_tokens(str(tmp_path / "doc_text_document"))
    sentences = _document_tokens(str(tmp_path / "sent_text_sentence"))
    assert len(sentences) == len(documents)
    assert stats.sequences > 2 * stats.documents
    for doc, sents in zip(documents, sentences):
        assert len(doc) == 1
        assert [t for s in sents for t in s] == doc[0]
        assert all(len(s) > 0 for s in sents)


def test_split_sentences_boundaries(tmp_path):
    text = "One thing. Two things!  Three?\nStill three.\n\nFour, after a blank line"
    data = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": text}])
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model())
    newline = tok.token_to_id("<0x0A>")
    _run(data, tmp_path / "out", split_sentences=True, append_eod=True)
    (sents,) = _document_tokens(str(tmp_path / "out_text_sentence"))
    assert sents[-1][-1] == tok.eod
    assert [tok.detokenize(s).strip() for s in sents] == [
        "One thing.",
        "Two things!",
        "Three?",
        "Still three.",
        "Four, after a blank line",
    ]
    # Newlines stay at the end of the sentence they follow.
    assert sents[2][-1] == newline and sents[3][-2:] == [newline, newline]
    # A space that SentencePiece merges into the next word ("▁Two") starts that sentence.
    assert tok.inv_vocab[sents[1][0]].startswith("\u2581")

    verse = "To be, or not to be\nthat is the question\n\nWhether tis nobler"
    data = write_jsonl(str(tmp_path / "verse.jsonl"), [{"text": verse}])
    _run(data, tmp_path / "joined", split_sentences=True)
    (sents,) = _document_tokens(str(tmp_path / "joined_text_sentence"))
    assert [tok.detokenize(s) for s in sents] == [
        "To be, or not to be\nthat is the question\n\n",
        "Whether tis nobler",
    ]
    _run(data, tmp_path / "lines", split_sentences=True, split_on_newlines=True)
    (sents,) = _document_tokens(str(tmp_path / "lines_text_sentence"))
    assert [tok.detokenize(s) for s in sents] == [
        "To be, or not to be\n",
        "that is the question\n\n",
        "Whether tis nobler",
    ]


BAD_LINES = [
    (b'{"text": "fine"}\n{"text": "broken\n', "malformed JSON", 2),
    (b'{"text": "fine"}\n{"other": "x"}\n', "missing key 'text'", 2),
    (b'{"text": "fine"}\n{"text": 7}\n', "key 'text' holds int", 2),
    (b'{"text": "fine"}\n{"text": "  \\n "}\n', "empty document", 2),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "invalid UTF-8", 2),
    (b'{"text": "fine"}\n\n{"text": "x"}\n', "blank line", 2),
    (b'{"text": "fine"}\n["a list"]\n', "expected a JSON object", 2),
    (b'{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n', "not valid Unicode", 2),
]


@pytest.mark.parametrize("content,reason,line", BAD_LINES)
def test_bad_record_stops_with_file_and_line_and_leaves_nothing(tmp_path, content, reason, line):
    good = b"".join(b'{"text": "good %d."}\n' % i for i in range(50))
    path = tmp_path / "in.jsonl"
    path.write_bytes(good + content)
    with pytest.raises(PreprocessError) as err:
        _run(str(path), tmp_path / "out", workers=2)
    assert f"{path}:{50 + line}: " in str(err.value)
    assert reason in str(err.value)
    assert "--skip-bad-lines" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_skip_bad_lines_counts_and_skips(tmp_path):
    lines = [b'{"text": "good %d."}\n' % i for i in range(20)]
    bad = [b'{"text": oops}\n', b'{"x": 1}\n', b'{"text": ""}\n', b'{"text": "\xff\xfe"}\n']
    mixed = lines[:5] + bad[:2] + lines[5:15] + bad[2:] + lines[15:]
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(mixed))
    (tmp_path / "clean.jsonl").write_bytes(b"".join(lines))
    messages = []
    stats = preprocess(
        _config(str(tmp_path / "mixed.jsonl"), tmp_path / "out", skip_bad_lines=True),
        log=messages.append,
    )
    assert dict(stats.skipped) == {
        "malformed JSON": 1,
        "missing key": 1,
        "empty document": 1,
        "invalid UTF-8": 1,
    }
    assert stats.documents == 20
    assert any(f"mixed.jsonl:{6}: malformed JSON" in m for m in messages)
    assert "skipped 4 bad records" in stats.summary()
    _run(str(tmp_path / "clean.jsonl"), tmp_path / "clean")
    assert read_bytes(str(tmp_path / "out_text_document")) == read_bytes(
        str(tmp_path / "clean_text_document")
    )


def test_input_problems_are_reported_before_any_work(tmp_path):
    data = write_jsonl(str(tmp_path / "in.jsonl"), _records())
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"cannot read Parquet file '.*broken\.parquet'"):
        _run(str(tmp_path / "broken.parquet"), tmp_path / "out")

    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"body": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(InputError, match=r"cols\.parquet' has no column 'text'"):
        _run(str(tmp_path / "cols.parquet"), tmp_path / "out")
    with pytest.raises(InputError, match="input '.*missing.jsonl' does not exist"):
        _run(str(tmp_path / "missing.jsonl"), tmp_path / "out")
    with pytest.raises(InputError, match="matches no files"):
        _run(str(tmp_path / "nothing-*.jsonl"), tmp_path / "out")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported type"):
        _run(str(tmp_path / "notes.csv"), tmp_path / "out")
    missing_model = str(tmp_path / "absent.model")
    with pytest.raises(TokenizerError, match=f"--tokenizer-model: '{missing_model}'"):
        _run(data, tmp_path / "out", tokenizer_model=missing_model)
    with pytest.raises(PreprocessError, match="multiple of --partitions"):
        _run(data, tmp_path / "out", workers=3, partitions=2)
    assert _leftovers(tmp_path) == []


def test_truncated_gzip_is_reported_with_file_and_line(tmp_path):
    lines = b"".join(b'{"text": "line %d of many, many lines."}\n' % i for i in range(3000))
    whole = gzip.compress(lines)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PreprocessError, match=r"cannot read input file '.*cut\.jsonl\.gz' after line \d+"):
        _run(str(tmp_path / "cut.jsonl.gz"), tmp_path / "out", workers=2)
    assert _leftovers(tmp_path) == []


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reports_progress_and_errors(tmp_path, capsys):
    tool = _load_tool("preprocess_data")
    data = write_jsonl(str(tmp_path / "in.jsonl"), _records())
    base = [
        "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", sentencepiece_model(),
        "--output-prefix", str(tmp_path / "out"),
    ]  # fmt: skip
    assert tool.main(["--input", data, "--log-interval", "10", "--append-eod", *base]) == 0
    captured = capsys.readouterr()
    assert "Processed 10 documents (" in captured.err
    assert "docs/s" in captured.err and "MB/s" in captured.err
    assert f"Wrote {tmp_path / 'out'}_text_document.bin" in captured.out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    assert tool.main(["--input", str(bad), *base]) == 1
    assert f"error: {bad}:2: malformed JSON" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        tool.main(["--input", data, "--tokenizer-type", "Nope", "--output-prefix", "x"])
    err = capsys.readouterr().err
    assert "invalid choice: 'Nope'" in err and "GPT2BPETokenizer" in err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_killed_run_leaves_no_complete_looking_pair(tmp_path):
    fifo = tmp_path / "stream.jsonl"
    os.mkfifo(fifo)
    prefix = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable, os.path.join(TOOLS, "preprocess_data.py"),
            "--input", str(fifo), "--output-prefix", str(prefix),
            "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sentencepiece_model(), "--log-interval", "1",
        ],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        with open(fifo, "wb") as writer:  # blocks until the tool opens its input
            for i in range(200):
                writer.write(b'{"text": "line %d of a stream that never ends."}\n' % i)
            writer.flush()
            deadline = time.time() + 60
            line = b""
            while b"Processed" not in line and time.time() < deadline:
                line = proc.stderr.readline()
            assert b"Processed" in line, "the tool made no progress"
            assert os.path.exists(f"{prefix}_text_document.bin.incomplete")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not os.path.exists(f"{prefix}_text_document.bin")
    assert not os.path.exists(f"{prefix}_text_document.idx")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert not IndexedDataset.exists(f"{prefix}_text_document")
