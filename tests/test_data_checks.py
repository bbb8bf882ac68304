"""Data checks at start-up: the tokenizer that made a dataset, .bin/.idx sizes, index caching."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time

import numpy
import pytest
import sentencepiece

from megatron_latent.config import ConfigError
from megatron_latent.data.dataset_tools import merge_datasets
from megatron_latent.data.datasets import DataConfig, build_gpt_datasets, check_data_paths
from megatron_latent.data.indexed import DatasetPathError, read_index_header
from megatron_latent.data.preprocess import PreprocessConfig, preprocess
from megatron_latent.data.tokenizers import build_tokenizer

from data_fixtures import (
    corpus_texts,
    gpt2_files,
    sentencepiece_model,
    synthetic_dataset,
    write_indexed,
    write_jsonl,
)
from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

SP = "SentencePieceTokenizer"
HF = "HuggingFaceTokenizer"


def _preprocess(tmp_path, prefix, tokenizer_type=SP, **tokenizer_files) -> str:
    """Preprocess a few corpus texts; returns the document-level dataset prefix."""
    data = tmp_path / "texts.jsonl"
    if not data.exists():
        write_jsonl(str(data), [{"text": t} for t in corpus_texts()[:12]])
    if tokenizer_type == SP and not tokenizer_files:
        tokenizer_files = {"tokenizer_model": sentencepiece_model()}
    config = PreprocessConfig(input=[str(data)], output_prefix=str(prefix),
                              tokenizer_type=tokenizer_type, append_eod=True, log_interval=0,
                              **tokenizer_files)  # fmt: skip
    preprocess(config, log=lambda m: None)
    return f"{prefix}_text_document"


def _gpt2_files() -> dict[str, str]:
    vocab, merges = gpt2_files()
    return {"vocab_file": vocab, "merge_file": merges}


def _sidecar(prefix: str) -> dict:
    with open(prefix + ".tokenizer.json", encoding="utf-8") as f:
        return json.load(f)


def _sha256_of_pieces(pieces: list[str]) -> str:
    text = json.dumps(pieces, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the tokenizer sidecar ------------------------------------------------------------------


def test_preprocessing_writes_a_sidecar_naming_the_tokenizer(tmp_path):
    prefix = _preprocess(tmp_path, tmp_path / "sp")
    sp = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model())
    meta = _sidecar(prefix)
    assert meta["tokenizer_type"] == SP
    assert meta["vocab_size"] == sp.get_piece_size() == 400
    assert meta["eod"] == sp.eos_id()
    assert meta["tokenizer_files"] == {"tokenizer_model": os.path.abspath(sentencepiece_model())}
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert meta["vocab_sha256"] == _sha256_of_pieces(pieces)

    prefix = _preprocess(tmp_path, tmp_path / "gpt2", "GPT2BPETokenizer", **_gpt2_files())
    with open(gpt2_files()[0], encoding="utf-8") as f:
        vocab = json.load(f)
    meta = _sidecar(prefix)
    assert meta["vocab_size"] == len(vocab)
    assert meta["eod"] == vocab["<|endoftext|>"]
    by_id = sorted(vocab, key=vocab.get)
    assert meta["vocab_sha256"] == _sha256_of_pieces(by_id)


def test_same_vocabulary_in_other_files_matches_and_another_one_does_not(tmp_path):
    prefix = _preprocess(tmp_path, tmp_path / "sp")
    config = DataConfig(data_path=[prefix], split="1,0,0", seq_length=16)
    copied = tmp_path / "elsewhere" / "copy.model"
    copied.parent.mkdir()
    shutil.copyfile(sentencepiece_model(), copied)
    saved = build_tokenizer(SP, tokenizer_model=sentencepiece_model()).save(
        str(tmp_path / "saved"))
    for model in (str(copied), saved):
        check_data_paths(config, build_tokenizer(SP, tokenizer_model=model))

    other = build_tokenizer(SP, tokenizer_model=sentencepiece_model(),
                            special_tokens=["<extra>"])  # one token appended: 401 pieces
    with pytest.raises(DatasetPathError) as error:
        check_data_paths(config, other)
    message = str(error.value)
    assert f"data path {prefix!r} was made with SentencePieceTokenizer with 400 tokens" in message
    assert "this run's tokenizer is SentencePieceTokenizer with 401 tokens" in message
    assert "vocabulary sizes differ (400 vs 401)" in message
    # build_gpt_datasets refuses it too, before any index is built.
    with pytest.raises(DatasetPathError, match="vocabulary sizes differ"):
        build_gpt_datasets(config, other, 10, None, None)


def _wordlevel(directory, vocab_size=512, rename=None, eos=None) -> str:
    path = write_wordlevel_tokenizer(str(directory), vocab_size)
    if rename or eos:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        vocab = data["model"]["vocab"]
        for old, new in (rename or {}).items():
            vocab[new] = vocab.pop(old)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        if eos:
            with open(os.path.join(str(directory), "tokenizer_config.json"), "w") as f:
                json.dump({"eos_token": eos}, f)
    return path


def _word_dataset(tmp_path, tokenizer: str) -> str:
    rng = numpy.random.default_rng(3)
    data = tmp_path / "words.jsonl"
    texts = [" ".join(f"t{i}" for i in rng.integers(0, 400, size=int(rng.integers(30, 90))))
             for _ in range(48)]  # fmt: skip
    write_jsonl(str(data), [{"text": t} for t in texts])
    config = PreprocessConfig(input=[str(data)], output_prefix=str(tmp_path / "words"),
                              tokenizer_type=HF, tokenizer_model=tokenizer, append_eod=True,
                              log_interval=0)  # fmt: skip
    preprocess(config, log=lambda m: None)
    return str(tmp_path / "words_text_document")


def _train_flags(prefix: str, tokenizer: str, *extra: str) -> list[str]:
    return TINY_FLAGS + [
        "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", HF,
        "--tokenizer-model", tokenizer, "--micro-batch-size", "2", "--global-batch-size", "4",
        "--eval-iters", "0", "--train-iters", "1", *extra,
    ]  # fmt: skip


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if the trainer gets as far as building an engine (and a model)."""
    from megatron_latent.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "make_engine",
                        lambda *a, **k: pytest.fail("engine built despite bad data"))


def test_training_refuses_data_made_with_another_tokenizer(single_process_parallel, tmp_path,
                                                           no_engine):
    made_with = _wordlevel(tmp_path / "made", 512)
    prefix = _word_dataset(tmp_path, made_with)
    smaller = _wordlevel(tmp_path / "smaller", 448)
    with pytest.raises(ConfigError) as error:
        run_training(_train_flags(prefix, smaller))
    message = str(error.value)
    assert f"data path {prefix!r}" in message
    assert f"{HF} with 512 tokens, eod 511, from tokenizer_model={made_with}" in message
    assert f"{HF} with 448 tokens, eod 447, from tokenizer_model={smaller}" in message

    renamed = _wordlevel(tmp_path / "renamed", 512, rename={"t5": "t5x"})
    with pytest.raises(ConfigError, match=r"the vocabularies differ \(sha256 "):
        run_training(_train_flags(prefix, renamed))
    other_eod = _wordlevel(tmp_path / "other_eod", 512, eos="t3")
    with pytest.raises(ConfigError, match=r"end-of-document ids differ \(511 vs 3\)"):
        run_training(_train_flags(prefix, other_eod))


def test_training_accepts_the_same_tokenizer_stored_differently(single_process_parallel,
                                                                tmp_path, monkeypatch):
    made_with = _wordlevel(tmp_path / "made", 512)
    prefix = _word_dataset(tmp_path, made_with)
    with open(made_with, encoding="utf-8") as f:
        data = json.load(f)
    (tmp_path / "reserialised").mkdir()
    resaved = str(tmp_path / "reserialised" / "tokenizer.json")
    with open(resaved, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4, sort_keys=True)
    assert open(resaved, "rb").read() != open(made_with, "rb").read()
    summary, _ = run_training(_train_flags(prefix, resaved))
    assert summary.iterations == 1


def test_megatron_data_without_sidecar_is_checked_by_token_dtype(single_process_parallel,
                                                                 tmp_path, no_engine):
    uint16 = write_token_dataset(str(tmp_path / "megatron" / "u16"))  # as Megatron-LM writes it
    assert not os.path.exists(uint16 + ".tokenizer.json")
    from megatron_latent.arguments import parse_run_config
    from megatron_latent.training.data import check_data

    def check(prefix, tokenizer):
        run, _ = parse_run_config(_train_flags(prefix, tokenizer))
        check_data(run)

    check(uint16, _wordlevel(tmp_path / "t512", 512))  # no sidecar: nothing else to compare
    check(uint16, _wordlevel(tmp_path / "t65499", 65499))  # still uint16 for Megatron
    wide = _wordlevel(tmp_path / "t65500", 65500)
    with pytest.raises(ConfigError) as error:
        run_training(_train_flags(uint16, wide))
    message = str(error.value)
    assert f"data path {uint16!r} stores tokens as uint16" in message
    assert "has 65500 tokens, which Megatron's preprocessing stores as int32" in message
    assert "made with a vocabulary of fewer than 65500 tokens" in message

    int32 = write_indexed(str(tmp_path / "megatron" / "i32"), [[[5, 6, 7, 511]]] * 8,
                          vocab_size=100_000)  # fmt: skip
    with pytest.raises(ConfigError, match="stores tokens as int32, but this run's tokenizer "
                                          "has 512 tokens, .* as uint16"):
        check(int32, _wordlevel(tmp_path / "t512", 512))


def test_unusable_sidecar_is_named(tmp_path):
    prefix = _preprocess(tmp_path, tmp_path / "sp")
    tokenizer = build_tokenizer(SP, tokenizer_model=sentencepiece_model())
    config = DataConfig(data_path=[prefix], split="1,0,0", seq_length=16)
    path = prefix + ".tokenizer.json"
    meta = _sidecar(prefix)
    for content in ('{"format": "megatron-latent dataset tokenizer", "vers',
                    json.dumps({**meta, "vocab_size": "400"})):  # fmt: skip
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        with pytest.raises(DatasetPathError, match=f"cannot use the tokenizer sidecar {path!r}"):
            check_data_paths(config, tokenizer)


def test_sidecar_commit_never_pairs_new_data_with_an_old_sidecar(tmp_path, monkeypatch):
    prefix = _preprocess(tmp_path, tmp_path / "out")  # SentencePiece, 400 tokens
    real_replace = os.replace

    def failing_at(suffix):
        def replace(src, dst):
            if str(dst).endswith(suffix):
                raise OSError(f"simulated crash moving {dst}")
            return real_replace(src, dst)
        return replace

    for suffix in (".tokenizer.json", ".idx"):
        monkeypatch.setattr(os, "replace", failing_at(suffix))
        with pytest.raises(OSError, match="simulated crash"):
            _preprocess(tmp_path, tmp_path / "out", "GPT2BPETokenizer", **_gpt2_files())
        monkeypatch.setattr(os, "replace", real_replace)
        # No dataset that looks complete: the old sidecar never describes the new tokens.
        with pytest.raises(DatasetPathError, match=r"\.idx' does not exist"):
            read_index_header(prefix)
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".incomplete")]

    _preprocess(tmp_path, tmp_path / "out", "GPT2BPETokenizer", **_gpt2_files())
    assert _sidecar(prefix)["tokenizer_type"] == "GPT2BPETokenizer"


def test_sidecar_is_never_half_written(tmp_path, monkeypatch):
    def fsync_fails(fd):
        raise OSError("simulated disk failure")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="simulated disk failure"):
        _preprocess(tmp_path, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["texts.jsonl"]


def test_merge_carries_the_sidecar_over_only_when_all_inputs_agree(tmp_path):
    a = _preprocess(tmp_path, tmp_path / "a")
    b = _preprocess(tmp_path, tmp_path / "b")
    out = str(tmp_path / "merged")
    counts = merge_datasets([a, b], out)
    assert _sidecar(out) == _sidecar(a)
    assert "tokenizer: SentencePieceTokenizer with 400 tokens" in counts["tokenizer"]

    # An input from Megatron-LM (no sidecar): the output has none, not the stale one.
    megatron = synthetic_dataset(str(tmp_path / "megatron"), 10, 100, 5, 2, seed=1,
                                 vocab_size=400)  # fmt: skip
    counts = merge_datasets([a, megatron], out)
    assert not os.path.exists(out + ".tokenizer.json")
    assert f"1 of 2 inputs have no tokenizer sidecar (first: {megatron})" in counts["tokenizer"]

    gpt2 = _preprocess(tmp_path, tmp_path / "g", "GPT2BPETokenizer", **_gpt2_files())
    with pytest.raises(DatasetPathError, match="made with different tokenizers") as error:
        merge_datasets([a, gpt2], str(tmp_path / "mixed"))
    assert f"{a}: SentencePieceTokenizer" in str(error.value)
    assert f"{gpt2}: GPT2BPETokenizer" in str(error.value)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("mixed")]


def test_inspect_names_the_tokenizer_and_warns_about_another(tmp_path, capsys):
    import importlib.util

    from data_fixtures import TOOLS

    prefix = _preprocess(tmp_path, tmp_path / "sp")
    spec = importlib.util.spec_from_file_location("tool_inspect", f"{TOOLS}/inspect_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    vocab, merges = gpt2_files()
    assert tool.main([prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                      "--merge-file", merges]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "tokenizer: SentencePieceTokenizer with 400 tokens, eod 2" in captured.out
    assert "warning: the dataset was made with another tokenizer" in captured.err
    assert "vocabulary sizes differ (400 vs 600)" in captured.err


# -- .bin/.idx sizes ------------------------------------------------------------------------


def _pair(tmp_path, name: str, documents: int) -> tuple[str, int]:
    """A dataset of ``documents`` documents of 7 tokens; returns (prefix, token count)."""
    prefix = write_indexed(str(tmp_path / name), [[[3, 4, 5, 6, 7, 8, 2]]] * documents,
                           vocab_size=400)  # fmt: skip
    return prefix, 7 * documents


def test_bin_and_idx_sizes_must_agree(tmp_path):
    small, small_tokens = _pair(tmp_path, "small", 3)
    large, large_tokens = _pair(tmp_path, "large", 300)
    header = read_index_header(small)
    assert (header.num_tokens, header.bin_bytes) == (small_tokens, 2 * small_tokens)

    mixed = str(tmp_path / "mixed")
    shutil.copyfile(small + ".idx", mixed + ".idx")
    shutil.copyfile(large + ".bin", mixed + ".bin")
    with pytest.raises(DatasetPathError) as error:
        read_index_header(mixed)
    assert (f"{mixed + '.bin'!r} has {2 * large_tokens} bytes, but {mixed + '.idx'!r} covers "
            f"only {2 * small_tokens} ({small_tokens} tokens of 2 bytes)") in str(error.value)

    cut = str(tmp_path / "cut")
    shutil.copyfile(large + ".idx", cut + ".idx")
    with open(large + ".bin", "rb") as src, open(cut + ".bin", "wb") as dst:
        dst.write(src.read(2 * large_tokens - 10))
    with pytest.raises(DatasetPathError, match=(
            f"{cut + '.bin'!r} has {2 * large_tokens - 10} bytes, but {cut + '.idx'!r} needs "
            f"{2 * large_tokens} .*truncated")):
        read_index_header(cut)
    # Merging would copy the mismatched .bin wholesale: refused, nothing written.
    with pytest.raises(DatasetPathError, match="truncated"):
        merge_datasets([small, cut], str(tmp_path / "merged"))
    assert not os.path.exists(tmp_path / "merged.bin")


@pytest.mark.parametrize("change", ["cut inside", "cut header", "extra bytes"])
def test_truncated_or_padded_index_is_named_with_its_sizes(tmp_path, change):
    prefix, _ = _pair(tmp_path, "ds", 50)
    idx = prefix + ".idx"
    implied = 34 + 50 * (4 + 8) + 51 * 8  # header, lengths, pointers, document bounds
    assert os.path.getsize(idx) == implied
    with open(idx, "rb") as f:
        content = f.read()
    content = {"cut inside": content[:-8], "cut header": content[:20],
               "extra bytes": content + b"\x00" * 8}[change]  # fmt: skip
    with open(idx, "wb") as f:
        f.write(content)
    if change == "cut header":
        expected = f"{idx!r} is truncated: it has 20 bytes, less than the 34-byte header"
    else:
        state = "truncated" if change == "cut inside" else "too long"
        expected = (f"{idx!r} is {state}: it has {len(content)} bytes, but its header "
                    f"(50 sequences, 50 documents) implies {implied}")
    with pytest.raises(DatasetPathError) as error:
        read_index_header(prefix)
    assert expected in str(error.value)


def test_size_checks_read_only_a_few_bytes_of_huge_files(tmp_path):
    """A 40 GB index (sparse): the checks must not read it, only seek."""
    sequences = 1_666_666_666
    prefix = str(tmp_path / "huge")
    idx_size = 34 + sequences * 12 + (sequences + 1) * 8
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, sequences, sequences + 1))
        f.seek(34 + 4 * (sequences - 1))
        f.write(struct.pack("<i", 9))  # last length
        f.seek(34 + 4 * sequences + 8 * (sequences - 1))
        f.write(struct.pack("<q", 2 * 9 * (sequences - 1)))  # last pointer
        f.seek(idx_size - 8)
        f.write(struct.pack("<q", sequences))  # last document ends at the last sequence
    with open(prefix + ".bin", "wb") as f:
        f.truncate(2 * 9 * sequences)
    began = time.time()
    header = read_index_header(prefix)
    assert time.time() - began < 5
    assert header.num_tokens == 9 * sequences and header.idx_bytes == idx_size
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(2 * 9 * sequences + 2)
    with pytest.raises(DatasetPathError, match=f"has {2 * 9 * sequences + 2} bytes"):
        read_index_header(prefix)
    os.remove(prefix + ".idx")
    os.remove(prefix + ".bin")


def test_training_refuses_mismatched_files_before_building_a_model(single_process_parallel,
                                                                   tmp_path, no_engine):
    small = write_token_dataset(str(tmp_path / "small"), num_documents=2)
    large = write_token_dataset(str(tmp_path / "large"), num_documents=64)
    tokenizer = _wordlevel(tmp_path / "tok", 512)
    shutil.copyfile(large + ".bin", small + ".bin")  # a small .idx with a large .bin
    with pytest.raises(ConfigError, match=f"{small + '.bin'!r} has {os.path.getsize(large + '.bin')}"
                                          " bytes, but .* covers only"):
        run_training(_train_flags(small, tokenizer))
    with open(large + ".bin", "r+b") as f:  # a .bin shorter than its .idx
        f.truncate(os.path.getsize(large + ".bin") // 2)
    with pytest.raises(ConfigError, match=f"{large + '.bin'!r} has .* truncated"):
        run_training(_train_flags(large, tokenizer))


# -- cached sample indices ----------------------------------------------------------------


def _cache_files(directory) -> dict[str, int]:
    return {name: os.stat(os.path.join(directory, name)).st_mtime_ns
            for name in os.listdir(directory)}  # fmt: skip


def test_regenerated_dataset_gets_fresh_indices_and_an_unchanged_one_reuses_them(tmp_path):
    tokenizer = build_tokenizer(SP, tokenizer_model=sentencepiece_model())
    eod = tokenizer.eod
    prefix = str(tmp_path / "corpus")
    cache = tmp_path / "cache"
    config = DataConfig(data_path=[prefix], split="1,0,0", seq_length=16,
                        data_cache_path=str(cache))  # fmt: skip
    synthetic_dataset(prefix, 10, 100, 300, eod, seed=1, vocab_size=400)
    train, _, _ = build_gpt_datasets(config, tokenizer, 500, None, None)
    first = [train[i]["tokens"].tolist() for i in range(500)]
    cached = _cache_files(cache)
    assert cached

    train, _, _ = build_gpt_datasets(config, tokenizer, 500, None, None)
    assert [train[i]["tokens"].tolist() for i in range(500)] == first
    assert _cache_files(cache) == cached  # read, not rebuilt

    synthetic_dataset(prefix, 200, 300, 20, eod, seed=2, vocab_size=400)  # same path
    train, _, _ = build_gpt_datasets(config, tokenizer, 500, None, None)
    tokens = numpy.array([train[i]["tokens"].tolist() for i in range(500)])
    assert set(numpy.unique(tokens)) <= set(range(200, 300)) | {eod}
    assert set(_cache_files(cache)) > set(cached)
    descriptions = [name for name in set(_cache_files(cache)) - set(cached)
                    if name.endswith("description.txt")]  # fmt: skip
    assert descriptions
    description = json.loads((cache / descriptions[0]).read_text())
    assert description["data_files"][".bin"]["bytes"] == os.path.getsize(prefix + ".bin")
