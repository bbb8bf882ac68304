"""Generation: KV-cached decoding yields exactly the tokens of full-prefix recomputation for the
plain and the pondering model, prompts of different lengths share a batch without artefacts,
stop tokens/strings and sampling seeds behave, and greedy tokens match Hugging Face GPTNeoX."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.config import ModelConfig
from megatron_latent.inference import (
    GenerationConfig,
    filter_logits,
    generate,
    generate_with_details,
    make_inference_context,
)
from megatron_latent.methods.pondering import (
    PonderingInferenceContext,
    PonderingOptions,
    build_pondering_model,
)
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.models.language_model import build_pythia_model

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=250,
                     seq_length=64)
PROMPTS = [[5, 17, 3], [200, 1, 2, 3, 4, 9, 11], [42, 42, 7, 100, 31]]


def peaked(model, seed=0):
    """Random weights with confident, varied predictions (so greedy ties cannot happen)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 if name == "output_layer.weight" else 0.1
            param.copy_(scale * torch.randn(param.shape, generator=generator)
                        + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


MODELS = {
    "vanilla": lambda: build_pythia_model(CONFIG),
    "pondering": lambda: build_pondering_model(CONFIG, options=PonderingOptions(steps=2)),
    "pondering-top-k": lambda: build_pondering_model(
        CONFIG, options=PonderingOptions(steps=3, top_k=5, scale_embeds=True)),
}


@pytest.fixture(params=list(MODELS), scope="module")
def model(request, single_process_parallel):
    return peaked(MODELS[request.param]())


def full_recompute_greedy(model, prompt, steps):
    """The simplest possible loop: run the whole sequence, take the argmax of the last
    position over the real vocabulary, append."""
    tokens = list(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]))[0, -1, :CONFIG.vocab_size]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def test_cached_equals_full_recomputation_greedy(model):
    config = GenerationConfig(max_new_tokens=10, greedy=True)
    cached = generate(model, PROMPTS, config)
    uncached = generate(model, PROMPTS, config, use_cache=False)
    assert cached == uncached
    for prompt, tokens in zip(PROMPTS, cached):
        assert tokens == full_recompute_greedy(model, prompt, 10)
        assert generate(model, [prompt], config) == [tokens]  # same alone as in the batch
    assert len({tuple(t) for t in cached}) > 1


def test_sampling_is_seeded_and_cache_independent(model):
    config = GenerationConfig(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    first = generate(model, PROMPTS, config)
    assert generate(model, PROMPTS, config) == first
    assert generate(model, PROMPTS, config, use_cache=False) == first
    others = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, seed=8))
    assert others != first
    top1 = GenerationConfig(max_new_tokens=6, top_k=1, seed=3)
    assert generate(model, PROMPTS, top1) == generate(
        model, PROMPTS, GenerationConfig(max_new_tokens=6, greedy=True))


def test_stop_tokens_and_stop_strings(model):
    greedy = GenerationConfig(max_new_tokens=8, greedy=True)
    reference = generate(model, PROMPTS, greedy)[1]
    stop = reference[3]
    first = reference.index(stop)
    [result] = generate_with_details(
        model, [PROMPTS[1]], GenerationConfig(max_new_tokens=8, greedy=True, stop_token_ids=(stop,)))
    assert result.tokens == reference[:first] and result.finish_reason == "stop_token"

    def detokenize(ids):
        return "".join(f"<{i}>" for i in ids)

    target = f"<{reference[2]}><{reference[3]}"  # ends inside the fourth token's text
    stops = GenerationConfig(max_new_tokens=8, greedy=True, stop_strings=("@@", target))
    results = generate_with_details(model, PROMPTS, stops, detokenize=detokenize)
    text = detokenize(reference)
    assert results[1].finish_reason == "stop_string"
    assert results[1].text == text[:text.find(target)]
    assert reference[:len(results[1].tokens)] == results[1].tokens
    assert target in detokenize(results[1].tokens)
    assert target not in detokenize(results[1].tokens[:-1])
    plain = generate_with_details(model, PROMPTS, greedy, detokenize=detokenize)
    assert plain[0].finish_reason == "length" and len(plain[0].tokens) == 8
    assert plain[0].text == detokenize(plain[0].tokens)


def test_cached_pondering_runs_k_plus_1_single_token_passes(single_process_parallel):
    model = peaked(build_pondering_model(CONFIG, options=PonderingOptions(steps=3)))
    lengths = []
    original = model.run_decoder

    def counting(hidden, *args, **kwargs):
        lengths.append(hidden.shape[0])
        return original(hidden, *args, **kwargs)

    model.run_decoder = counting
    generate(model, [[1, 2, 3, 4]], GenerationConfig(max_new_tokens=5, greedy=True))
    # Prefill: 4 passes over the 4 prompt tokens; then 4 tokens fed one at a time.
    assert lengths == [4] * 4 + [1] * 16
    assert isinstance(make_inference_context(model, 1, 8), PonderingInferenceContext)


def test_vanilla_greedy_matches_hugging_face(single_process_parallel):
    transformers = pytest.importorskip("transformers")
    model = peaked(build_pythia_model(CONFIG.replace(vocab_size=256)))
    hf_config = mapping.model_config_to_hf_config(model.model_config)
    hf_model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**hf_config)).eval()
    hf_model.load_state_dict(
        mapping.canonical_to_hf(mapping.model_to_canonical(model),
                                head_name="lm_head.weight"
                                if "lm_head.weight" in hf_model.state_dict() else "embed_out.weight"),
    )
    config = GenerationConfig(max_new_tokens=8, greedy=True)
    for prompt in PROMPTS:
        ours = generate(model, [prompt], config)[0]
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
        assert ours == out[0, len(prompt):].tolist()


def test_filter_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, True, True, True, False]]
    probs = torch.softmax(logits, -1)[0]  # 3.0: .64, 2.0: .24, 1.0: .09, ...
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, False, False, False, True]]
    assert probs[4] < 0.7 < probs[4] + probs[0]
    assert (~torch.isinf(filter_logits(logits, top_p=0.5))).sum() == 1


def test_bad_requests_are_refused(single_process_parallel):
    model = build_pythia_model(CONFIG)
    with pytest.raises(ValueError, match="detokenize"):
        generate(model, PROMPTS, GenerationConfig(stop_strings=("x",)))
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        generate(model, PROMPTS, GenerationConfig(max_new_tokens=60))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, GenerationConfig(temperature=0.0))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 250\)"):
        generate(model, [[250]], GenerationConfig())
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], GenerationConfig())
