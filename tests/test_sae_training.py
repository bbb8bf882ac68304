"""The TopK SAE trainer on truly sparse data, and tools/train_sae.py end to end on a teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_latent.sae import read_sae
from megatron_latent.sae.training import SAETrainConfig, SAETrainer, evaluate_sae

from training_fixtures import (
    TINY_FLAGS,
    run_training,
    write_token_dataset,
    write_wordlevel_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    yield
    torch.set_num_threads(threads)


def sparse_source(seed=0, d=64, atoms=128, active=4):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)

    def sample(n: int) -> torch.Tensor:
        ids = torch.rand(n, atoms, generator=g).argsort(dim=1)[:, :active]
        coef = torch.rand(n, active, generator=g) * 2 + 0.5
        return torch.zeros(n, atoms).scatter(1, ids, coef) @ dictionary

    return sample


def test_fvu_drops_on_k_sparse_data(one_thread):
    sample = sparse_source()
    held = sample(2048)
    trainer = SAETrainer(SAETrainConfig(64, 128, 4, "none", lr=3e-3, dead_tokens=20_000),
                         generator=torch.Generator().manual_seed(1))
    before = evaluate_sae(trainer.to_sae(), held)
    for _ in range(800):
        trainer.step(sample(256))
    after = evaluate_sae(trainer.to_sae(), held)
    # Measured: ~0.79 -> ~0.07.
    assert before > 0.6 and after < 0.2, (before, after)
    assert torch.allclose(trainer.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_layer_norm_training_and_restore_continue_identically(one_thread):
    sample = sparse_source(seed=3, d=32, atoms=64)
    batches = [sample(128) * 5 + 2 for _ in range(20)]
    config = SAETrainConfig(32, 64, 4, "layer_norm", lr=3e-3, dead_tokens=512)

    def fresh():
        return SAETrainer(config, generator=torch.Generator().manual_seed(0))

    straight = fresh()
    for h in batches:
        straight.step(h)
    first = fresh()
    for h in batches[:10]:
        first.step(h)
    second = fresh()
    second.restore(first.checkpoint())
    for h in batches[10:]:
        second.step(h)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
    held = torch.cat(batches[:4])
    assert evaluate_sae(straight.to_sae(), held) < evaluate_sae(fresh().to_sae(), held)


# -- tools/train_sae.py ---------------------------------------------------------------------------

def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def teacher(single_process_parallel, tmp_path_factory):
    base = tmp_path_factory.mktemp("teacher")
    prefix = write_token_dataset(str(base / "tokens"))
    ckpt = base / "ckpt"
    tokenizer = write_wordlevel_tokenizer(str(base / "tokenizer"))
    run_training(TINY_FLAGS + ["--data-path", prefix, "--split", "90,10,0",
                               "--tokenizer-type", "HuggingFaceTokenizer",
                               "--tokenizer-model", tokenizer,
                               "--micro-batch-size", "2", "--global-batch-size", "4",
                               "--train-iters", "3", "--eval-iters", "0", "--save", str(ckpt)])
    return prefix, ckpt


def sae_flags(prefix, ckpt, out, *extra):
    return ["--load", str(ckpt), "--layer", "0", "--data-path", prefix, "--seq-length", "32",
            "--d-sae", "64", "--k", "4", "--batch-tokens", "128", "--train-tokens", "1280",
            "--lr", "1e-3", "--eval-tokens", "256", "--output", str(out), "--device", "cpu",
            "--no-progress", "--seed", "3", *extra]


def test_bad_input_is_refused_naming_the_flag(teacher, tmp_path, capsys):
    prefix, ckpt = teacher
    train_sae = tool("train_sae")
    cases = [(["--layer", "2"], "--layer 2"), (["--k", "65"], "--k 65"),
             (["--batch-tokens", "100"], "--batch-tokens"),
             (["--data-path", str(tmp_path / "none")], "--data-path"),
             (["--load", str(tmp_path / "nockpt")], "--load")]
    for extra, expected in cases:
        assert train_sae.main(sae_flags(prefix, ckpt, tmp_path / "o") + extra) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_sae_end_to_end_reads_the_right_layer_and_resumes(teacher, tmp_path,
                                                                monkeypatch):
    transformers = pytest.importorskip("transformers")
    from megatron_latent.sae.activations import (
        TokenWindows,
        load_hf_teacher,
        load_project_teacher,
    )
    from megatron_latent.sae.training import SAETrainer as Trainer

    prefix, ckpt = teacher
    train_sae = tool("train_sae")
    out = tmp_path / "sae"
    assert train_sae.main(sae_flags(prefix, ckpt, out)) == 0
    sae = read_sae(str(out))
    meta = sae.metadata
    assert (sae.d_in, sae.d_sae, sae.k, sae.normalize_activations) == (32, 64, 4, "layer_norm")
    assert meta["layer"] == 0 and meta["teacher"]["checkpoint"] == str(ckpt.resolve())
    assert meta["training"]["tokens"] == 1280 and meta["eval"]["tokens"] == 256
    assert 0 < meta["eval"]["fvu"] < 1 and 0 <= meta["eval"]["dead_fraction"] <= 1
    assert not (out / "training_state.pt").exists()
    assert train_sae.main(sae_flags(prefix, ckpt, out)) == 2  # already trained

    # Interrupted after step 5 (state saved at step 4), then resumed: no step is redone and
    # the result is the uninterrupted one.
    calls = {"n": 0}
    original = Trainer.step

    def crashing(self, h):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, h)

    monkeypatch.setattr(Trainer, "step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_sae.main(sae_flags(prefix, ckpt, tmp_path / "r", "--save-interval", "4"))
    assert (tmp_path / "r" / "training_state.pt").exists()
    assert not (tmp_path / "r" / "cfg.json").exists()
    calls["n"] = -100
    assert train_sae.main(sae_flags(prefix, ckpt, tmp_path / "r", "--save-interval", "4")) == 0
    assert calls["n"] == -100 + 6  # steps 5..10 only
    resumed = read_sae(str(tmp_path / "r"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(sae, name)), name
    assert resumed.metadata["eval"] == meta["eval"]

    # The residual read at a layer equals Hugging Face GPTNeoX's on the converted weights.
    hf_dir = tmp_path / "hf"
    assert tool("convert_checkpoint").main(["to-hf", "--load", str(ckpt),
                                            "--output", str(hf_dir)]) == 0
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    ids = TokenWindows(prefix, 32).batch([0, 5, 9])
    with torch.no_grad():
        states = hf(ids, output_hidden_states=True).hidden_states
    ours0 = load_project_teacher(str(ckpt), 0, torch.device("cpu"))(ids)
    ours1 = load_project_teacher(str(ckpt), 1, torch.device("cpu"))(ids)
    torch.testing.assert_close(ours0, states[1], rtol=1e-4, atol=1e-4)
    assert (ours0 - states[2]).abs().max() > 1e-2  # not the next layer's
    # The last block's residual is before the final LayerNorm (HF's last entry is after it).
    with torch.no_grad():
        torch.testing.assert_close(hf.gpt_neox.final_layer_norm(ours1), states[2],
                                   rtol=1e-4, atol=1e-4)
    for layer, ours in ((0, ours0), (1, ours1)):
        theirs = load_hf_teacher(str(hf_dir), layer, torch.device("cpu"))(ids)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook"].startswith("residual stream after block 0")
