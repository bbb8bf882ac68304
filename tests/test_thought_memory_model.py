"""ThoughtMemoryModel against a plain-PyTorch reference of the whole algorithm written here from
the notes (../shared/methods/thought_gestalt.md): S layers (causal self-attention within the
row, partial rotary), C layers (gated cross-attention to the memory), S_REP at the first EOS of
the source layer, FIFO memory, BOS seeding, per-index loss. Same logits, loss and gradients;
planted variants (detached memory writes, no seeding) must fail."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F

from megatron_latent.config import ConfigError, ModelConfig
from megatron_latent.methods.thought_memory.layers import FifoMemory
from megatron_latent.methods.thought_memory.model import (
    ThoughtMemoryModel,
    ThoughtMemoryOptions,
    default_layer_pattern,
    default_source_layer,
    stream_loss,
    stream_token_weights,
)
from megatron_latent.methods.thought_memory.streams import StreamLayout, row_arrays
from megatron_latent.models.language_model import RuntimeOptions, build_pythia_model

H, HEADS, LAYERS = 32, 2, 4
DIM = H // HEADS
LAYOUT = StreamLayout.for_vocab(60, max_content=5, max_sentences=4)  # PAD 60 .. EOD 63, L 8
L = LAYOUT.L
MODEL = ModelConfig(num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, vocab_size=64,
                    seq_length=L)
STREAM_ROWS = (4, 2, 3)  # sentences per stream; stream 1 ends its document (EOD)


def make_batch(seed: int = 0, w_eos: float = 0.05):
    """A stream batch in streams.py's layout: [B, T, L] ids/targets/weights, valid [B, T]."""
    rng = numpy.random.RandomState(seed)
    B, T = len(STREAM_ROWS), max(STREAM_ROWS)
    ids = torch.full((B, T, L), LAYOUT.pad, dtype=torch.long)
    targets = torch.full((B, T, L), LAYOUT.pad, dtype=torch.long)
    weights = torch.zeros(B, T, L)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(STREAM_ROWS):
        for t in range(n):
            content = rng.randint(0, 60, size=rng.randint(1, LAYOUT.max_content + 1))
            row = row_arrays(content, LAYOUT, eod=(b == 1 and t == n - 1), w_eos=w_eos)
            ids[b, t], targets[b, t], weights[b, t] = (torch.from_numpy(a) for a in row)
        valid[b, :n] = True
    return ids, targets, weights, valid


def make_model(memory_size=40, newest_first=False, loss_mode="paper", seed=0):
    options = ThoughtMemoryOptions(eos_id=LAYOUT.eos, memory_size=memory_size,
                                   newest_first=newest_first, loss_mode=loss_mode)
    model = build_pythia_model(MODEL, RuntimeOptions(), model_class=ThoughtMemoryModel,
                               options=options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.8)
            elif name.endswith("norm.weight") or "layernorm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------- reference (no megatron)


def ln(P, prefix, x, eps):
    return F.layer_norm(x, (H,), P[prefix + ".weight"], P[prefix + ".bias"], eps)


def rope(x):
    """GPT-NeoX rotate-half on the first 25% of head dims, positions 0..len-1; x [heads, s, d]."""
    rd = int(DIM * 0.25)
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    xr, xp = x[..., :rd], x[..., rd:]
    rotated = torch.cat([-xr[..., rd // 2:], xr[..., : rd // 2]], -1)
    return torch.cat([xr * cos + rotated * sin, xp], -1)


def mlp(P, p, y):
    hidden = F.gelu(y @ P[p + ".mlp.linear_fc1.weight"].T + P[p + ".mlp.linear_fc1.bias"])
    return hidden @ P[p + ".mlp.linear_fc2.weight"].T + P[p + ".mlp.linear_fc2.bias"]


def s_layer(P, p, x, eps):
    """x + attn(LN1 x) + mlp(LN2 x); causal within the row. qkv rows per head [q | k | v]."""
    y = ln(P, p + ".input_layernorm", x, eps)
    w = P[p + ".self_attention.linear_qkv.weight"].view(HEADS, 3, DIM, H)
    bias = P[p + ".self_attention.linear_qkv.bias"].view(HEADS, 3, DIM)
    q, k, v = (torch.einsum("sh,ndh->nsd", y, w[:, i]) + bias[:, i, None] for i in range(3))
    q, k = rope(q), rope(k)
    scores = q @ k.transpose(1, 2) / math.sqrt(DIM)
    scores = scores.masked_fill(torch.ones(len(x), len(x)).triu(1).bool(), float("-inf"))
    att = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(len(x), H)
    att = att @ P[p + ".self_attention.linear_proj.weight"].T + P[p + ".self_attention.linear_proj.bias"]
    return x + att + mlp(P, p, ln(P, p + ".pre_mlp_layernorm", x, eps))


def slot_code(n):
    angles = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (
        torch.arange(0, H, 2, dtype=torch.float64) / H)
    code = torch.stack([angles.sin(), angles.cos()], -1).reshape(n, H)  # even sin, odd cos
    return (code / code.norm(dim=-1, keepdim=True)).float()


def c_layer(P, p, x, memory, eps, newest_first):
    """x + g * xattn(LN1 x, memory) + mlp(LN2 x); xattn = 0 with an empty memory."""
    y = ln(P, p + ".input_layernorm", x, eps)
    out = mlp(P, p, ln(P, p + ".pre_mlp_layernorm", x, eps))
    if not memory:
        return x + out
    mem = torch.stack(memory)  # [c, H] oldest first
    pe = slot_code(len(memory))
    pe = pe.flip(0) if newest_first else pe
    a = p + ".cross_attention."
    wkv = P[a + "linear_kv.weight"].view(HEADS, 2, DIM, H)
    bkv = P[a + "linear_kv.bias"].view(HEADS, 2, DIM)
    q = (y @ P[a + "linear_q.weight"].T + P[a + "linear_q.bias"]).view(-1, HEADS, DIM)
    k = torch.einsum("ch,ndh->ncd", mem + pe, wkv[:, 0]) + bkv[:, 0, None]
    v = torch.einsum("ch,ndh->ncd", mem, wkv[:, 1]) + bkv[:, 1, None]
    att = torch.softmax(q.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(DIM), -1) @ v
    att = att.transpose(0, 1).reshape(len(x), H)
    att = att @ P[a + "linear_proj.weight"].T + P[a + "linear_proj.bias"]
    return x + P[p + ".gate"] * att + out


def reference(P, batch, pattern, source, memory_size, eps, newest_first=False, seed=True,
              detach=False, loss_mode="paper"):
    """(logits [B, T, L, V], loss): streams run one by one, sentences one by one."""
    ids, targets, weights, valid = batch
    B, T = valid.shape
    logits = torch.zeros(B, T, L, P["output_layer.weight"].shape[0])
    ce = torch.zeros(B, T, L)
    srep_rows = {}  # (t, b) -> (penalty) for rows that wrote
    for b in range(B):
        memory, prev = [], None
        for t in range(T):
            x = P["embedding.word_embeddings.weight"][ids[b, t]]
            if seed and prev is not None:
                x = torch.cat([prev[None], x[1:]])
            src = None
            for i, kind in enumerate(pattern):
                p = f"decoder.layers.{i}"
                x = s_layer(P, p, x, eps) if kind == "S" else c_layer(
                    P, p, x, memory, eps, newest_first)
                src = x if i == source else src
            out = ln(P, "decoder.final_layernorm", x, eps) @ P["output_layer.weight"].T
            logits[b, t] = out
            ce[b, t] = F.cross_entropy(out, targets[b, t], reduction="none")
            eos = (ids[b, t] == LAYOUT.eos).nonzero()
            prev = None
            if valid[b, t] and len(eos):
                s = ln(P, "s_rep.norm", src[eos[0, 0]], eps) @ P["s_rep.linear.weight"].T
                s = s + P["s_rep.linear.bias"]
                norm = s.norm()
                srep_rows[t, b] = (0.9 - norm).clamp(min=0) ** 2 + (norm - 1.1).clamp(min=0) ** 2
                prev = s / norm
                memory = (memory + [prev.detach() if detach else prev])[-memory_size:]
    loss = torch.zeros(())
    w = weights * valid[..., None]
    for t in range(T):
        if loss_mode == "paper":
            loss = loss + (w[:, t] * ce[:, t]).sum() / w[:, t].sum()
        penalties = [srep_rows[t, b] for b in range(B) if (t, b) in srep_rows]
        if penalties:
            loss = loss + 0.01 * torch.stack(penalties).mean()
    if loss_mode == "token_mean":
        loss = loss + (w * ce).sum() / w.sum()
    return logits, loss


class DetachingFifo(FifoMemory):
    """Planted bug: memory writes cut from the graph."""

    def write(self, vectors, mask):
        super().write(vectors.detach(), mask)


def run_both(model, batch, **ref_kwargs):
    """Model and reference (same weights) forward + backward; (logits, loss, grads) each."""
    out, aux = model(*batch, return_logits=True)
    loss = out.sum() + aux["s_rep_hinge_loss"]
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    P = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref_logits, ref_loss = reference(
        P, batch, model.pattern, model.source_layer, model.thought.memory_size,
        model.config.layernorm_epsilon, model.thought.newest_first,
        loss_mode=model.thought.loss_mode, **ref_kwargs)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in P.items()}
    return (aux["logits"].detach(), loss.detach(), grads), (ref_logits.detach(), ref_loss.detach(),
                                                             ref_grads)


def assert_grads_close(grads, ref_grads):
    for name, grad in grads.items():
        ref = ref_grads[name] if ref_grads[name] is not None else torch.zeros_like(grad)
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("memory_size, newest_first, loss_mode", [
    (40, False, "paper"), (2, False, "paper"), (2, True, "token_mean")],
    ids=["M40", "M2-evicting", "M2-newest-first-token-mean"])
def test_matches_reference_logits_loss_and_gradients(single_process_parallel, memory_size,
                                                     newest_first, loss_mode):
    model = make_model(memory_size, newest_first, loss_mode)
    batch = make_batch()
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = run_both(model, batch)
    valid = batch[3]
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, ref_grads)
    # Every parameter is reached (memory, gates, S_REP head and seeding included).
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name


def test_planted_detached_memory_fails_gradients_only(single_process_parallel):
    model = make_model()
    model.memory_class = DetachingFifo
    batch = make_batch()
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = run_both(model, batch)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)  # forward unchanged
    with pytest.raises(AssertionError):
        assert_grads_close(grads, ref_grads)


def test_planted_no_seeding_fails_forward(single_process_parallel):
    model = make_model()
    (logits, loss, _), (ref_logits, ref_loss, _) = run_both(model, make_batch(), seed=False)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # Sentence 0 of each stream is never seeded and its memory is empty: identical there.
    torch.testing.assert_close(logits[:, 0], ref_logits[:, 0], atol=1e-5, rtol=1e-5)


def test_s_layers_ignore_memory_and_c_layers_need_it(single_process_parallel):
    model = make_model()
    x = torch.randn(L, 2, H)
    rotary = model.rotary_pos_emb(L)
    s_layer_module, c_layer_module = model.decoder.layers[0], model.decoder.layers[1]
    plain, _ = s_layer_module(x, rotary_pos_emb=rotary)
    memory, counts = torch.randn(3, 2, H), torch.tensor([3, 1])
    with_memory, context = s_layer_module(x, context=memory, context_mask=counts,
                                          rotary_pos_emb=rotary)
    assert torch.equal(plain, with_memory) and context is memory
    with pytest.raises(ValueError):
        c_layer_module(x)
    assert model.pattern == "SCSC" and model.source_layer == 2


def test_invalid_rows_write_nothing_and_weigh_nothing(single_process_parallel):
    model = make_model()
    batch = make_batch()
    out, aux = model(*batch)
    valid = batch[3]
    assert aux["memory_writes"].item() == int(valid.sum())
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))
    torch.testing.assert_close(out.sum(), stream_loss(aux["per_token_ce"], batch[2], valid))


def test_stream_token_weights():
    weights = torch.tensor([[[1.0, 0.05, 0.0], [2.0, 0.0, 0.0]],
                            [[1.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    paper = stream_token_weights(weights, valid, "paper")
    torch.testing.assert_close(paper.sum(dim=(0, 2)), torch.ones(2))
    torch.testing.assert_close(paper[0, 0], torch.tensor([1.0, 0.05, 0.0]) / 3.05)
    torch.testing.assert_close(paper[0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(paper[1, 1], torch.zeros(3))
    mean = stream_token_weights(weights, valid, "token_mean")
    torch.testing.assert_close(mean.sum(), torch.tensor(1.0))
    torch.testing.assert_close(mean[0, 1, 0], torch.tensor(2.0 / 5.05))
    empty = stream_token_weights(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(1, 2, 3))


def test_options_defaults_and_validation():
    assert default_layer_pattern(12) == "SC" * 6
    assert default_source_layer("SC" * 6) == 6
    assert default_source_layer("SC" * 3) == 4  # 3 is C: rounded up to the next S
    assert default_source_layer("SSC") == 1
    assert default_source_layer("SC") == 0  # no S at or after L/2: rounded down
    options = ThoughtMemoryOptions(eos_id=1)
    assert (options.memory_size, options.newest_first, options.hinge_weight,
            options.s_rep_dropout, options.loss_mode) == (40, False, 0.01, 0.0, "paper")
    assert options.resolved(12) == ("SC" * 6, 6)
    for bad in (dict(layer_pattern="SCX"), dict(layer_pattern="SC"), dict(source_layer=3),
                dict(memory_size=0), dict(loss_mode="mean"), dict(layer_pattern="CCC")):
        with pytest.raises(ConfigError):
            ThoughtMemoryOptions(eos_id=1, **bad).resolved(3)


def test_block_forward_passes_memory_like_run_sentence(single_process_parallel):
    """megatron-core's TransformerBlock.forward hands the memory to every layer: the mixed
    decoder run through it gives run_sentence's output."""
    model = make_model()
    x, memory, counts = torch.randn(L, 3, H), torch.randn(40, 3, H), torch.tensor([0, 2, 40])
    hidden, _ = model.run_sentence(x, memory, counts)
    block = model.decoder(hidden_states=x, attention_mask=None, context=memory,
                          context_mask=counts, rotary_pos_emb=model.rotary_pos_emb(L))
    torch.testing.assert_close(block, hidden, atol=1e-6, rtol=1e-6)
