"""The concept model (`--method concepts`) against a plain-PyTorch reference of CoCoMix written
here from the notes (../shared/methods/cocomix.md, "Student"): parallel-residual Pythia blocks
with partial rotary; at the insertion block the custom norm (μ, unbiased σ + 1e-5), the head
z = W(x − p) + b, the concept loss (mean of the K label CEs, unshifted, weights), the top-32
raw values compressed by Linear(C→d) + p and de-normalised, interleaving h_1, ĉ_1, … through the
upper blocks at rotary positions 0,0,1,1,… (or 0..2T−1), the ĉ slots into the final norm and
the head. Same logits, losses and every gradient; the "add" variant too."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_latent.config import ConfigError, ModelConfig
from megatron_latent.methods.concepts import ConceptOptions, build_concept_model
from megatron_latent.methods.concepts.model import CONCEPT_CE_KEY, SCALED_LOSS_KEY
from megatron_latent.models.language_model import RuntimeOptions
from megatron_latent.models.sharded_loss import sharded_cross_entropy

H, HEADS, LAYERS, VOCAB, C, TOPK, K = 32, 2, 4, 64, 48, 5, 3
DIM = H // HEADS
MODEL = ModelConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS,
                    vocab_size=VOCAB, seq_length=8)


def make_model(seed: int = 0, **option_overrides):
    options = ConceptOptions(num_concepts=C, top_k=TOPK, k_attr=K, insert_layer=2,
                             loss_weight=0.3, **option_overrides)
    model = build_concept_model(MODEL, RuntimeOptions(), "cpu", options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm.weight" in name or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        model.concepts.linear.bias.sub_(0.8)  # chosen logits of both signs (kept raw, no ReLU)
    return model


def make_batch(seed: int = 1, b: int = 3, s: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    concept_ids = torch.randint(0, C, (b, s, K), generator=g)
    weights = torch.ones(b, s, K)
    weights[:, -1] = 0  # the window's last position carries no concept loss
    weights[0, 2, 1] = 0  # one filtered label
    return ids, labels, concept_ids, weights


# ---------------------------------------------------------------- reference (no megatron)


def ln(P, prefix, x, eps):
    return F.layer_norm(x, (H,), P[prefix + ".weight"], P[prefix + ".bias"], eps)


def rope(x, positions):
    """GPT-NeoX rotate-half on the first 25% of head dims at `positions`; x [heads, s, d]."""
    rd = int(DIM * 0.25)
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    angles = positions.float()[:, None] * inv
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    xr, xp = x[..., :rd], x[..., rd:]
    rotated = torch.cat([-xr[..., rd // 2:], xr[..., : rd // 2]], -1)
    return torch.cat([xr * cos + rotated * sin, xp], -1)


def block(P, i, x, positions, eps):
    """x + attn(LN1 x) + mlp(LN2 x), causal over x's rows; x [s, H]."""
    p = f"decoder.layers.{i}"
    y = ln(P, p + ".input_layernorm", x, eps)
    w = P[p + ".self_attention.linear_qkv.weight"].view(HEADS, 3, DIM, H)
    bias = P[p + ".self_attention.linear_qkv.bias"].view(HEADS, 3, DIM)
    q, k, v = (torch.einsum("sh,ndh->nsd", y, w[:, j]) + bias[:, j, None] for j in range(3))
    q, k = rope(q, positions), rope(k, positions)
    scores = q @ k.transpose(1, 2) / math.sqrt(DIM)
    scores = scores.masked_fill(torch.ones(len(x), len(x)).triu(1).bool(), float("-inf"))
    att = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(len(x), H)
    att = att @ P[p + ".self_attention.linear_proj.weight"].T \
        + P[p + ".self_attention.linear_proj.bias"]
    z = ln(P, p + ".pre_mlp_layernorm", x, eps)
    hidden = F.gelu(z @ P[p + ".mlp.linear_fc1.weight"].T + P[p + ".mlp.linear_fc1.bias"])
    out = hidden @ P[p + ".mlp.linear_fc2.weight"].T + P[p + ".mlp.linear_fc2.bias"]
    return x + att + out


def reference(P, ids, labels, concept_ids, weights, insert, mixing="interleave",
              positions="pair", eps=1e-5, steer=None):
    """(logits [b, s, V], LM CE [b, s], concept loss) for every row, one row at a time."""
    logits_rows, ce_rows, concept_num, concept_den = [], [], 0.0, 0.0
    W_c = P["concepts.compress.weight"]  # [C, H]: row j is concept j's direction
    for r in range(ids.shape[0]):
        s = ids.shape[1]
        x = P["embedding.word_embeddings.weight"][ids[r]]
        pos = torch.arange(s)
        for i in range(insert):
            x = block(P, i, x, pos, eps)
        mu = x.mean(-1, keepdim=True)
        sigma = x.std(-1, keepdim=True, unbiased=True) + 1e-5
        normed = (x - mu) / sigma
        z = (normed - P["concepts.pre_bias"]) @ P["concepts.linear.weight"].T \
            + P["concepts.linear.bias"]  # [s, C]
        if steer:
            for concept, scale in steer.items():
                z = torch.cat([z[:, :concept], z[:, concept:concept + 1] * scale,
                               z[:, concept + 1:]], dim=1)
        log_probs = torch.log_softmax(z, -1)
        ce = -log_probs.gather(-1, concept_ids[r])  # [s, K]
        concept_num = concept_num + (ce * weights[r]).sum()
        concept_den = concept_den + weights[r].sum()
        top = z.topk(TOPK, dim=-1)
        sparse = torch.zeros_like(z).scatter(-1, top.indices, top.values)  # raw, no ReLU
        c_hat = sparse @ W_c + P["concepts.compress_bias"] + P["concepts.pre_bias"]
        c_hat = c_hat * sigma + mu
        if mixing == "interleave":
            x = torch.stack([x, c_hat], dim=1).reshape(2 * s, H)
            pos = torch.arange(s).repeat_interleave(2) if positions == "pair" \
                else torch.arange(2 * s)
        else:
            x = x + c_hat
        for i in range(insert, LAYERS):
            x = block(P, i, x, pos, eps)
        if mixing == "interleave":
            x = x[1::2]
        x = ln(P, "decoder.final_layernorm", x, eps)
        logits = x @ P["output_layer.weight"].T
        logits_rows.append(logits)
        ce_rows.append(F.cross_entropy(logits, labels[r], reduction="none"))
    return (torch.stack(logits_rows), torch.stack(ce_rows), concept_num / concept_den)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("mixing,positions", [("interleave", "pair"),
                                              ("interleave", "sequential"), ("add", "pair")])
def test_concept_model_equals_the_reference_loss_and_every_gradient(
        single_process_parallel, mixing, positions):
    model = make_model(mixing=mixing, positions=positions)
    ids, labels, concept_ids, weights = make_batch()
    lm, aux = model(ids, labels=labels, concept_ids=concept_ids, concept_weights=weights)
    total = lm.mean() + aux[SCALED_LOSS_KEY]
    grads = torch.autograd.grad(total, [p for _, p in model.named_parameters()])

    P = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    logits, ce, concept = reference(P, ids, labels, concept_ids, weights, 2, mixing, positions,
                                    MODEL.layernorm_epsilon)
    ref_total = ce.mean() + 0.3 * concept
    ref_grads = torch.autograd.grad(ref_total, list(P.values()), allow_unused=True)

    torch.testing.assert_close(lm, ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux[CONCEPT_CE_KEY], concept.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux[SCALED_LOSS_KEY], 0.3 * concept, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        got_logits = model(ids)
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    # every parameter of the concept head is trained by the two losses
    for name in ("concepts.linear.weight", "concepts.compress.weight", "concepts.pre_bias",
                 "concepts.compress_bias"):
        assert dict(zip(P, ref_grads))[name].abs().sum() > 0, name


def test_steering_scales_the_chosen_concept_logits(single_process_parallel):
    model = make_model()
    ids, labels, concept_ids, weights = make_batch()
    P = {name: p.detach() for name, p in model.named_parameters()}
    model.concepts.steering = {7: 8.0, 30: -3.0}
    with torch.no_grad():
        steered = model(ids)[..., :VOCAB]
    model.concepts.steering = {}
    logits, _, _ = reference(P, ids, labels, concept_ids, weights, 2,
                             eps=MODEL.layernorm_epsilon, steer={7: 8.0, 30: -3.0})
    plain, _, _ = reference(P, ids, labels, concept_ids, weights, 2, eps=MODEL.layernorm_epsilon)
    torch.testing.assert_close(steered, logits[..., :VOCAB], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, plain[..., :VOCAB], atol=1e-3)


def test_sharded_cross_entropy_of_several_targets_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(6, 4, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = torch.randint(0, 11, (6, 4, 3), generator=g)
    got = sharded_cross_entropy(logits, targets)
    want = -torch.log_softmax(logits, -1).gather(-1, targets)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got.double() * upstream).sum(), logits)
    (g_want,) = torch.autograd.grad((want * upstream).sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-6)


def test_cached_generation_equals_the_uncached_forward(single_process_parallel):
    """The interleaved KV caches (T positions below the insertion, 2T above) reproduce the
    full forward's last-position logits token by token, and a prompt prefill."""
    for mixing in ("interleave", "add"):
        model = make_model(mixing=mixing).eval()
        ids, _, _, _ = make_batch(b=2, s=7)
        with torch.no_grad():
            full = model(ids)
            context = model.make_inference_context(2, 7)
            steps = [model(ids[:, :3], inference_context=context)]
            context.increment_sequence_len_offset(3)
            for t in range(3, 7):
                steps.append(model(ids[:, t:t + 1], inference_context=context))
                context.increment_sequence_len_offset(1)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused_clearly(single_process_parallel):
    with pytest.raises(ConfigError, match="--concept-insert-layer 4"):
        make_model(insert_layer=None) if False else build_concept_model(
            MODEL, RuntimeOptions(), "cpu", ConceptOptions(num_concepts=C, insert_layer=4))
    with pytest.raises(ConfigError, match="--num-concepts"):
        ConceptOptions().validate()
    with pytest.raises(ConfigError, match="--concept-top-k"):
        ConceptOptions(num_concepts=4, top_k=5).validate()
