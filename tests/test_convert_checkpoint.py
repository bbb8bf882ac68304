"""tools/convert_checkpoint.py: this project's checkpoints <-> Hugging Face GPTNeoX folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.training import checkpointing

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
         "--lr-warmup-iters", "0", "--eval-iters", "0", "--load", str(out), "--finetune"])
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
