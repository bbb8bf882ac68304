"""prepare_demo_corpus, train_tokenizer, merge_datasets and inspect_dataset."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import sentencepiece

from megatron_latent.data.preprocess import PreprocessConfig, preprocess

from data_fixtures import (
    REPO,
    TOOLS,
    corpus_texts,
    read_bytes,
    sentencepiece_model,
    write_indexed,
    write_jsonl,
)


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(TOOLS, f"{name}.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_prepare_demo_corpus_splits_by_play_and_writes_plain_text(tmp_path):
    out = tmp_path / "demo"
    result = _tool("prepare_demo_corpus", "--output-dir", str(out), "--valid-plays", "3")
    assert result.returncode == 0, result.stderr
    train = _read_jsonl(out / "shakespeare_train.jsonl")
    valid = _read_jsonl(out / "shakespeare_valid.jsonl")
    train_plays = {d["play"] for d in train}
    valid_plays = {d["play"] for d in valid}
    assert len(valid_plays) == 3 and len(train_plays) == 35
    assert not train_plays & valid_plays
    assert "Validation plays: " + ", ".join(sorted(valid_plays)) in result.stdout
    assert len(train) + len(valid) > 700  # one document per scene
    size = sum(len(d["text"]) for d in train + valid)
    assert 4_500_000 < size < 5_500_000
    for doc in train + valid:
        assert not any(c in doc["text"] for c in "*_#\\"), doc["id"]
        assert doc["text"].startswith(doc["title"] + "\n")
    hamlet = [d for d in train + valid if d["play"] == "hamlet"]
    assert hamlet[0]["text"].startswith(
        "Hamlet\nACT I\nSCENE I. Elsinore. A platform before the castle.\n\n"
        "[FRANCISCO at his post. Enter to him BERNARDO]\n\nBERNARDO:\nWho's there?\n"
    )
    # The same arguments give the same files; per-play documents cover the same plays.
    again = _tool("prepare_demo_corpus", "--output-dir", str(tmp_path / "again"),
                  "--valid-plays", "3", "--granularity", "play")
    assert again.returncode == 0, again.stderr
    plays = _read_jsonl(tmp_path / "again" / "shakespeare_train.jsonl")
    assert len(plays) == 35 and {d["play"] for d in plays} == train_plays


def test_train_tokenizer_cli(tmp_path):
    texts = list(corpus_texts())
    data = write_jsonl(str(tmp_path / "corpus.jsonl"), [{"body": t} for t in texts[:20]])
    (tmp_path / "more.txt").write_text("\n".join(texts[20:]), encoding="utf-8")
    args = ["--input", data, str(tmp_path / "more.txt"), "--json-keys", "body",
            "--vocab-size", "500", "--threads", "1"]  # fmt: skip
    first = _tool("train_tokenizer", *args, "--output-prefix", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "Special tokens: <thought>=4, </thought>=5, <sent>=6" in first.stdout
    second = _tool("train_tokenizer", *args, "--output-prefix", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert sp.get_piece_size() == 500
    assert [sp.id_to_piece(i) for i in range(7)] == [
        "<unk>", "<s>", "</s>", "<pad>", "<thought>", "</thought>", "<sent>"
    ]  # fmt: skip
    text = "  Odd   spacing,\ttabs\nand ünïcödé ☃ survive.\n"
    assert sp.decode(sp.encode(text)) == text  # lossless by default

    unigram = _tool("train_tokenizer", *args, "--model-type", "unigram", "--special-tokens",
                    "--output-prefix", str(tmp_path / "u"))  # fmt: skip
    assert unigram.returncode == 0, unigram.stderr
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "u.model").read_bytes())
    assert proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM
    assert proto.pieces[4].piece not in ("<thought>",)

    small = _tool("train_tokenizer", *args, "--vocab-size", "100",
                  "--output-prefix", str(tmp_path / "s"))  # fmt: skip
    assert small.returncode == 1
    assert "--vocab-size 100 is too small" in small.stderr
    missing = _tool("train_tokenizer", "--input", str(tmp_path / "nope.jsonl"),
                    "--output-prefix", str(tmp_path / "m"))  # fmt: skip
    assert missing.returncode == 1 and "nope.jsonl' does not exist" in missing.stderr
    help_text = _tool("train_tokenizer", "--help").stdout
    assert "--model-type {bpe,unigram}" in help_text and "byte fallback" in help_text


def _preprocess(inputs, prefix, **kw):
    config = PreprocessConfig(
        input=inputs,
        output_prefix=str(prefix),
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=sentencepiece_model(),
        log_interval=0,
        append_eod=True,
        **kw,
    )
    return preprocess(config, log=lambda m: None)


def test_merge_datasets_equals_preprocessing_the_concatenation(tmp_path, capsys):
    texts = list(corpus_texts())
    records = [{"text": t} for t in texts]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(str(tmp_path / "all.jsonl"), records)
    write_jsonl(str(tmp_path / "b.jsonl"), records[10:25])
    write_jsonl(str(tmp_path / "a.jsonl"), records[:10])
    write_jsonl(str(tmp_path / "c.jsonl"), records[25:])
    for name in "abc":
        _preprocess([str(tmp_path / f"{name}.jsonl")], shards / name)
    _preprocess([str(tmp_path / "all.jsonl")], tmp_path / "all")

    tool = _load_tool("merge_datasets")
    out = shards / "merged_text_document"  # inside the input directory: left out of inputs
    assert tool.main(["--input", str(shards), "--output-prefix", str(out)]) == 0
    assert read_bytes(str(out)) == read_bytes(str(tmp_path / "all_text_document"))
    assert f"{len(texts)} documents" in capsys.readouterr().out
    # Explicit prefixes merge in the order given.
    assert tool.main([
        "--input", str(shards / "c_text_document"), str(shards / "a_text_document"),
        "--output-prefix", str(tmp_path / "ca"),
    ]) == 0  # fmt: skip
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    merged = IndexedDataset(str(tmp_path / "ca"))
    c = IndexedDataset(str(shards / "c_text_document"))
    assert len(merged) == len(c) + 10
    assert merged[0].tolist() == c[0].tolist()

    write_indexed(str(tmp_path / "wide"), [[[1, 2, 70000]]], vocab_size=100_000)  # int32
    assert tool.main([
        "--input", str(shards / "a_text_document"), str(tmp_path / "wide"),
        "--output-prefix", str(tmp_path / "bad"),
    ]) == 1  # fmt: skip
    assert "different dtypes" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad.bin")


def test_inspect_dataset_counts_and_shows_sentences(tmp_path, capsys):
    text = "First sentence here. Second one follows!\nThird, on a new line? Yes."
    data = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": text}, {"text": "Only one."}])
    _preprocess([data], tmp_path / "ds", split_sentences=True)
    prefix = str(tmp_path / "ds_text_sentence")
    tool = _load_tool("inspect_dataset")
    args = [prefix, "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sentencepiece_model()]  # fmt: skip
    assert tool.main([*args, "--document", "0"]) == 0
    out = capsys.readouterr().out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    tokens = int(ds.sequence_lengths.sum())
    assert "level:     sentence" in out
    assert "documents: 2\n" in out and "sequences: 5\n" in out
    assert f"tokens:    {tokens}\n" in out
    assert "tokens per sentence:" in out
    assert "document 0: 4 sequences" in out
    assert "[0] 'First sentence here.'" in out
    assert "[1] ' Second one follows!\\n'" in out
    # Sentences concatenate to the document: every space shows on one side of a boundary.
    sentences = [line.split(" ", 1)[1] for line in out.splitlines() if line[:3] in
                 ("[0]", "[1]", "[2]", "[3]")]  # fmt: skip
    assert "".join(ast.literal_eval(s) for s in sentences) == text + "</s>"
    assert tool.main([*args, "--document", "7"]) == 1
    assert "document 7 out of range" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "absent")]) == 1
    assert "absent.idx' does not exist" in capsys.readouterr().err


def test_length_histogram_bins_every_length():
    import numpy

    from megatron_latent.data.dataset_tools import length_histogram

    lengths = numpy.array([1, 2, 2, 3, 10, 10, 10, 55])
    rows = length_histogram(lengths, bins=5)
    assert sum(c for _, _, c in rows) == len(lengths)
    assert rows[0][0] == 1 and rows[-1][1] == 55
    assert all(lo <= hi for lo, hi, _ in rows)
    for lo, hi, count in rows:
        assert count == int(((lengths >= lo) & (lengths <= hi)).sum())


@pytest.mark.parametrize("tool", ["preprocess_data", "merge_datasets", "inspect_dataset",
                                  "prepare_demo_corpus"])
def test_help_is_fast_and_explains_outputs(tool):
    result = _tool(tool, "--help")
    assert result.returncode == 0
    assert "example:" in result.stdout
    if tool == "preprocess_data":
        assert "_sentence" in result.stdout and "Megatron-LM" in result.stdout
