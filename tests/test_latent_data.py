"""Latent thoughts: chunking, the prior/posterior formats and tools/make_latent_data.py.

Expected values are written out here independently of the code: the chunking seed formula, the
coin's seed formula, and the token lists of hand-built documents over a tiny word-level
vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import multiprocessing
import os
import re
import sys

import numpy
import pytest

from megatron_latent.data.tokenizers import TokenizerError
from megatron_latent.latent import LATENT_TOKENS, LatentTokenIds, chunking, formats
from megatron_latent.latent.chunking import (
    chunk_document,
    chunk_lengths,
    document_rng,
    elbo_prefix_ids,
    estep_prefix_ids,
    split_units,
    teacher_prefix,
    tokenize_chunks,
    uniform_chunks,
)
from megatron_latent.latent.tokens import latent_token_ids

from data_fixtures import TOOLS, TRICKY_TEXTS, corpus_texts

# -- a tiny word-level tokenizer: ids 0..10, then SoL=11, EoL=12, PRI=13, POS=14 ----------------

WORDS = ["[UNK]", "</s>", "the", "cat", "sat", ".", "dog", "ran", "so", "i", "think"]
T = LatentTokenIds(sol=11, eol=12, pri=13, pos=14)
EOD = 1


def _save_tokenizer(directory, with_latent_tokens=True, bos=False) -> str:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = WORDS + (["<s>"] if bos else [])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if with_latent_tokens:
        tok.add_special_tokens([AddedToken(t, special=True) for t in LATENT_TOKENS])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(str(directory), "tokenizer.json"))
    return str(directory)


def _hf(directory, **kw):
    from megatron_latent.data.tokenizers import HuggingFaceTokenizer

    return HuggingFaceTokenizer(_save_tokenizer(directory, **kw))


# The hand-built document: two chunks and their latents.
TEXT = "the cat sat. the dog ran.\n\nso i think."
CHUNKS = ["the cat sat. the dog ran.", "\n\nso i think."]
X0 = [2, 3, 4, 5, 2, 6, 7, 5]
X1 = [8, 9, 10, 5]
Z0 = [10, 3]
Z1_SAMPLED = [10, 6, 12]  # as sampled: ends with the stopping EoL
PRIOR0 = [11, 13, 10, 3, 12, 2, 3, 4, 5, 2, 6, 7, 5]
POSTERIOR0 = [11, 12, 2, 3, 4, 5, 2, 6, 7, 5, 11, 14, 10, 3, 12]
PRIOR1 = [11, 13, 10, 6, 12, 8, 9, 10, 5]
POSTERIOR1 = [11, 12, 8, 9, 10, 5, 11, 14, 10, 6, 12]


def _doc_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _coins(seed: int, text: str, copy: int, n: int) -> list[bool]:
    """The coin, written out: True = prior."""
    rng = numpy.random.default_rng([seed, _doc_key(text), copy, 0])
    return list(rng.random(n) < 0.5)


def _raw_draw(seed: int, text: str, copy: int, ratio: float) -> bool:
    return bool(numpy.random.default_rng([seed, _doc_key(text), copy, 1]).random() < ratio)


def _expected_document(seed: int, copy: int) -> list[int]:
    c0, c1 = _coins(seed, TEXT, copy, 2)
    return [EOD, *(PRIOR0 if c0 else POSTERIOR0), *(PRIOR1 if c1 else POSTERIOR1), EOD]


# -- chunking ------------------------------------------------------------------------------------

SENTENCES = [f"Sentence number {i} says something short." for i in range(70)]
LONG_TEXT = " ".join(SENTENCES[:30]) + "\n\n" + " ".join(SENTENCES[30:])


def _docs() -> list[str]:
    return [t for t in TRICKY_TEXTS if t] + list(corpus_texts()[:10]) + [LONG_TEXT]


def test_units_concatenate_to_the_text_and_keep_whitespace_with_the_next_unit():
    text = "  Mr. Smith went home. He slept!\nDid he? Yes.\n\n\n  New paragraph here.  End.\n"
    assert split_units(text) == [
        "  Mr. Smith went home.", " He slept!", "\nDid he?", " Yes.",
        "\n\n\n  New paragraph here.", "  End.\n",
    ]
    assert split_units("") == [] and split_units("   ") == ["   "]
    for doc in _docs():
        assert "".join(split_units(doc)) == doc
        assert "".join(chunk_document(doc)) == doc
        assert "".join(uniform_chunks(doc)) == doc


def test_chunk_sizes_follow_the_seeded_poisson_draw():
    units = split_units(LONG_TEXT)
    assert units == [SENTENCES[0]] + [" " + s for s in SENTENCES[1:30]] + [
        "\n\n" + SENTENCES[30]] + [" " + s for s in SENTENCES[31:]]
    # The rule, written out: rng from md5(text) + 42, 1 + Poisson(7) units, at most 20.
    rng = numpy.random.default_rng(
        (int(hashlib.md5(LONG_TEXT.encode()).hexdigest(), 16) + 42) & 0xFFFFFFFF)
    expected, remaining = [], len(units)
    while remaining > 0:
        n = min(int(rng.poisson(7)) + 1, 20, remaining)
        expected.append("".join(units[len(units) - remaining:len(units) - remaining + n]))
        remaining -= n
    assert len(expected) > 5
    assert chunk_document(LONG_TEXT) == expected
    assert chunk_document(LONG_TEXT) == chunk_document(LONG_TEXT)
    # A different text draws differently.
    assert chunk_lengths(70, document_rng(LONG_TEXT)) != chunk_lengths(70, document_rng("x"))


def test_chunk_lengths_are_capped_at_20_and_at_what_remains():
    class Always:
        def __init__(self, value):
            self.value = value

        def poisson(self, lam):
            assert lam == 7
            return self.value

    assert chunk_lengths(50, Always(30)) == [20, 20, 10]
    assert chunk_lengths(5, Always(0)) == [1, 1, 1, 1, 1]
    assert chunk_lengths(0, Always(3)) == []
    for doc in _docs():
        n = len(split_units(doc))
        lengths = chunk_lengths(n, document_rng(doc))
        assert sum(lengths) == n and all(1 <= k <= 20 for k in lengths)


def test_uniform_chunks_use_linspace_boundaries():
    units = split_units(LONG_TEXT)  # 70 units: ceil(70 / 8) = 9 chunks
    bounds = [0, 7, 15, 23, 31, 38, 46, 54, 62, 70]  # linspace(0, 70, 10) cast to int
    assert uniform_chunks(LONG_TEXT) == ["".join(units[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert len(uniform_chunks("One. Two. Three.")) == 1
    assert uniform_chunks("") == []


def _chunk_all(docs):
    return [chunk_document(d) for d in docs]


def test_chunks_do_not_depend_on_order_or_worker_split():
    docs = _docs()
    whole = _chunk_all(docs)
    halves = _chunk_all(docs[len(docs) // 2:]) + _chunk_all(docs[:len(docs) // 2])
    assert halves[len(docs) - len(docs) // 2:] + halves[:len(docs) - len(docs) // 2] == whole
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(2) as pool:
        pooled = pool.map(chunk_document, list(reversed(docs)), chunksize=1)
    assert list(reversed(pooled)) == whole


def test_prefix_rules(tmp_path):
    chunks = ["A.", " B.", " C.", " D.", " E."]
    assert teacher_prefix(chunks, 0) == "N/A"
    assert teacher_prefix(chunks, 3) == " C."
    ids = [[1], [2, 2], [3], [4, 4, 4], [5]]
    assert estep_prefix_ids(ids, 0) == []
    assert estep_prefix_ids(ids, 1) == [1]
    assert estep_prefix_ids(ids, 3) == [1, 2, 2, 3]
    assert estep_prefix_ids(ids, 4) == [2, 2, 3, 4, 4, 4]
    assert elbo_prefix_ids(ids, 4) == [1, 2, 2, 3, 4, 4, 4]
    with pytest.raises(IndexError):
        teacher_prefix(chunks, 5)
    tok = _hf(tmp_path / "tok")
    assert tokenize_chunks(tok, CHUNKS) == [X0, X1]  # no BOS/EOS
    with pytest.raises(ValueError, match="chunk 1's text tokenises into reserved id"):
        tokenize_chunks(tok, ["the cat", "<|END_OF_LATENT|> so"], T.as_tuple())


# -- formats -------------------------------------------------------------------------------------


def test_prior_and_posterior_forms_by_hand():
    assert formats.prior_form(Z0, X0, T) == PRIOR0
    assert formats.posterior_form(Z0, X0, T) == POSTERIOR0
    # A latent with its stopping EoL and one cut at the cap (no EoL) are wrapped alike.
    assert formats.prior_form(Z1_SAMPLED, X1, T) == formats.prior_form([10, 6], X1, T) == PRIOR1
    assert formats.posterior_form(Z1_SAMPLED, X1, T) == POSTERIOR1
    assert formats.prior_only_form(Z0, X1, T) == [11, 10, 3, 12, 8, 9, 10, 5]
    assert formats.posterior_only_form(Z0, X1, T) == [8, 9, 10, 5, 11, 10, 3, 12]
    assert formats.prior_form([], X1, T) == [11, 13, 12, 8, 9, 10, 5]
    with pytest.raises(formats.FormatError, match="end-of-latent"):
        formats.prior_form([10, 12, 3], X1, T)
    body = formats.format_chunks([X0, X1], [Z0, Z1_SAMPLED], ["posterior", "prior"], T)
    assert body == POSTERIOR0 + PRIOR1
    with pytest.raises(formats.FormatError, match="each chunk needs one latent"):
        formats.format_chunks([X0, X1], [Z0], ["prior", "prior"], T)


def test_augmented_document_by_hand():
    key = _doc_key(TEXT)
    assert formats.document_hash(TEXT) == key
    seen = set()
    for copy in range(8):
        doc = formats.augmented_document([X0, X1], [Z0, Z1_SAMPLED], T, 7, key, copy,
                                         start_id=EOD, eod_id=EOD)
        assert doc == _expected_document(7, copy)
        seen.add(tuple(doc))
    assert len(seen) > 1  # the copies draw their own coins
    assert formats.raw_document([X0, X1], start_id=EOD, eod_id=EOD) == [EOD, *X0, *X1, EOD]
    only = formats.augmented_document([X0, X1], [Z0, Z1_SAMPLED], T, 7, key, 0, start_id=0,
                                      eod_id=EOD, latent_type="posterior_only")
    assert only == [0, *X0, 11, 10, 3, 12, *X1, 11, 10, 6, 12, EOD]


def test_coin_depends_on_seed_document_and_copy_only():
    n = 64
    a = formats.prior_coins(3, 12345, 0, n)
    assert a == _coins_from_key(3, 12345, 0, n)
    assert a == formats.prior_coins(3, 12345, 0, n)  # no hidden state
    assert formats.prior_coins(3, 12345, 0, 10) == a[:10]  # same draws for fewer chunks
    assert a != formats.prior_coins(3, 12345, 1, n)  # copies differ
    assert a != formats.prior_coins(4, 12345, 0, n)  # seeds differ
    assert a != formats.prior_coins(3, 12346, 0, n)  # documents differ
    assert 16 < sum(a) < 48
    # Interleaving other documents' draws changes nothing.
    formats.prior_coins(3, 999, 0, n)
    assert formats.prior_coins(3, 12345, 0, n) == a
    with pytest.raises(formats.FormatError):
        formats.prior_coins(-1, 1, 0, 2)


def _coins_from_key(seed, key, copy, n):
    return list(numpy.random.default_rng([seed, key, copy, 0]).random(n) < 0.5)


def test_start_token_and_latent_ids(tmp_path):
    plain = _hf(tmp_path / "plain")
    assert formats.document_start_id(plain) == EOD  # no BOS: documents start with EOD
    with_bos = _hf(tmp_path / "bos", bos=True)
    assert formats.document_start_id(with_bos) == 11  # "<s>"
    assert latent_token_ids(plain) == T
    assert latent_token_ids(with_bos) == LatentTokenIds.after(12)
    bare = _hf(tmp_path / "bare", with_latent_tokens=False)
    with pytest.raises(TokenizerError, match="tools/add_latent_tokens.py"):
        latent_token_ids(bare)


# -- the tool ------------------------------------------------------------------------------------


@functools.cache
def _tool():
    path = os.path.join(TOOLS, "make_latent_data.py")
    spec = importlib.util.spec_from_file_location("tool_make_latent_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _write(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _run(tmp_path, records, *extra, name="out"):
    tool_dir = tmp_path / "tok"
    if not (tool_dir / "tokenizer.json").exists():
        _save_tokenizer(tool_dir)
    data = _write(tmp_path / "in.jsonl", records)
    prefix = str(tmp_path / name)
    rc = _tool().main([
        "--input", data, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tool_dir), "--log-interval", "0", *extra,
    ])
    return rc, prefix, data


def _read(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # kept alive while the rows are copied
    rows = [dataset[i].tolist() for i in range(len(dataset))]
    del dataset
    return rows


def _record(**kw):
    base = {"id": "d0", "text": TEXT, "chunks": CHUNKS, "latent_ids": [Z0, Z1_SAMPLED]}
    base.update(kw)
    return base


def test_tool_writes_the_hand_computed_documents(tmp_path, capsys):
    other = "so the cat ran."
    records = [_record(), {"text": other, "latent_text": ["i think so"]}]
    rc, prefix, _ = _run(tmp_path, records, "--copies", "3", "--seed", "5")
    assert rc == 0, capsys.readouterr().err
    rows = _read(prefix)
    other_expected = []
    for copy in range(3):
        prior = _coins(5, other, copy, 1)[0]
        z, x = [9, 10, 8], [8, 2, 3, 7, 5]
        other_expected.append(
            [EOD, *([11, 13, *z, 12, *x] if prior else [11, 12, *x, 11, 14, *z, 12]), EOD])
    assert rows == [_expected_document(5, c) for c in range(3)] + other_expected
    sidecar = json.loads((tmp_path / "out.tokenizer.json").read_text())
    assert sidecar["vocab_size"] == 15 and sidecar["eod"] == EOD
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.bin", "out.idx",
                                            "out.tokenizer.json", "tok"]
    # Same inputs, other order: every document's copies are the same.
    rc, prefix, _ = _run(tmp_path, records[::-1], "--copies", "3", "--seed", "5", name="rev")
    assert rc == 0
    assert _read(prefix) == other_expected + rows[:3]


def test_tool_chunks_the_text_when_no_chunks_are_given(tmp_path):
    text = "the cat sat. the dog ran. so i think."
    chunks = chunk_document(text)
    record = {"text": text, "latent_ids": [[10]] * len(chunks)}
    rc, prefix, _ = _run(tmp_path, [record], "--latent-type", "prior_only")
    assert rc == 0
    tok = _hf(tmp_path / "check")
    body = [t for x in tokenize_chunks(tok, chunks) for t in (11, 10, 12, *x)]
    assert _read(prefix) == [[EOD, *body, EOD]]


def test_tool_mixes_raw_documents(tmp_path):
    texts = [f"the cat sat. {' '.join(['the dog ran.'] * k)}" for k in range(1, 13)]
    records = [{"text": t, "chunks": [t], "latent_ids": [[10]]} for t in texts]
    tok = _hf(tmp_path / "check")
    raw = [[EOD, *tok.tokenize(t), EOD] for t in texts]
    rc, prefix, _ = _run(tmp_path, records, "--copies", "2", "--mix-raw-ratio", "1", name="all")
    assert rc == 0 and _read(prefix) == [r for r in raw for _ in range(2)]
    rc, prefix, _ = _run(tmp_path, records, "--copies", "2", name="none")
    assert rc == 0 and all(r[1] == 11 for r in _read(prefix))
    rc, prefix, _ = _run(tmp_path, records, "--copies", "2", "--mix-raw-ratio", "0.5",
                         "--seed", "9", name="half")
    assert rc == 0
    rows = _read(prefix)
    flags = [_raw_draw(9, t, c, 0.5) for t in texts for c in range(2)]
    assert 0 < sum(flags) < len(flags)
    for row, flag, t in zip(rows, flags, [t for t in texts for _ in range(2)]):
        assert (row == raw[texts.index(t)]) == flag
        assert (row[1] == 11) == (not flag)


@pytest.mark.parametrize("line, message", [
    ("{not json", "malformed JSON"),
    (json.dumps(_record(chunks=["the cat sat.", " so"])), "do not concatenate to 'text'"),
    (json.dumps(_record(latent_ids=[Z0])), "one entry per chunk: 2 chunks"),
    (json.dumps(_record(latent_ids=[Z0, [10, 99]])), r"holds 99, not a token id in \[0, 15\)"),
    (json.dumps(_record(latent_ids=[Z0, [12, 10]])), "end-of-latent id 12 at position 0"),
    (json.dumps(_record(latent_text=["a", "b"])), "exactly one of 'latent_ids' and"),
    (json.dumps({"text": "the <|PRIOR_PREFIX|> cat", "latent_ids": [[10]]}),
     "reserved id"),
    (json.dumps({"text": "  ", "latent_ids": []}), "empty document"),
])
def test_tool_refuses_bad_input_naming_file_and_line(tmp_path, capsys, line, message):
    rc, prefix, data = _run(tmp_path, [_record(), line])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{data}:2: " in err and "error:" in err
    assert re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "tok"]  # nothing written


def test_tool_refuses_bad_settings(tmp_path, capsys):
    rc, _, _ = _run(tmp_path, [_record()], "--copies", "0")
    assert rc == 1 and "--copies" in capsys.readouterr().err
    rc, _, _ = _run(tmp_path, [_record()], "--mix-raw-ratio", "1.5")
    assert rc == 1 and "--mix-raw-ratio" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "tok"]


def test_module_constants_match_the_notes():
    assert (chunking.MEAN_UNITS_PER_CHUNK, chunking.MAX_UNITS_PER_CHUNK, chunking.CHUNK_SEED,
            chunking.ESTEP_PREFIX_CHUNKS) == (8, 20, 42, 3)
