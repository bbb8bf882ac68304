"""Pondering against a plain-PyTorch implementation of the algorithm written here from the
method notes (Hugging Face GPTNeoX as the stack, driven through `inputs_embeds`), plus the
options, flags, initialisation and pipeline refusal."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_latent.config import ConfigError, ModelConfig
from megatron_latent.methods.pondering import (
    PIPELINE_REFUSAL,
    PonderingOptions,
    PonderingPythiaModel,
    build_pondering_model,
    mix_input_embeddings,
)
from megatron_latent.methods.registry import get_method
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.models.language_model import RuntimeOptions, build_pythia_model

from hf_reference import make_gpt_neox

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS = 256, 64, 2, 4


def make_hf_model(seed: int = 0):
    model = make_gpt_neox(VOCAB, LAYERS, HIDDEN, HEADS, seed, max_positions=64).train()
    with torch.no_grad():
        # Peaked output distributions, so the mixture is far from the mean embedding row.
        model.get_output_embeddings().weight.mul_(8.0)
        model.get_input_embeddings().weight.mul_(4.0)
    return model


def reference_pondering_logits(hf_model, ids, options: PonderingOptions, detach=False):
    """The algorithm of the notes, written out: E_s = E_{s-1} + softmax(logits_s) W_in."""
    table = hf_model.get_input_embeddings().weight
    embeds = table[ids]
    if options.scale_embeds:
        scale = math.sqrt(table.shape[1])
        embeds, table = embeds * scale, table * scale
    if options.multiply_steps:
        embeds = embeds * options.steps
    for _ in range(options.steps):
        logits = hf_model(inputs_embeds=embeds).logits
        if detach:
            logits = logits.detach()
        if options.top_k:
            values, index = torch.topk(logits, options.top_k, dim=-1)
            probs = torch.softmax(values, dim=-1)
            mixed = torch.einsum("bsk,bskh->bsh", probs, table[index])
        else:
            mixed = torch.softmax(logits, dim=-1) @ table
        embeds = embeds + mixed
    return hf_model(inputs_embeds=embeds).logits


def load_pondering(hf_model, options: PonderingOptions) -> PonderingPythiaModel:
    config = mapping.hf_config_to_model_config(hf_model.config.to_dict())
    model = build_pondering_model(config, options=options)
    mapping.load_canonical(model, mapping.hf_to_canonical(hf_model.state_dict(), VOCAB))
    return model


def head_name(hf_model) -> str:
    names = hf_model.state_dict().keys()
    return "lm_head.weight" if "lm_head.weight" in names else "embed_out.weight"


VARIANTS = {
    "full-vocab": PonderingOptions(steps=3),
    "top-k": PonderingOptions(steps=2, top_k=10),
    "scale-embeds": PonderingOptions(steps=2, scale_embeds=True),
    "multiply-steps": PonderingOptions(steps=2, multiply_steps=True),
    "top-k-scaled-multiplied": PonderingOptions(steps=2, top_k=7, scale_embeds=True,
                                                multiply_steps=True),
}


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_loss_and_gradients_match_reference(single_process_parallel, options):
    hf_model = make_hf_model()
    model = load_pondering(hf_model, options)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(4))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    reference_logits = reference_pondering_logits(hf_model, inputs, options)
    reference_loss = F.cross_entropy(reference_logits.reshape(-1, VOCAB), labels.reshape(-1))
    reference_loss.backward()

    with torch.no_grad():
        torch.testing.assert_close(model(inputs), reference_logits, atol=1e-4, rtol=1e-4)
    per_token = model(inputs, labels=labels)
    assert per_token.shape == labels.shape
    loss = per_token.mean()
    loss.backward()
    assert abs(loss.item() - reference_loss.item()) <= 1e-5

    ours = mapping.canonical_to_hf({n: p.grad for n, p in model.named_parameters()},
                                   head_name=head_name(hf_model))
    theirs = {n: p.grad for n, p in hf_model.named_parameters()}
    assert set(ours) == set(theirs)
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, atol=2e-5, rtol=1e-3, msg=name)


def test_gradients_flow_through_every_softmax(single_process_parallel):
    """The reference is sensitive to a detached pondering path: the gradients differ."""
    options = PonderingOptions(steps=2)
    hf_model = make_hf_model()
    model = load_pondering(hf_model, options)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    model(inputs, labels=labels).mean().backward()
    detached = reference_pondering_logits(hf_model, inputs, options, detach=True)
    F.cross_entropy(detached.reshape(-1, VOCAB), labels.reshape(-1)).backward()
    ours = model.output_layer.weight.grad
    theirs = hf_model.get_output_embeddings().weight.grad
    assert (ours - theirs).abs().max() > 1e-3 * theirs.abs().max()


def test_zero_steps_is_the_plain_model(single_process_parallel):
    hf_model = make_hf_model()
    model = load_pondering(hf_model, PonderingOptions(steps=0))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_mixing_top_k_over_whole_vocab_equals_full_softmax(single_process_parallel):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 2, 64, generator=generator)
    table = torch.randn(64, 8, generator=generator)
    expected = torch.softmax(logits, -1) @ table
    torch.testing.assert_close(mix_input_embeddings(logits, table), expected)
    torch.testing.assert_close(mix_input_embeddings(logits, table, top_k=64), expected)
    values, index = logits.topk(3, dim=-1)
    top3 = torch.einsum("sbk,sbkh->sbh", torch.softmax(values, -1), table[index])
    torch.testing.assert_close(mix_input_embeddings(logits, table, top_k=3), top3)


def test_flags_round_trip_and_refuse_bad_values():
    spec = get_method("pondering")
    parser = argparse.ArgumentParser()
    spec.add_arguments(parser.add_argument_group("pondering"))
    assert spec.options_from_args(parser.parse_args([])) == PonderingOptions()
    options = spec.options_from_args(parser.parse_args(
        ["--ponder-steps", "5", "--ponder-top-k", "100", "--ponder-scale-embeds",
         "--ponder-multiply-steps"]))
    assert options == PonderingOptions(steps=5, top_k=100, scale_embeds=True, multiply_steps=True)
    for argv, message in [
        (["--ponder-steps", "-1"], "--ponder-steps must be an integer >= 0"),
        (["--ponder-top-k", "-3"], "--ponder-top-k must be an integer >= 0"),
        (["--ponder-steps", "0", "--ponder-multiply-steps"], "multiply the input embeddings by zero"),
    ]:
        with pytest.raises(ConfigError, match=message):
            spec.options_from_args(parser.parse_args(argv))
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=300)
    with pytest.raises(ConfigError, match="--ponder-top-k 301 exceeds the vocabulary size 300"):
        spec.prepare_model_config(config, PonderingOptions(top_k=301))


def test_output_projection_init_counts_the_unrolled_depth(single_process_parallel):
    config = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=512,
                         seq_length=32)
    spec = get_method("pondering")
    options = PonderingOptions(steps=3)
    prepared = spec.prepare_model_config(config, options)
    expected = math.sqrt(2 / (5 * 256)) / math.sqrt(2 * 4 * 4)
    assert prepared.output_init_std == pytest.approx(expected)
    assert spec.prepare_model_config(prepared, options) == prepared  # idempotent
    explicit = config.replace(output_init_std=0.01)
    assert spec.prepare_model_config(explicit, options).output_init_std == 0.01

    model = spec.build_model(prepared, RuntimeOptions(), torch.device("cpu"), options)
    params = dict(model.named_parameters())
    for name in ("decoder.layers.0.self_attention.linear_proj.weight",
                 "decoder.layers.3.mlp.linear_fc2.weight"):
        assert abs(params[name].std().item() - expected) / expected < 0.05, name
    qkv = params["decoder.layers.1.self_attention.linear_qkv.weight"].std().item()
    assert abs(qkv - math.sqrt(2 / (5 * 256))) / math.sqrt(2 / (5 * 256)) < 0.05


def test_pipeline_parallelism_is_refused(single_process_parallel):
    spec = get_method("pondering")
    assert spec.supports_pipeline_parallel is False
    assert spec.pipeline_refusal == PIPELINE_REFUSAL and "pipeline" in PIPELINE_REFUSAL
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256)
    with pytest.raises(ConfigError, match="does not support pipeline parallelism"):
        spec.build_model(config, RuntimeOptions(), torch.device("cpu"), PonderingOptions(),
                         pre_process=True, post_process=False)
    with pytest.raises(ConfigError, match="does not support pipeline parallelism"):
        spec.build_model(config, RuntimeOptions(pipeline_model_parallel_size=2),
                         torch.device("cpu"), PonderingOptions())


def test_same_parameters_as_the_plain_model(single_process_parallel):
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256)
    plain = {n: p.shape for n, p in build_pythia_model(config).named_parameters()}
    ponder = {n: p.shape for n, p in build_pondering_model(config).named_parameters()}
    assert plain == ponder
