"""The Pythia model against Hugging Face GPTNeoX (an independent implementation), the
published parameter counts, and configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_latent.config import PRESETS, ConfigError, ModelConfig, count_parameters, get_preset
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.models.language_model import RuntimeOptions, build_pythia_model

from hf_reference import make_gpt_neox

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def make_hf_model(vocab_size=256, layers=3, hidden=64, heads=4, seed=0):
    return make_gpt_neox(vocab_size, layers, hidden, heads, seed).eval()


def hf_head_name(hf_model) -> str:
    names = hf_model.state_dict().keys()
    return "lm_head.weight" if "lm_head.weight" in names else "embed_out.weight"


def load_from_hf(hf_model):
    config = mapping.hf_config_to_model_config(hf_model.config.to_dict())
    model = build_pythia_model(config).eval()
    full = mapping.hf_to_canonical(hf_model.state_dict(), config.padded_vocab_size())
    mapping.load_canonical(model, full)
    return config, model


@pytest.mark.parametrize("vocab_size", [256, 250])
def test_logits_match_hugging_face(single_process_parallel, vocab_size):
    hf_model = make_hf_model(vocab_size=vocab_size)
    config, model = load_from_hf(hf_model)
    assert config.padded_vocab_size() == 256
    ids = torch.randint(0, vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(ids).logits
        logits = model(ids)
    assert logits.shape == (3, 40, 256)
    assert (logits[..., :vocab_size] - reference).abs().max().item() <= 1e-5


def test_logits_match_hugging_face_at_pythia_head_size_and_a_custom_rotary_base(
        single_process_parallel):
    """Head dim 64 (Pythia's), 192 positions and rotary base 5e5: the rotary frequencies, their
    partial application and the base all have to be right to agree within 1e-5 (a base of
    1e4 instead of 5e5 moves these logits by ~6e-3)."""
    hf_model = make_gpt_neox(vocab_size=512, layers=2, hidden=256, heads=4, seed=3,
                             max_positions=256, rotary_base=500000).eval()
    config, model = load_from_hf(hf_model)
    assert (config.head_dim, config.rotary_dim, config.rotary_base) == (64, 16, 500000)
    ids = torch.randint(0, 512, (2, 192), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf_model(ids).logits
        logits = model(ids)
    assert (logits - reference).abs().max().item() <= 1e-5


def test_loss_and_gradients_match_hugging_face(single_process_parallel):
    hf_model = make_hf_model()
    _, model = load_from_hf(hf_model)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    reference_logits = hf_model(inputs).logits
    reference_loss = F.cross_entropy(reference_logits.reshape(-1, 256), labels.reshape(-1))
    reference_loss.backward()

    per_token = model(inputs, labels=labels)
    assert per_token.shape == labels.shape
    loss = per_token.mean()
    loss.backward()
    assert abs(loss.item() - reference_loss.item()) <= 1e-5

    ours = mapping.canonical_to_hf(
        {name: p.grad for name, p in model.named_parameters()}, head_name=hf_head_name(hf_model)
    )
    theirs = {name: p.grad for name, p in hf_model.named_parameters()}
    assert set(ours) == set(theirs)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_mapping_back_reproduces_hugging_face_state_dict(single_process_parallel):
    hf_model = make_hf_model(vocab_size=250)
    _, model = load_from_hf(hf_model)
    back = mapping.canonical_to_hf(
        mapping.model_to_canonical(model), vocab_size=250, head_name=hf_head_name(hf_model)
    )
    original = {k: v for k, v in hf_model.state_dict().items() if not mapping._HF_BUFFERS.match(k)}
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_shard_and_merge_round_trip():
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300)
    full = {
        "embedding.word_embeddings.weight": torch.randn(config.padded_vocab_size(2), 32),
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(96, 32),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(32, 32),
        "decoder.layers.0.self_attention.linear_proj.bias": torch.randn(32),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(32, 128),
    }
    shards = [mapping.shard_for_rank(full, 2, rank) for rank in range(2)]
    assert shards[0]["decoder.layers.0.self_attention.linear_proj.weight"].shape == (32, 16)
    assert shards[1]["embedding.word_embeddings.weight"].shape == (256, 32)
    merged = mapping.merge_shards(shards)
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor)


def test_built_model_has_the_counted_parameters(single_process_parallel):
    for config in (
        get_preset("tiny").model_config(),
        ModelConfig(num_layers=3, hidden_size=96, num_attention_heads=6, vocab_size=1000,
                    seq_length=64),
    ):
        model = build_pythia_model(config)
        built = sum(p.numel() for p in model.parameters())
        assert built == count_parameters(config)["total"]
        canonical = mapping.model_to_canonical(model)
        assert {k: tuple(v.shape) for k, v in canonical.items()} == mapping.canonical_shapes(config)


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.published_params])
def test_preset_parameter_counts_match_published(name):
    preset = PRESETS[name]
    # Pythia pads the vocabulary to a multiple of 128 x TP of its training run: 50304 up to
    # 2.8b (TP=1), 50432 for 6.9b (TP=2) and 50688 for 12b (TP=4).
    tp = preset.recipe.tensor_model_parallel_size
    counts = count_parameters(preset.model_config(), tp)
    assert counts["padded_vocab_size"] == {1: 50304, 2: 50432, 4: 50688}[tp]
    assert counts["total"] == preset.published_params
    assert counts["non_embedding"] == preset.published_non_embedding_params


def test_pythia_initialisation_scales(single_process_parallel):
    config = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=512,
                         seq_length=32)
    model = build_pythia_model(config)
    params = dict(model.named_parameters())
    small = (2 / (5 * 256)) ** 0.5
    wang = 2 / (4 * 256**0.5)
    qkv = params["decoder.layers.0.self_attention.linear_qkv.weight"]
    dense = params["decoder.layers.0.self_attention.linear_proj.weight"]
    fc2 = params["decoder.layers.2.mlp.linear_fc2.weight"]
    assert abs(qkv.std().item() - small) / small < 0.05
    assert abs(dense.std().item() - wang) / wang < 0.05
    assert abs(fc2.std().item() - wang) / wang < 0.05
    # Deeper unrolled stacks (pondering) shrink the output projections further.
    deeper = build_pythia_model(config.replace(init_depth=16))
    dense_deep = dict(deeper.named_parameters())["decoder.layers.0.self_attention.linear_proj.weight"]
    assert abs(dense_deep.std().item() - wang / 4) / (wang / 4) < 0.05


@pytest.mark.parametrize(
    "changes, tp, message",
    [
        (dict(hidden_size=96, num_attention_heads=6), 4, "not divisible by the tensor parallel size 4"),
        (dict(hidden_size=100, num_attention_heads=8), 1, "hidden_size 100 is not divisible"),
        (dict(rotary_percent=0.1), 1, "rotary dim"),
        (dict(rotary_percent=0.3125), 1, "rotary dim of 5"),
        (dict(seq_length=256, max_position_embeddings=128), 1, "exceeds max_position"),
    ],
)
def test_bad_configuration_is_refused_before_allocation(single_process_parallel, changes, tp,
                                                        message, monkeypatch):
    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
                         seq_length=64).replace(**changes)
    with pytest.raises(ConfigError, match=message):
        config.validate(tp)
    # The builder refuses before megatron-core allocates anything.
    import megatron_latent.models.language_model as lm

    def no_allocation(*args, **kwargs):
        raise AssertionError("model construction started for an invalid config")

    monkeypatch.setattr(lm, "PythiaModel", no_allocation)
    with pytest.raises(ConfigError, match=message):
        build_pythia_model(config, RuntimeOptions(tensor_model_parallel_size=tp))


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        get_preset("pythia-3b")
    assert "pythia-3b" in str(info.value)
    for known in ("pythia-70m", "pythia-1b", "pythia-12b", "tiny"):
        assert known in str(info.value)
    assert get_preset("1b") is PRESETS["pythia-1b"]


def test_model_info_tool_prints_resolved_config_and_counts():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "model_info.py"), "--model", "pythia-1b",
         "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, check=True,
    )
    out = result.stdout
    assert "num_layers: 16" in out and "hidden_size: 2048" in out
    assert "1,011,781,632" in out  # published count (vocab padded to 50304 at TP=1)
    assert "lr: 0.00025" in out
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "model_info.py"), "--model", "pythia-1b",
         "--tensor-model-parallel-size", "3"],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "not divisible by the tensor parallel size 3" in bad.stderr


def test_rotary_frequencies_survive_a_bf16_cast(single_process_parallel):
    config = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=2, vocab_size=256,
                         seq_length=2048)
    model = build_pythia_model(config).to(torch.bfloat16)
    emb = model.rotary_pos_emb(2048)
    dim = config.rotary_dim  # 8 of each 32-dim head
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    expected = torch.outer(torch.arange(2048, dtype=torch.float64), inv_freq)
    assert emb.dtype == torch.float32 and emb.shape == (2048, 1, 1, dim)
    torch.testing.assert_close(emb[:, 0, 0, : dim // 2].double(), expected, atol=2e-4, rtol=0)


def test_transformer_engine_names_map_to_canonical_ones():
    te_names = {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.ones(4),
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": torch.zeros(4),
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": torch.ones(4),
        "decoder.layers.0.self_attention.linear_qkv._extra_state": None,
        "decoder.layers.0.mlp.linear_fc1.weight": torch.ones(8, 4),
    }
    canonical = mapping.canonical_state_dict(te_names)
    assert set(canonical) == {
        "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.input_layernorm.bias",
        "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.linear_fc1.weight",
    }
