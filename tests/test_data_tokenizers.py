"""Tokenizers against independent references, special tokens, save/load, factory errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import sentencepiece

from megatron_latent.config import ConfigError
from megatron_latent.data.hf_tokenizer_export import (
    export_hf_tokenizer,
    sentencepiece_to_tokenizers,
)
from megatron_latent.data.tokenizer_args import RESERVED_SPECIAL_TOKENS, TOKENIZER_TYPE_NAMES
from megatron_latent.data.tokenizers import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
)

from data_fixtures import (
    REPO,
    TRICKY_TEXTS,
    ReferenceGPT2BPE,
    corpus_texts,
    gpt2_files,
    hf_tokenizer_dir,
    sentencepiece_model,
    write_jsonl,
)
from training_fixtures import TINY_FLAGS

SAMPLES = TRICKY_TEXTS + list(corpus_texts()[:5])


def _sp():
    return build_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model())


def _gpt2():
    vocab, merges = gpt2_files()
    return build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)


def _hf():
    return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_tokenizer_dir())


def test_sentencepiece_matches_the_library_and_round_trips():
    tok = _sp()
    ref = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model())
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == ref.get_piece_size() == 400
    for text in SAMPLES:
        assert tok.tokenize(text) == ref.encode(text)
        # The trained model is lossless: identity normalization, whitespace and bytes kept.
        assert tok.detokenize(tok.tokenize(text)) == text
    assert (tok.eod, tok.bos, tok.pad, tok.unk) == (ref.eos_id(), ref.bos_id(), 3, 0) == (2, 1, 3, 0)
    assert tok.vocab["</s>"] == 2 and tok.inv_vocab[2] == "</s>"


def test_reserved_special_tokens_have_ids_and_stay_whole():
    tok = _sp()
    ids = [tok.special_tokens[t] for t in RESERVED_SPECIAL_TOKENS]
    assert ids == [4, 5, 6]
    text = "He thinks<thought>to be</thought> or not.<sent>Next"
    encoded = tok.tokenize(text)
    assert [i for i in encoded if i in ids] == [4, 5, 6]
    assert tok.detokenize(encoded) == text
    # Adding a token the model already has changes nothing.
    assert tok.add_special_tokens(["<thought>"]) == [4]
    assert tok.vocab_size == 400


def test_sentencepiece_added_token_is_appended_and_survives_save_load(tmp_path):
    tok = _sp()
    ref = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model())
    (new_id,) = tok.add_special_tokens(["<latent>"])
    assert new_id == 400 and tok.vocab_size == 401
    text = "Before <latent> after<latent>"
    ids = tok.tokenize(text)
    # Text between special tokens is encoded by the model as it is.
    assert ids == ref.encode("Before ") + [400] + ref.encode(" after") + [400]
    assert tok.detokenize(ids) == text
    assert tok.tokenize_with_offsets(text)[0] == ids

    saved = tok.save(str(tmp_path / "tok"))
    for loaded in (
        load_tokenizer(saved),
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=saved),
    ):
        assert loaded.vocab_size == 401
        assert loaded.special_tokens["<latent>"] == 400
        assert loaded.tokenize(text) == ids
        assert loaded.unique_identifiers["special_tokens"] == ["<latent>"]
    with pytest.raises(TokenizerError, match="holds a SentencePieceTokenizer, not a GPT2BPE"):
        build_tokenizer("GPT2BPETokenizer", tokenizer_model=saved)


def test_gpt2_bpe_matches_a_plain_python_reference_and_transformers():
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_files()
    tok = _gpt2()
    reference = ReferenceGPT2BPE(vocab, merges)
    hf = GPT2Tokenizer(vocab, merges)  # what Megatron-LM's GPT2BPETokenizer wraps
    assert isinstance(tok, GPT2BPETokenizer)
    for text in SAMPLES + ["end<|endoftext|>start", "x\u00a0y \u3000z"]:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text), text
        assert ids == hf.encode(text), text
        assert tok.detokenize(ids) == text
    eod = json.load(open(vocab))["<|endoftext|>"]
    assert tok.eod == eod and tok.special_tokens == {"<|endoftext|>": eod}
    assert tok.vocab_size == len(hf) == 600
    assert tok.pad == -1  # GPT-2 has no pad token


def test_gpt2_added_special_token_survives_save_load(tmp_path):
    tok = _gpt2()
    assert tok.add_special_tokens(RESERVED_SPECIAL_TOKENS) == [600, 601, 602]
    text = "a<thought>b </thought> c<sent>"
    ids = tok.tokenize(text)
    assert 600 in ids and 601 in ids and 602 in ids
    assert tok.detokenize(ids) == text
    loaded = load_tokenizer(tok.save(str(tmp_path / "gpt2")))
    assert isinstance(loaded, GPT2BPETokenizer)
    assert loaded.vocab_size == 603 and loaded.tokenize(text) == ids
    assert sorted(os.listdir(tmp_path / "gpt2")) == [
        "megatron_latent_tokenizer.json",
        "merges.txt",
        "vocab.json",
    ]


def test_huggingface_tokenizer_json_matches_the_library_without_bos():
    from tokenizers import Tokenizer

    directory = hf_tokenizer_dir()
    raw = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tok = _hf()
    assert isinstance(tok, HuggingFaceTokenizer)
    for text in SAMPLES:
        with_bos = raw.encode(text).ids
        ids = tok.tokenize(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert with_bos == [raw.token_to_id("<s>")] + ids  # the post-processor is not applied
    # Named tokens come from tokenizer_config.json.
    assert tok.eod == raw.token_to_id("</s>")
    assert tok.bos == raw.token_to_id("<s>")
    assert tok.pad == raw.token_to_id("<pad>")
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)


def test_huggingface_without_eos_needs_an_explicit_eod_token(tmp_path):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(hf_tokenizer_dir(), "tokenizer.json"))
    raw.save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json, no usual EOS name
    # "</s>" is a common name, so the fallback finds it; a tokenizer without it has no EOD.
    assert HuggingFaceTokenizer(str(tmp_path)).eod == raw.token_to_id("</s>")
    vocab_only = tmp_path / "bare"
    vocab_only.mkdir()
    from tokenizers import models

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[X]": 2}, unk_token="[X]"))
    bare.save(str(vocab_only / "tokenizer.json"))
    tok = HuggingFaceTokenizer(str(vocab_only))
    with pytest.raises(TokenizerError, match="no end-of-document token.*--eod-token"):
        tok.eod  # noqa: B018
    assert HuggingFaceTokenizer(str(vocab_only), eod_token="[X]").eod == 2
    with pytest.raises(TokenizerError, match="'<eos>' is not in"):
        HuggingFaceTokenizer(str(vocab_only), eod_token="<eos>")


def test_huggingface_added_tokens_survive_save_load(tmp_path):
    tok = _hf()
    base = tok.vocab_size
    assert tok.add_special_tokens(["<thought>", "</thought>"]) == [base, base + 1]
    text = "to be<thought>or not</thought>"
    ids = tok.tokenize(text)
    assert ids.count(base) == 1 and ids.count(base + 1) == 1
    loaded = load_tokenizer(tok.save(str(tmp_path / "hf")))
    assert loaded.tokenize(text) == ids
    assert loaded.eod == tok.eod and loaded.pad == tok.pad


@pytest.mark.parametrize("make", [_sp, _gpt2, _hf])
def test_offsets_give_the_same_ids_and_cover_the_text(make):
    tok = make()
    for text in SAMPLES:
        ids, spans = tok.tokenize_with_offsets(text)
        assert ids == tok.tokenize(text)
        assert len(spans) == len(ids)
        starts = [s for s, _ in spans]
        assert starts == sorted(starts)
        assert all(0 <= s <= e <= len(text) for s, e in spans)


def test_factory_errors_name_the_problem(tmp_path):
    with pytest.raises(TokenizerError) as err:
        build_tokenizer("BertWordPieceCase")
    message = str(err.value)
    assert "unknown tokenizer type 'BertWordPieceCase'" in message
    for name in TOKENIZER_TYPE_NAMES:
        assert name in message
    missing = str(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match=f"--tokenizer-model: '{missing}' does not exist"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=missing)
    with pytest.raises(TokenizerError, match="SentencePieceTokenizer needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    vocab, _ = gpt2_files()
    with pytest.raises(TokenizerError, match="--merge-file: '.*merges.missing' does not exist"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=vocab, merge_file=str(tmp_path / "merges.missing")
        )
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(garbage))


def test_usable_as_megatron_core_dataset_tokenizer():
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    tok = _sp()
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=16,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    assert config.token_dtype_code == 8  # uint16, from vocab_size
    description = json.dumps({"t": tok}, default=lambda o: o.unique_identifiers)
    assert "sp_tiny.model" in description
    assert tok.special_tokens_dict == {"bos_token": 1, "eos_token": 2, "pad_token": 3, "unk_token": 0}


# -- a file of the wrong kind is one line naming the file and what it should be --------------


def _wrong_files(tmp_path) -> dict[str, str]:
    files = {
        "text": ("notes.txt", "To be, or not to be\n"),
        "json": ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nonsense"}}'),
        "merges": ("merges.txt", "#version: 0.2\nthis line has three\n"),
    }
    paths = {}
    for key, (name, content) in files.items():
        paths[key] = str(tmp_path / name)
        with open(paths[key], "w") as f:
            f.write(content)
    return paths


def test_files_of_the_wrong_kind_are_one_line_config_errors(tmp_path):
    bad = _wrong_files(tmp_path)
    vocab, merges = gpt2_files()
    cases = [
        (("SentencePieceTokenizer", bad["text"], None, None),
         ["--tokenizer-model", bad["text"], "is not a SentencePiece model", ".model"]),
        (("SentencePieceTokenizer", bad["json"], None, None),
         [bad["json"], "is not a SentencePiece model", "--tokenizer-type HuggingFaceTokenizer"]),
        (("HuggingFaceTokenizer", bad["json"], None, None),
         ["--tokenizer-model", bad["json"], "is not a Hugging Face tokenizer.json"]),
        (("HuggingFaceTokenizer", sentencepiece_model(), None, None),
         [sentencepiece_model(), "is not a Hugging Face tokenizer.json"]),
        (("GPT2BPETokenizer", None, vocab, None), ["GPT2BPETokenizer needs --merge-file"]),
        (("GPT2BPETokenizer", None, bad["text"], merges),
         ["--vocab-file", bad["text"], "is not a GPT-2 vocab.json"]),
        (("GPT2BPETokenizer", None, vocab, bad["merges"]),
         ["--merge-file", bad["merges"], "is not a GPT-2 merges.txt"]),
    ]
    for (kind, model, vocab_file, merge_file), expected in cases:
        with pytest.raises(ConfigError) as err:
            build_tokenizer(kind, tokenizer_model=model, vocab_file=vocab_file,
                            merge_file=merge_file)
        message = str(err.value)
        assert "\n" not in message, message
        for part in expected:
            assert part in message, (part, message)


def test_pretrain_reports_a_wrong_tokenizer_file_in_one_line(tmp_path):
    bad = _wrong_files(tmp_path)["json"]
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "pretrain.py"), *TINY_FLAGS, "--mock-data",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
         "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", bad],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        f"pretrain.py: error: --tokenizer-model '{bad}' is not a SentencePiece model")


def test_preprocess_data_reports_a_wrong_tokenizer_file_in_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    corpus = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": "hello"}])
    bad = _wrong_files(tmp_path)["text"]
    assert tool.main(["--input", corpus, "--output-prefix", str(tmp_path / "out"),
                      "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", bad]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"'{bad}' is not a Hugging Face tokenizer.json" in error


# -- Hugging Face export ---------------------------------------------------------------------

EXPORT_TEXTS = SAMPLES + [
    "Ünïcödé 😀🚀 中文 한국어 ∑ ☃", "a<sent>b", "<thought>x</thought>", "x <sent> y", "a\u2581b",
    "end</s>",
]


def _sentencepiece(tmp_path, model_type: str, normalization: str, byte_fallback: bool) -> str:
    from megatron_latent.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_sentencepiece,
    )

    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), [{"text": t} for t in corpus_texts()])
    config = TokenizerTrainingConfig(
        input=[corpus], output_prefix=str(tmp_path / "sp"), vocab_size=400,
        model_type=model_type, normalization=normalization, byte_fallback=byte_fallback,
        threads=1)
    return train_sentencepiece(config, log=lambda m: None)


@pytest.mark.parametrize("model_type,normalization,byte_fallback", [
    ("bpe", "identity", True), ("unigram", "identity", True), ("bpe", "nmt_nfkc", True),
    ("bpe", "identity", False)])
def test_sentencepiece_as_tokenizers_encodes_like_the_library(tmp_path, model_type,
                                                              normalization, byte_fallback):
    model = (sentencepiece_model() if (model_type, normalization, byte_fallback)
             == ("bpe", "identity", True)
             else _sentencepiece(tmp_path, model_type, normalization, byte_fallback))
    reference = sentencepiece.SentencePieceProcessor(model_file=model)
    converted = sentencepiece_to_tokenizers(model)
    texts = list(EXPORT_TEXTS)
    # Every piece alone, inside text and right after a user-defined piece.
    for i in range(reference.get_piece_size()):
        if not (reference.is_control(i) or reference.is_unknown(i) or reference.is_byte(i)):
            piece = reference.id_to_piece(i).replace("\u2581", " ")
            texts += [piece, f"x{piece}y", f"<sent>{piece}"]
    for text in texts:
        if text.endswith("</s>"):
            continue  # a named special token written out: transformers' convention differs
        ids = converted.encode(text).ids
        assert ids == reference.encode(text), text
        if byte_fallback:
            assert converted.decode(ids) == reference.decode(ids), text


def test_gpt2_export_encodes_like_gpt2_in_autotokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges = gpt2_files()
    folder = tmp_path / "hf"
    ids = export_hf_tokenizer(_gpt2(), str(folder), model_max_length=64)
    assert (folder / "vocab.json").read_bytes() == open(vocab, "rb").read()
    assert (folder / "merges.txt").read_bytes() == open(merges, "rb").read()
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    reference = ReferenceGPT2BPE(vocab, merges)
    for text in EXPORT_TEXTS:
        encoded = auto(text)["input_ids"]
        assert encoded == reference.encode(text), text
        assert auto.decode(encoded) == text
    eod = json.load(open(vocab))["<|endoftext|>"]
    assert ids["eos_token_id"] == ids["bos_token_id"] == auto.eos_token_id == eod
    assert ids["pad_token_id"] is None and auto.model_max_length == 64
