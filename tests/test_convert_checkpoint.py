"""tools/convert_checkpoint.py: this project's checkpoints <-> Hugging Face GPTNeoX folders."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_latent.config import ConfigError
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.training import checkpointing

from data_fixtures import TRICKY_TEXTS, corpus_texts, gpt2_files, hf_tokenizer_dir
from data_fixtures import sentencepiece_model as tiny_sentencepiece_model
from training_fixtures import TINY_FLAGS, run_training

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def converter():
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MOCK = TINY_FLAGS + ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
                     "--eval-iters", "0"]


def test_trained_checkpoint_loads_in_transformers_with_same_logits(single_process_parallel,
                                                                   tmp_path):
    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    _, trainer = run_training(MOCK + ["--train-iters", "2", "--save", str(ckpt)])
    assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(hf_dir)]) == 0
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    model = trainer.engine.unwrapped_model().eval()
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf_model(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["megatron_latent"]["iteration"] == 2
    # A --mock-data run has no tokenizer: its documents end in megatron's NullTokenizer EOD.
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    assert config["eos_token_id"] == NullTokenizer(trainer.run.model.vocab_size - 1).eod


def test_hugging_face_folder_to_tp2_checkpoint_and_back(single_process_parallel, tmp_path):
    config = transformers.GPTNeoXConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, rotary_pct=0.25, max_position_embeddings=32,
        use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
    )
    torch.manual_seed(3)
    hf_model = transformers.GPTNeoXForCausalLM(config).float()
    hf_model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "ckpt"
    assert converter().main(["from-hf", "--load", str(tmp_path / "hf"), "--output", str(out),
                             "--tensor-model-parallel-size", "2"]) == 0
    assert sorted(p.name for p in (out / "iter_0000000").iterdir()) == [
        "config.json", "mp_rank_00", "mp_rank_01"]
    full, _, _ = checkpointing.load_full_model_state(str(out))
    head = "lm_head.weight" if "lm_head.weight" in hf_model.state_dict() else "embed_out.weight"
    back = mapping.canonical_to_hf(full, head_name=head)
    original = {k: v for k, v in hf_model.state_dict().items()
                if not mapping._HF_BUFFERS.match(k)}
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name

    # It trains on from the converted weights (re-cut to TP=1) with --finetune.
    summary, trainer = run_training(
        ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "32", "--vocab-size", "512", "--mock-data", "--num-workers", "0",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
         "--lr-warmup-iters", "0", "--eval-iters", "0", "--load", str(out), "--finetune",
         "--device", "cpu"])
    assert summary.iterations == 1


def test_refuses_to_export_a_method_hugging_face_cannot_run(single_process_parallel, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_training(MOCK + ["--train-iters", "1", "--save", str(ckpt)])
    stored = json.loads((ckpt / "iter_0000001" / "config.json").read_text())
    stored["method"] = "pondering"
    (ckpt / "iter_0000001" / "config.json").write_text(json.dumps(stored))
    assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(tmp_path / "x"),
                             "--allow-method-mismatch"]) == 0


# -- the run's tokenizer travels with the export ------------------------------------------------

SAMPLE = TRICKY_TEXTS + [
    "Café déjà vu, naïve façade — Ærø; ¿qué? ¡sí! «ça» ½ € ©",
    "東京で寿司を食べた。中文，한국어 🙂🚀👍🏽 ∑∫√ ☃",
    "  indented line\n\ttabbed\r\nline with trailing spaces   \n",
    "a<sent>b and <thought>x</thought> y <sent>",
    "spaced out , like this . and ! so ? it 's do n't I 'm we 've they 're",
    "ALL CAPS, numbers 0123456789 and symbols ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
    *corpus_texts()[:3],
]


def _byte_level_tokenizer(directory: Path) -> str:
    """A Pythia-style tokenizer.json (NFC, byte-level BPE) whose post-processor would insert
    <|endoftext|>; EOS is <|endoftext|>, id 1."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus_texts()), trainers.BpeTrainer(
        vocab_size=450, special_tokens=["<|padding|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return str(directory / "tokenizer.json")


def _train_with_tokenizer(ckpt: Path, *tokenizer_flags: str):
    _, trainer = run_training(MOCK + ["--train-iters", "1", "--save", str(ckpt),
                                      *tokenizer_flags])
    return trainer.engine.unwrapped_model().eval()


def _modes(directory: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}


def _greedy_reference(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by full forward passes of the project's model, stopping after EOS."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids


def _check_generation_from_folder_alone(folder: Path, model) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).float().eval()
    prompt = tokenizer("To be, or not to be:", return_tensors="pt")
    out = hf_model.generate(**prompt, max_new_tokens=8, do_sample=False)
    ids = prompt["input_ids"][0].tolist()
    assert out[0].tolist() == _greedy_reference(model, ids, 8, tokenizer.eos_token_id)
    assert isinstance(tokenizer.decode(out[0]), str)


def test_sentencepiece_run_exports_a_tokenizer_autotokenizer_loads(single_process_parallel,
                                                                   tmp_path):
    import sentencepiece
    from tokenizers import Tokenizer

    model_file = tiny_sentencepiece_model()
    reference = sentencepiece.SentencePieceProcessor(model_file=model_file)
    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    model = _train_with_tokenizer(ckpt, "--tokenizer-type", "SentencePieceTokenizer",
                                  "--tokenizer-model", model_file)
    previous = os.umask(0o022)
    try:
        assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(hf_dir)]) == 0
        assert stat.S_IMODE(hf_dir.stat().st_mode) == 0o755
        assert _modes(hf_dir) == {0o644}
        os.umask(0o027)
        assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(hf_dir),
                                 "--overwrite"]) == 0
        assert stat.S_IMODE(hf_dir.stat().st_mode) == 0o750
        assert _modes(hf_dir) == {0o640}
    finally:
        os.umask(previous)

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    alone = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))  # for other consumers
    for text in SAMPLE:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference.encode(text) == alone.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    assert reference.encode("中🚀")[1:] == [reference.piece_to_id(f"<0x{b:02X}>")
                                           for b in "中🚀".encode()]  # byte fallback in play
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token, tokenizer.pad_token) \
        == ("</s>", "<s>", "<unk>", "<pad>")
    config = json.loads((hf_dir / "config.json").read_text())
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == reference.eos_id() == 2
    assert config["bos_token_id"] == reference.bos_id() and config["pad_token_id"] == 3
    with pytest.raises(ConfigError, match="eos_token_id 448 is outside the vocabulary of 448"):
        mapping.model_config_to_hf_config(mapping.hf_config_to_model_config(config),
                                          vocab_size=448, eos_token_id=448)
    _check_generation_from_folder_alone(hf_dir, model)


def test_hugging_face_tokenizer_run_exports_its_tokenizer(single_process_parallel, tmp_path):
    from tokenizers import Tokenizer

    tokenizer_file = _byte_level_tokenizer(tmp_path / "tok")
    reference = Tokenizer.from_file(tokenizer_file)
    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    model = _train_with_tokenizer(ckpt, "--tokenizer-type", "HuggingFaceTokenizer",
                                  "--tokenizer-model", tokenizer_file)
    assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(hf_dir)]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    alone = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in SAMPLE:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert alone.encode(text).ids == ids  # the run trained without BOS
        assert tokenizer.decode(ids) == text
    eos = reference.token_to_id("<|endoftext|>")
    assert eos == 1 and tokenizer.eos_token_id == eos
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == eos
    _check_generation_from_folder_alone(hf_dir, model)

    # A tokenizer given on the command line replaces the recorded one; this one's
    # tokenizer_config.json names the EOS and its post-processor would insert <s>.
    other = tmp_path / "other"
    assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(other),
                             "--tokenizer-type", "HuggingFaceTokenizer",
                             "--tokenizer-model", hf_tokenizer_dir()]) == 0
    reference = Tokenizer.from_file(os.path.join(hf_tokenizer_dir(), "tokenizer.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(other))
    for text in SAMPLE:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=False), text
    config = json.loads((other / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == tuple(
        reference.token_to_id(t) for t in ("</s>", "<s>", "<pad>"))


def test_a_missing_recorded_tokenizer_is_one_clear_error(single_process_parallel, tmp_path,
                                                         capsys):
    model_file = tmp_path / "moved.model"
    shutil.copyfile(tiny_sentencepiece_model(), model_file)
    ckpt = tmp_path / "ckpt"
    _train_with_tokenizer(ckpt, "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", str(model_file))
    model_file.unlink()
    capsys.readouterr()
    assert converter().main(["to-hf", "--load", str(ckpt), "--output",
                             str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(model_file) in error
    assert f"the tokenizer recorded in {ckpt}" in error and "--tokenizer-model" in error
    assert not (tmp_path / "hf").exists()
    # A tokenizer with more ids than the model has embedding rows is refused.
    vocab, merges = gpt2_files()
    assert converter().main(["to-hf", "--load", str(ckpt), "--output", str(tmp_path / "hf"),
                             "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                             "--merge-file", merges]) == 2
    assert "the tokenizer has 600 ids but the exported embeddings only 448 rows" in \
        capsys.readouterr().err

    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(ckpt),
         "--prompt", "x"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("generate.py: error: --tokenizer-model") and str(model_file) in last
    assert f"the tokenizer {ckpt} records" in last


def test_recut_fits_the_vocabulary_padding_of_the_new_tp_size():
    """516 ids pad to 576 rows at TP=1 (multiple 64) and 640 at TP=2 (multiple 128): a re-cut
    keeps every real row, zero-pads the new padding, and cuts only padding when shrinking."""
    full = {"embedding.word_embeddings.weight": torch.arange(576 * 3.0).reshape(576, 3),
            "output_layer.weight": torch.arange(576 * 3.0).reshape(576, 3) + 1,
            "decoder.layers.0.cross_attention.linear_kv.weight": torch.arange(8.0).reshape(4, 2)}
    shards = [mapping.shard_for_rank(full, 2, rank, vocab_rows=640) for rank in (0, 1)]
    embed = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
    assert embed.shape == (640, 3)
    assert torch.equal(embed[:576], full["embedding.word_embeddings.weight"])
    assert not embed[576:].any()
    # memory cross-attention K|V rows are split over TP like QKV (heads contiguous)
    assert torch.equal(shards[1]["decoder.layers.0.cross_attention.linear_kv.weight"],
                       full["decoder.layers.0.cross_attention.linear_kv.weight"][2:])
    back = mapping.shard_for_rank(mapping.merge_shards(shards), 1, 0, vocab_rows=576)
    assert torch.equal(back["output_layer.weight"], full["output_layer.weight"])
