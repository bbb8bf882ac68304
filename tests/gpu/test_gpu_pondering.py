"""Pondering on CUDA: the same per-token loss and gradients as on the CPU for the same
weights (fp32; both models built in this process), bf16 within bf16 rounding of fp32, and the
vocabulary mixing in bf16 against a float64 softmax-weighted sum."""

from __future__ import annotations

import pytest
import torch

from megatron_latent.methods import pondering
from megatron_latent.methods.pondering import (
    PonderingOptions,
    build_pondering_model,
    mix_input_embeddings,
)
from megatron_latent.models import hf_gpt_neox as mapping
from megatron_latent.models.language_model import RuntimeOptions

from hf_reference import make_gpt_neox

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

VOCAB, LAYERS, HIDDEN, HEADS, SEQ = 512, 2, 128, 2, 128  # head dim 64
VARIANTS = {
    "full-vocab-scaled": PonderingOptions(steps=3, scale_embeds=True),  # the official recipe
    "top-k-multiplied": PonderingOptions(steps=2, top_k=10, multiply_steps=True),
}


@pytest.fixture(scope="module")
def weights():
    """(model config, canonical weights): a random GPTNeoX with peaked output distributions,
    so the mixtures are far from the mean embedding row (as in tests/test_pondering.py)."""
    hf_model = make_gpt_neox(VOCAB, LAYERS, HIDDEN, HEADS, seed=0, max_positions=SEQ)
    with torch.no_grad():
        hf_model.get_output_embeddings().weight.mul_(8.0)
        hf_model.get_input_embeddings().weight.mul_(4.0)
    config = mapping.hf_config_to_model_config(hf_model.config.to_dict()).replace(
        attention_backend="sdpa")
    return config, mapping.hf_to_canonical(hf_model.state_dict(), VOCAB)


@pytest.fixture(scope="module")
def batch():
    # Seed 14: the closest call between the 10th and 11th logit of any pass is 9e-4 (the
    # logits reach 8, where CPU and CUDA differ by a few 1e-7).
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(14))
    return tokens[:, :-1], tokens[:, 1:]


def build(weights, options, device, dtype=torch.float32):
    config, canonical = weights
    runtime = RuntimeOptions(params_dtype=dtype, bf16=dtype == torch.bfloat16)
    model = build_pondering_model(config, runtime, device, options)
    mapping.load_canonical(model, canonical)
    assert next(model.parameters()).device.type == torch.device(device).type
    return model.train()


def loss_and_grads(model, batch):
    """(per-token loss [b, s], {name: gradient of the mean loss}) in float64 on the CPU."""
    device = next(model.parameters()).device
    inputs, labels = (t.to(device) for t in batch)
    per_token = model(inputs, labels=labels)
    per_token.float().mean().backward()
    return (per_token.detach().double().cpu(),
            {n: p.grad.double().cpu() for n, p in model.named_parameters()})


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_pondering_on_cuda_equals_the_cpu(use_device, weights, batch, options, monkeypatch):
    margins = []
    if options.top_k:
        # Top-N picks a set: guard that no pass sits on a tie between the N-th and N+1-th
        # logit, where CPU/CUDA rounding (~1e-6) could pick different tokens legitimately.
        original = pondering.mix_input_embeddings

        def recording(logits, *args, **kwargs):
            top = logits.detach().float().topk(options.top_k + 1, dim=-1).values
            margins.append((top[..., -2] - top[..., -1]).min().item())
            return original(logits, *args, **kwargs)

        monkeypatch.setattr(pondering.model, "mix_input_embeddings", recording)
    use_device("cpu")
    cpu_loss, cpu_grads = loss_and_grads(build(weights, options, "cpu"), batch)
    if options.top_k:
        assert min(margins) > 2e-4, "the inputs sit near a top-N tie; choose another seed"
    cuda = use_device("cuda")
    cuda_loss, cuda_grads = loss_and_grads(build(weights, options, cuda), batch)

    # fp32 on the CPU is within 2e-6 (per token) and 1.1e-6 of each tensor's largest
    # gradient of float64 on these shapes; the bounds leave 10x for CUDA's kernels.
    assert (cuda_loss - cpu_loss).abs().max().item() <= 2e-5
    assert set(cuda_grads) == set(cpu_grads)
    for name, expected in cpu_grads.items():
        scale = expected.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(cuda_grads[name], expected, rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_pondering_in_bf16_stays_within_bf16_rounding_of_fp32(cuda, weights, batch, options):
    fp32_loss, fp32_grads = loss_and_grads(build(weights, options, cuda), batch)
    bf16_loss, bf16_grads = loss_and_grads(build(weights, options, cuda, torch.bfloat16), batch)
    assert torch.isfinite(bf16_loss).all()
    # Measured with the same weights in bf16 on the CPU against float64: mean loss off by
    # 4e-4 (full vocabulary) and 1.2e-3 (top-10, where bf16 may pick another 10th token),
    # per token 0.9e-2 and 1.2e-2 on average, gradients 2-3% of each tensor's norm. The
    # loss is ~7.6, where one bf16 step of a logit is 0.03. Bounds: ~3-8x those.
    assert abs(bf16_loss.mean().item() - fp32_loss.mean().item()) <= 1e-2
    assert (bf16_loss - fp32_loss).abs().mean().item() <= 4e-2
    for name, expected in fp32_grads.items():
        error = (bf16_grads[name] - expected).norm() / expected.norm()
        assert error.item() <= 0.1, name


MIXING_CASES = {
    "flat": (1.0, 0.0, 0),        # many tokens share the mass: a long sum
    "peaked+200": (3.0, 200.0, 0),  # large logits, where bf16 steps are 1.0: the shift
    "flat-top-20": (1.0, 0.0, 20),
    "peaked+200-top-20": (3.0, 200.0, 20),
}


@pytest.mark.parametrize("case", MIXING_CASES.values(), ids=MIXING_CASES.keys())
def test_mixing_in_bf16_matches_float64(cuda, case):
    scale, offset, top_k = case
    generator = torch.Generator().manual_seed(0)
    vocab, hidden = 50304, 256  # Pythia's padded vocabulary
    logits = scale * torch.randn(32, 2, vocab, generator=generator) + offset
    if top_k:
        # Top-N picks a set: lift N random tokens per row clear of the rest (the others stay
        # below offset + 4.6 scale), so that no bf16 tie at the N-th place leaves the choice
        # to a kernel's tie-breaking.
        chosen = torch.rand(32, 2, vocab, generator=generator).argsort(dim=-1)[..., :top_k]
        lift = scale * (6.0 + torch.rand(32, 2, top_k, generator=generator))
        logits.scatter_(-1, chosen, offset + lift)
    logits = logits.bfloat16()
    table = (0.02 * torch.randn(vocab, hidden, generator=generator)).bfloat16()
    probe = torch.randn(32, 2, hidden, generator=generator, dtype=torch.float64)

    # float64 reference from the same (bf16-representable) values, by the definition.
    logits64 = logits.double().requires_grad_()
    table64 = table.double().requires_grad_()
    if top_k:
        values, index = logits64.topk(top_k, dim=-1)
        expected = torch.einsum("sbk,sbkh->sbh", torch.softmax(values, -1), table64[index])
    else:
        expected = torch.softmax(logits64, dim=-1) @ table64
    (expected * probe).sum().backward()

    logits_cuda = logits.to(cuda).requires_grad_()
    table_cuda = table.to(cuda).requires_grad_()
    mixed = mix_input_embeddings(logits_cuda, table_cuda, top_k=top_k)
    assert mixed.dtype == torch.bfloat16 and torch.isfinite(mixed).all()
    (mixed.double() * probe.to(cuda)).sum().backward()

    def row_error(ours, reference):
        ours = ours.double().cpu()
        return ((ours - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()

    # u = 2^-8, bf16's unit roundoff. Sums over the vocabulary accumulate in fp32; what is
    # left is rounding the exponentials, the mixture and the gradients to bf16. Measured on
    # the CPU: mixture <= 1.8u per row, logit gradients <= 4.2u, table gradient <= 1.4u.
    # Sums accumulated in bf16 over 50304 terms would be off by orders of magnitude more.
    u = 2.0 ** -8
    assert row_error(mixed.detach(), expected.detach()) <= 4 * u
    assert row_error(logits_cuda.grad, logits64.grad) <= 10 * u
    table_error = (table_cuda.grad.double().cpu() - table64.grad).norm() / table64.grad.norm()
    assert table_error.item() <= 4 * u
