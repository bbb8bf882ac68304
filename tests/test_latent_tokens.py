"""megatron_latent.latent.tokens and tools/add_latent_tokens.py: the four latent-thought tokens
appended to HF and SentencePiece tokenizers, and a checkpoint grown to match (old rows
bit-identical, new rows N(0, d^-0.5) clamped to +-3 sigma with seed 42, padding consistent),
which loads for inference with the same logits and trains on."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_latent.config import ConfigError, ModelConfig
from megatron_latent.data.tokenizers import TokenizerError, build_tokenizer
from megatron_latent.latent import LATENT_TOKENS, LatentTokenIds
from megatron_latent.latent.tokens import (
    add_latent_tokens_to_tokenizer,
    grow_checkpoint,
    latent_token_ids,
)
from megatron_latent.methods.registry import get_method
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.training import checkpointing
from megatron_latent.training.config import RunConfig

from data_fixtures import TRICKY_TEXTS, corpus_texts, hf_tokenizer_dir
from data_fixtures import sentencepiece_model as tiny_sentencepiece_model
from training_fixtures import TINY_FLAGS, run_training, write_wordlevel_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EMB, HEAD = "embedding.word_embeddings.weight", "output_layer.weight"
#: 126 ids: + 4 crosses the padding boundary (128 -> 192 at TP=1, 128 -> 256 at TP=2).
WORD_VOCAB = 126
CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=WORD_VOCAB,
                     seq_length=32, make_vocab_size_divisible_by=64)


def tool():
    spec = importlib.util.spec_from_file_location("add_latent_tokens",
                                                  ROOT / "tools" / "add_latent_tokens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_rows(hidden: int, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """The notes' initialisation, computed here independently of the module."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    std = 1.0 / hidden ** 0.5
    embedding = torch.clamp(torch.randn(4, hidden, generator=generator) * std, -3 * std, 3 * std)
    head = torch.clamp(torch.randn(4, hidden, generator=generator) * std, -3 * std, 3 * std)
    return embedding, head


def write_checkpoint(root: Path, tokenizer: str, config: ModelConfig = CONFIG, tp: int = 1,
                     method: str = "vanilla", method_args: dict | None = None) -> dict:
    """A random-weight checkpoint (padding rows random too, to see where they go)."""
    spec = get_method(method)
    if method_args is None:  # the method's flag defaults, as a run stores them
        probe = argparse.ArgumentParser(add_help=False)
        spec.add_arguments(probe.add_argument_group("probe"))
        method_args = vars(probe.parse_args([]))
    options = spec.options_from_args(argparse.Namespace(**method_args))
    prepared = spec.prepare_model_config(config, options)
    model = spec.build_model(prepared, None, "cpu", options, True, True)
    generator = torch.Generator().manual_seed(3)
    weights = {name: 0.3 * torch.randn(t.shape, generator=generator)
               + (1.0 if name.endswith("norm.weight") else 0.0)
               for name, t in mapping.model_to_canonical(model).items()}
    assert weights[EMB].shape[0] == prepared.padded_vocab_size(1)
    if tp > 1:
        weights = mapping.resize_vocab_rows(weights, prepared.padded_vocab_size(tp))
        generator = torch.Generator().manual_seed(4)
        for name in (EMB, HEAD):  # random padding rows, not zeros
            weights[name][prepared.padded_vocab_size(1):] = torch.randn(
                weights[name][prepared.padded_vocab_size(1):].shape, generator=generator)
    run = RunConfig(model=config, method=method, method_args=method_args).to_dict()
    run["parallel"]["tensor_model_parallel_size"] = tp
    run["tokenizer"].update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer)
    checkpointing.write_weights_checkpoint(str(root), weights, run, tensor_parallel_size=tp)
    return weights


@pytest.fixture(scope="module")
def word_setup(single_process_parallel, tmp_path_factory):
    """(old tokenizer, grown tokenizer, old checkpoint, grown checkpoint, old weights)."""
    root = tmp_path_factory.mktemp("latent")
    old_tok = write_wordlevel_tokenizer(str(root / "tok"), WORD_VOCAB)
    new_tok = str(root / "tok_latent" / "tokenizer.json")
    weights = write_checkpoint(root / "ckpt", old_tok)
    assert tool().main(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", old_tok,
                        "--output-tokenizer", new_tok, "--load", str(root / "ckpt"),
                        "--save", str(root / "grown")]) == 0
    return old_tok, new_tok, root / "ckpt", root / "grown", weights


# -- tokenizers ------------------------------------------------------------------------------
ORDINARY = list(TRICKY_TEXTS) + list(corpus_texts()[:6]) + ["<|START_OF", "LATENT|> <|", "|>"]


def _check_grown_tokenizer(kind: str, old_path: str, new_path: str) -> None:
    old = build_tokenizer(kind, tokenizer_model=old_path)
    new = build_tokenizer(kind, tokenizer_model=new_path)
    base = old.vocab_size
    assert new.vocab_size == base + 4
    assert latent_token_ids(new) == LatentTokenIds.after(base)
    assert [new.token_to_id(t) for t in LATENT_TOKENS] == list(range(base, base + 4))
    assert new.eod == old.eod
    for text in ORDINARY:
        ids = new.tokenize(text)
        assert ids == old.tokenize(text)
        assert max(ids, default=0) < base  # the new tokens never come from ordinary text
        assert new.detokenize(ids) == old.detokenize(ids)
    # the four tokens are single, unsplit ids (they enter as ids; their text maps back);
    # SentencePiece may put its dummy-prefix piece first
    assert new.tokenize("".join(LATENT_TOKENS))[-4:] == list(range(base, base + 4))
    assert new.detokenize(list(range(base, base + 4))) == "".join(LATENT_TOKENS)


def test_hf_tokenizer_gets_the_four_tokens(tmp_path):
    source = hf_tokenizer_dir()  # Unigram with a tokenizer_config.json naming EOS </s>
    out = tmp_path / "hf_latent"  # a directory: tokenizer.json written into it
    result = add_latent_tokens_to_tokenizer(source, "HuggingFaceTokenizer", str(out))
    assert result.output_path == str(out / "tokenizer.json")
    assert (out / "tokenizer_config.json").is_file()
    assert not result.already_present
    _check_grown_tokenizer("HuggingFaceTokenizer", source, str(out))
    assert result.ids == LatentTokenIds.after(result.base_vocab_size)


def test_sentencepiece_tokenizer_gets_the_four_tokens(tmp_path):
    import sentencepiece

    source = tiny_sentencepiece_model()
    out = tmp_path / "sp_latent.model"
    result = add_latent_tokens_to_tokenizer(source, "SentencePieceTokenizer", str(out))
    _check_grown_tokenizer("SentencePieceTokenizer", source, str(out))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(out))
    base = result.base_vocab_size
    assert processor.get_piece_size() == base + 4
    assert [processor.id_to_piece(base + k) for k in range(4)] == list(LATENT_TOKENS)
    assert all(processor.is_control(base + k) is False for k in range(4))


def test_tokenizers_already_holding_the_tokens(tmp_path):
    source = tiny_sentencepiece_model()
    once = tmp_path / "once.model"
    first = add_latent_tokens_to_tokenizer(source, "SentencePieceTokenizer", str(once))
    again = add_latent_tokens_to_tokenizer(str(once), "SentencePieceTokenizer",
                                           str(tmp_path / "twice.model"))
    assert again.already_present and again.ids == first.ids
    assert (tmp_path / "twice.model").read_bytes() == once.read_bytes()

    # one of the four at some other id: refused, naming it
    from tokenizers import AddedToken, Tokenizer

    path = write_wordlevel_tokenizer(str(tmp_path / "w"), 50)
    tok = Tokenizer.from_file(path)
    tok.add_special_tokens([AddedToken("<|END_OF_LATENT|>", special=True)])
    tok.save(str(tmp_path / "w" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"<\|END_OF_LATENT\|>=50"):
        add_latent_tokens_to_tokenizer(path, "HuggingFaceTokenizer", str(tmp_path / "o.json"))
    with pytest.raises(TokenizerError, match="not consecutive"):
        latent_token_ids(build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path,
                                         special_tokens=["<|START_OF_LATENT|>",
                                                         "<|PRIOR_PREFIX|>",
                                                         "<|POSTERIOR_PREFIX|>"]))
    with pytest.raises(TokenizerError, match="lacks the latent token"):
        latent_token_ids(build_tokenizer("SentencePieceTokenizer", tokenizer_model=source))


# -- checkpoints -----------------------------------------------------------------------------
def test_grown_checkpoint_rows(word_setup):
    _, new_tok, _, grown_dir, old = word_setup
    full, stored, iteration = checkpointing.load_full_model_state(str(grown_dir))
    v, h = WORD_VOCAB, CONFIG.hidden_size
    new_rows = CONFIG.replace(vocab_size=v + 4).padded_vocab_size(1)
    assert new_rows == 192 and old[EMB].shape[0] == 128
    embedding, head = expected_rows(h)
    for name, rows in ((EMB, embedding), (HEAD, head)):
        assert full[name].shape == (new_rows, h)
        assert torch.equal(full[name][:v], old[name][:v])  # bit-identical
        assert torch.equal(full[name][v:v + 4], rows)
        assert full[name][v:v + 4].abs().max() <= 3 * h ** -0.5
        # the old padding rows follow, moved up by four; then zeros
        assert torch.equal(full[name][v + 4:132], old[name][v:128])
        assert not full[name][132:].any()
    for name, tensor in old.items():
        if name not in (EMB, HEAD):
            assert torch.equal(full[name], tensor)
    assert stored["model"]["vocab_size"] == v + 4
    assert stored["tokenizer"]["tokenizer_type"] == "HuggingFaceTokenizer"
    assert stored["tokenizer"]["tokenizer_model"] == os.path.abspath(new_tok)
    assert stored["latent_tokens"]["ids"] == list(range(v, v + 4))
    assert iteration == 0


def test_grown_checkpoint_logits_equal_the_original(single_process_parallel, word_setup):
    from megatron_latent.inference.loading import load_model_for_inference

    _, _, old_dir, grown_dir, _ = word_setup
    ids = torch.randint(0, WORD_VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    before = load_model_for_inference(str(old_dir), device=torch.device("cpu"))
    after = load_model_for_inference(str(grown_dir), device=torch.device("cpu"))
    assert after.tokenizer.vocab_size == WORD_VOCAB + 4
    assert latent_token_ids(after.tokenizer) == LatentTokenIds.after(WORD_VOCAB)
    with torch.no_grad():
        old_logits = before.model(ids)
        new_logits = after.model(ids)
    assert new_logits.shape[-1] == 192
    assert torch.equal(new_logits[..., :WORD_VOCAB], old_logits[..., :WORD_VOCAB])
    # the new tokens' logits are the new head rows applied to the same final hidden states
    assert new_logits[..., WORD_VOCAB:WORD_VOCAB + 4].abs().sum() > 0


def test_training_continues_from_the_grown_checkpoint(single_process_parallel, word_setup,
                                                      tmp_path):
    _, new_tok, _, grown_dir, _ = word_setup
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--vocab-size") + 1] = str(WORD_VOCAB + 4)
    summary, trainer = run_training(flags + [
        "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--eval-iters", "0", "--train-iters", "1", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", new_tok, "--load", str(grown_dir), "--finetune",
        "--save", str(tmp_path / "out")])
    assert trainer.run.model.vocab_size == WORD_VOCAB + 4
    stored = checkpointing.read_checkpoint_config(str(tmp_path / "out"))
    assert stored["model"]["vocab_size"] == WORD_VOCAB + 4
    full, _, iteration = checkpointing.load_full_model_state(str(tmp_path / "out"))
    assert iteration == 1 and full[EMB].shape[0] == 192
    assert torch.isfinite(full[EMB]).all()


def test_tp2_source_and_thought_memory_extra_ids(single_process_parallel, tmp_path):
    """A TP=2 source (random padding rows) written for TP=2; and a method whose extra ids
    follow the vocabulary keeps them right after the grown vocabulary."""
    tok = write_wordlevel_tokenizer(str(tmp_path / "tok"), WORD_VOCAB)
    old = write_checkpoint(tmp_path / "tp2", tok, tp=2)
    assert old[EMB].shape[0] == 128
    new_tok = add_latent_tokens_to_tokenizer(tok, "HuggingFaceTokenizer",
                                             str(tmp_path / "new")).output_path
    result = grow_checkpoint(str(tmp_path / "tp2"), str(tmp_path / "g2"), WORD_VOCAB + 4,
                             "HuggingFaceTokenizer", new_tok)
    assert (result.tensor_parallel_size, result.old_rows, result.new_rows) == (2, 128, 256)
    assert sorted(os.listdir(tmp_path / "g2" / "iter_0000000")) == [
        "config.json", "mp_rank_00", "mp_rank_01"]
    full, stored, _ = checkpointing.load_full_model_state(str(tmp_path / "g2"))
    embedding, head = expected_rows(32)
    assert torch.equal(full[EMB][:WORD_VOCAB], old[EMB][:WORD_VOCAB])
    assert torch.equal(full[HEAD][WORD_VOCAB:WORD_VOCAB + 4], head)
    assert torch.equal(full[EMB][WORD_VOCAB + 4:132], old[EMB][WORD_VOCAB:])
    assert stored["parallel"]["tensor_model_parallel_size"] == 2

    # thought memory: 4 extra ids after the vocabulary (inside the padded rows)
    tm_config = CONFIG.replace(vocab_size=120)
    tm_tok = write_wordlevel_tokenizer(str(tmp_path / "tm_tok"), 120)
    old = write_checkpoint(tmp_path / "tm", tm_tok, config=tm_config, method="thought-memory")
    tm_new = add_latent_tokens_to_tokenizer(tm_tok, "HuggingFaceTokenizer",
                                            str(tmp_path / "tm_new")).output_path
    result = grow_checkpoint(str(tmp_path / "tm"), str(tmp_path / "tm_g"), 124,
                             "HuggingFaceTokenizer", tm_new)
    assert (result.old_rows, result.new_rows) == (128, 128)  # 124 + 4 extra ids fit
    full, _, _ = checkpointing.load_full_model_state(str(tmp_path / "tm_g"))
    assert torch.equal(full[EMB][:120], old[EMB][:120])
    assert torch.equal(full[EMB][124:128], old[EMB][120:124])  # the method's ids follow


def test_bad_input_is_refused_naming_the_flag(word_setup, tmp_path, capsys):
    old_tok, new_tok, old_dir, grown_dir, _ = word_setup
    main = tool().main
    base = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", old_tok]

    def refused(argv, pattern):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert pattern in err, err

    refused(base + ["--output-tokenizer", new_tok], "--output-tokenizer")
    refused(base + ["--output-tokenizer", str(tmp_path / "a.json"), "--load", str(old_dir)],
            "--load and --save")
    refused(base + ["--output-tokenizer", str(tmp_path / "b.json"), "--load", str(old_dir),
                    "--save", str(grown_dir)], "--save")
    refused(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
             str(tmp_path / "missing.json"), "--output-tokenizer", str(tmp_path / "c.json")],
            "--tokenizer-model")
    refused(["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", old_tok,
             "--output-tokenizer", str(tmp_path / "d.model")], "--tokenizer-model")
    # a checkpoint whose vocabulary is not the tokenizer's base vocabulary
    other = write_wordlevel_tokenizer(str(tmp_path / "other"), 100)
    refused(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", other,
             "--output-tokenizer", str(tmp_path / "e.json"), "--load", str(old_dir),
             "--save", str(tmp_path / "e")], "--load")
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "e").exists()
    refused(base + ["--output-tokenizer", str(tmp_path / "f.json"), "--load",
                    str(tmp_path / "nowhere"), "--save", str(tmp_path / "f")], "--load")
    with pytest.raises(ConfigError, match="--save"):
        grow_checkpoint(str(old_dir), str(grown_dir), WORD_VOCAB + 4)
    with pytest.raises(ConfigError, match="vocab_size 126"):
        grow_checkpoint(str(old_dir), str(tmp_path / "g"), WORD_VOCAB + 5)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "--finetune" in out


def test_grown_tokenizer_settings_are_recorded(word_setup):
    _, new_tok, _, grown_dir, _ = word_setup
    config = json.loads((grown_dir / "iter_0000000" / "config.json").read_text())
    tokenizer = build_tokenizer(config["tokenizer"]["tokenizer_type"],
                                tokenizer_model=config["tokenizer"]["tokenizer_model"])
    assert tokenizer.vocab_size == config["model"]["vocab_size"] == WORD_VOCAB + 4
