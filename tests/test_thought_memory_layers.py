"""thought-memory blocks against plain-PyTorch references written here from the notes
(../shared/methods/thought_gestalt.md): slot code, memory cross-attention (outputs, gradients,
empty rows), the gated C layer, the S_REP head and hinge, the FIFO memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import build_module

from megatron_latent.config import ModelConfig
from megatron_latent.methods.thought_memory.layers import (
    FifoMemory,
    SentenceVectorHead,
    gated_cross_attention_layer_spec,
    memory_cross_attention_spec,
    slot_position_code,
)
from megatron_latent.models.language_model import RuntimeOptions, build_transformer_config
from megatron_latent.training.engines.cpu import _no_weight_decay

H, HEADS, M = 32, 4, 5
MODEL = ModelConfig(num_layers=1, hidden_size=H, num_attention_heads=HEADS, vocab_size=64,
                    seq_length=8)


def config(**changes):
    return build_transformer_config(MODEL.replace(**changes), RuntimeOptions())


# ---------------------------------------------------------------- references (no megatron)


def reference_code(num_slots: int, hidden: int) -> torch.Tensor:
    rows = []
    for i in range(num_slots):
        row = [math.sin(i / 10000 ** (d / hidden)) if d % 2 == 0
               else math.cos(i / 10000 ** ((d - 1) / hidden)) for d in range(hidden)]
        norm = math.sqrt(sum(v * v for v in row))
        rows.append([v / norm for v in row])
    return torch.tensor(rows, dtype=torch.float64).float()


def xattn_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(*shape, generator=g) for name, shape in {
        "wq": (H, H), "bq": (H,), "wk": (H, H), "bk": (H,), "wv": (H, H), "bv": (H,),
        "wo": (H, H), "bo": (H,)}.items()}


def reference_xattn(w, x, m, counts, newest_first=False):
    """softmax over the filled slots of q.(W_k(m + pe) + b_k), values W_v m + b_v; 0 if none."""
    s, b, _ = x.shape
    dim = H // HEADS
    code = reference_code(m.shape[0], H)
    rows = []
    for r in range(b):
        c = int(counts[r])
        if c == 0:
            rows.append(torch.zeros(s, H))
            continue
        mem = m[:c, r]
        pe = code[:c].flip(0) if newest_first else code[:c]
        q = (x[:, r] @ w["wq"].T + w["bq"]).view(s, HEADS, dim).transpose(0, 1)
        k = ((mem + pe) @ w["wk"].T + w["bk"]).view(c, HEADS, dim).transpose(0, 1)
        v = (mem @ w["wv"].T + w["bv"]).view(c, HEADS, dim).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), dim=-1) @ v
        rows.append(att.transpose(0, 1).reshape(s, H) @ w["wo"].T + w["bo"])
    return torch.stack(rows, dim=1)


def load_xattn(module, w):
    """megatron-core's linear_kv rows are per head [key | value]."""
    dim = H // HEADS
    kv_w = torch.cat([w["wk"].view(HEADS, dim, H), w["wv"].view(HEADS, dim, H)], 1).view(2 * H, H)
    kv_b = torch.cat([w["bk"].view(HEADS, dim), w["bv"].view(HEADS, dim)], 1).view(2 * H)
    with torch.no_grad():
        module.linear_q.weight.copy_(w["wq"])
        module.linear_q.bias.copy_(w["bq"])
        module.linear_kv.weight.copy_(kv_w)
        module.linear_kv.bias.copy_(kv_b)
        module.linear_proj.weight.copy_(w["wo"])
        module.linear_proj.bias.copy_(w["bo"])


def make_xattn(newest_first=False, **changes):
    return build_module(memory_cross_attention_spec(newest_first), config=config(**changes),
                        layer_number=1)


def inputs(seed: int = 1, s: int = 6, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, b, H, generator=g), torch.randn(M, b, H, generator=g)


COUNTS = torch.tensor([0, 1, M, 3])  # empty, one slot, full, partial


# ---------------------------------------------------------------- slot code


@pytest.mark.parametrize("hidden", [32, 7])
def test_slot_code_values_and_unit_norm(hidden):
    code = slot_position_code(6, hidden)
    torch.testing.assert_close(code, reference_code(6, hidden), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(code.norm(dim=-1), torch.ones(6))
    assert code.dtype == torch.float32
    assert slot_position_code(3, hidden, dtype=torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------- cross-attention


@pytest.mark.parametrize("newest_first", [False, True], ids=["oldest=0", "newest=0"])
def test_cross_attention_outputs_and_gradients(single_process_parallel, newest_first):
    module = make_xattn(newest_first)
    w = xattn_weights()
    load_xattn(module, w)
    x, m = inputs()
    x1, m1 = x.clone().requires_grad_(), m.clone().requires_grad_()
    out, bias = module(x1, m1, COUNTS)
    assert bias is None
    ref_w = {k: v.clone().requires_grad_() for k, v in w.items()}
    x2, m2 = x.clone().requires_grad_(), m.clone().requires_grad_()
    ref = reference_xattn(ref_w, x2, m2, COUNTS, newest_first)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m1.grad, m2.grad, atol=1e-5, rtol=1e-4)
    dim = H // HEADS
    kv_grad = module.linear_kv.weight.grad.view(HEADS, 2, dim, H)
    torch.testing.assert_close(kv_grad[:, 0].reshape(H, H), ref_w["wk"].grad, atol=1e-5,
                               rtol=1e-4)
    torch.testing.assert_close(kv_grad[:, 1].reshape(H, H), ref_w["wv"].grad, atol=1e-5,
                               rtol=1e-4)
    for name, param in (("wq", module.linear_q.weight), ("bq", module.linear_q.bias),
                        ("wo", module.linear_proj.weight), ("bo", module.linear_proj.bias)):
        torch.testing.assert_close(param.grad, ref_w[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    # Empty slots get no gradient: the memory beyond each row's count is never read.
    for r, c in enumerate(COUNTS.tolist()):
        assert torch.equal(m1.grad[c:, r], torch.zeros_like(m1.grad[c:, r]))


def test_every_token_sees_every_filled_slot(single_process_parallel):
    """No causal mask: with full memory and as many tokens as slots, token 0 sees slot M-1."""
    module = make_xattn()
    w = xattn_weights(2)
    load_xattn(module, w)
    x, m = inputs(3, s=M)
    full = torch.full((4,), M)
    torch.testing.assert_close(module(x, m, full)[0], reference_xattn(w, x, m, full),
                               atol=1e-5, rtol=1e-5)


def test_empty_memory_row_is_exactly_zero(single_process_parallel):
    module = make_xattn()
    load_xattn(module, xattn_weights())
    x, m = inputs()
    x.requires_grad_()
    out, _ = module(x, m, COUNTS)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # bias included
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.equal(x.grad[:, 0], torch.zeros_like(x.grad[:, 0]))
    assert torch.isfinite(x.grad).all()
    # A memory with no slots at all.
    none, _ = module(x, m[:0], torch.zeros(4, dtype=torch.long))
    assert torch.equal(none, torch.zeros_like(x))


def test_cross_attention_dropout_comes_from_the_config(single_process_parallel):
    module = make_xattn(attention_dropout=0.2)
    assert module.core_attention.dropout_p == 0.2
    load_xattn(module, xattn_weights())
    x, m = inputs()
    module.train()
    full = torch.full((4,), M)
    torch.manual_seed(0)
    first, _ = module(x, m, full)
    torch.manual_seed(1)
    second, _ = module(x, m, full)
    assert not torch.allclose(first, second)
    module.eval()
    torch.testing.assert_close(module(x, m, full)[0], module(x, m, full)[0])


# ---------------------------------------------------------------- C layer


def reference_mlp(layer, y):
    fc1, fc2 = layer.mlp.linear_fc1, layer.mlp.linear_fc2
    return F.gelu(y @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias


def reference_layer(layer, w, x, m, counts, gate):
    ln1, ln2 = layer.input_layernorm, layer.pre_mlp_layernorm
    y1 = F.layer_norm(x, (H,), ln1.weight, ln1.bias, ln1.eps)
    y2 = F.layer_norm(x, (H,), ln2.weight, ln2.bias, ln2.eps)
    return x + gate * reference_xattn(w, y1, m, counts) + reference_mlp(layer, y2)


def make_layer():
    layer = build_module(gated_cross_attention_layer_spec(), config=config(), layer_number=1)
    w = xattn_weights(3)
    load_xattn(layer.cross_attention, w)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            norm.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
            norm.bias.copy_(0.1 * torch.randn(H, generator=g))
        layer.mlp.linear_fc1.bias.copy_(0.1 * torch.randn(4 * H, generator=g))
        layer.mlp.linear_fc2.bias.copy_(0.1 * torch.randn(H, generator=g))
    return layer, w


def test_gate_init_shape_and_no_weight_decay(single_process_parallel):
    layer, _ = make_layer()
    assert layer.gate.shape == (1,) and layer.gate.item() == 1.0
    names = {name for name, p in layer.named_parameters() if _no_weight_decay(name, p)}
    assert "gate" in names
    assert not any("self_attention" in name for name, _ in layer.named_parameters())


@pytest.mark.parametrize("gate", [1.0, 0.5, 0.0])
def test_c_layer_matches_reference(single_process_parallel, gate):
    layer, w = make_layer()
    with torch.no_grad():
        layer.gate.fill_(gate)
    x, m = inputs(5)
    out, context = layer(x, context=m, context_mask=COUNTS)
    assert context is m
    ref = reference_layer(layer, w, x, m, COUNTS, gate)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The empty-memory row is the MLP branch only.
    ln2 = layer.pre_mlp_layernorm
    mlp_only = x[:, 0] + reference_mlp(layer, F.layer_norm(x[:, 0], (H,), ln2.weight, ln2.bias,
                                                            ln2.eps))
    torch.testing.assert_close(out[:, 0], mlp_only, atol=1e-6, rtol=1e-6)


def test_gate_gradient(single_process_parallel):
    layer, w = make_layer()
    x, m = inputs(6)
    out, _ = layer(x, context=m, context_mask=COUNTS)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * probe).sum().backward()
    ln1 = layer.input_layernorm
    xattn = reference_xattn(w, F.layer_norm(x, (H,), ln1.weight, ln1.bias, ln1.eps), m, COUNTS)
    expected = (xattn * probe).sum()
    torch.testing.assert_close(layer.gate.grad, expected.detach().view(1), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- S_REP


def test_sentence_vector_matches_reference_and_is_unit(single_process_parallel):
    head = SentenceVectorHead(config(), dropout=0.15).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        head.norm.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
        head.norm.bias.copy_(0.1 * torch.randn(H, generator=g))
        head.linear.bias.copy_(0.1 * torch.randn(H, generator=g))
    hidden = torch.randn(6, H, generator=g)
    valid = torch.tensor([True, True, False, True, False, True])
    unit, hinge = head(hidden, valid)
    s = F.layer_norm(hidden, (H,), head.norm.weight, head.norm.bias, head.norm.eps)
    s = s @ head.linear.weight.T + head.linear.bias
    norm = s.norm(dim=-1)
    penalty = torch.clamp(0.9 - norm, min=0) ** 2 + torch.clamp(norm - 1.1, min=0) ** 2
    torch.testing.assert_close(unit, s / norm[:, None])
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(hinge, 0.01 * penalty[valid].mean())
    assert head.dropout == 0.15
    head.train()
    assert not torch.allclose(head(hidden, valid)[0], unit)


@pytest.mark.parametrize("bias_norm, expected", [
    (0.5, 0.01 * 0.4 ** 2), (0.95, 0.0), (1.0, 0.0), (1.1, 0.0), (1.5, 0.01 * 0.4 ** 2),
])
def test_hinge_values(single_process_parallel, bias_norm, expected):
    """A zero linear weight makes every s equal to the bias, of a chosen norm."""
    head = SentenceVectorHead(config())
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.full((H,), bias_norm / math.sqrt(H)))
    unit, hinge = head(torch.randn(3, H))
    torch.testing.assert_close(hinge, torch.tensor(expected), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))


def test_hinge_averages_over_valid_rows_only(single_process_parallel):
    head = SentenceVectorHead(config())
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.fill_(0.5 / math.sqrt(H))
    valid = torch.tensor([True, False, False, False])
    _, hinge = head(torch.randn(4, H), valid)
    torch.testing.assert_close(hinge, torch.tensor(0.01 * 0.4 ** 2))
    _, none = head(torch.randn(4, H), torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0


# ---------------------------------------------------------------- FIFO memory


def test_fifo_order_mask_and_eviction():
    memory = FifoMemory(3, batch=2, hidden=1)
    row0_writes = []
    for step in range(5):
        mask = torch.tensor([True, step % 2 == 0])  # row 1 writes at steps 0, 2, 4
        memory.write(torch.tensor([[float(step)], [10.0 + step]]), mask)
        row0_writes.append(float(step))
        m, counts = memory.read()
        assert m.shape == (3, 2, 1)
        expected0 = row0_writes[-3:]
        assert counts[0].item() == len(expected0)
        assert m[: len(expected0), 0, 0].tolist() == expected0
        for r in range(2):  # nothing lands beyond a row's count (masked writes included)
            assert torch.equal(m[counts[r]:, r], torch.zeros_like(m[counts[r]:, r]))
    assert counts.tolist() == [3, 3]
    assert m[:, 0, 0].tolist() == [2.0, 3.0, 4.0]  # oldest first, 0 and 1 evicted
    assert m[:, 1, 0].tolist() == [10.0, 12.0, 14.0]
    partial = FifoMemory(4, batch=1, hidden=2)
    partial.write(torch.ones(1, 2), torch.tensor([True]))
    m, counts = partial.read()
    assert counts.tolist() == [1] and torch.equal(m[1:], torch.zeros(3, 1, 2))


def gradient_reaches_earliest(memory_class: type) -> bool:
    """Write three vectors (capacity 3), read, and ask whether the first one gets a gradient."""
    memory = memory_class(3, batch=1, hidden=2)
    vectors = [torch.randn(1, 2, requires_grad=True) for _ in range(3)]
    for v in vectors:
        memory.write(v * 1.0, torch.tensor([True]))
    m, _ = memory.read()
    if not m.requires_grad:
        return False
    (m * torch.arange(1.0, 4.0)[:, None, None]).sum().backward()
    grads = [v.grad for v in vectors]
    return all(g is not None and torch.equal(g, torch.full((1, 2), i + 1.0))
               for i, g in enumerate(grads))


class DetachingFifo(FifoMemory):
    """The 'detach' ablation: what FifoMemory must not do."""

    def write(self, vectors, mask):
        super().write(vectors.detach(), mask)


def test_gradients_flow_from_a_later_read_into_earlier_writes():
    assert gradient_reaches_earliest(FifoMemory)
    assert not gradient_reaches_earliest(DetachingFifo)


def test_evicted_vector_gets_no_gradient_and_masked_write_is_ignored():
    memory = FifoMemory(2, batch=2, hidden=2)
    vectors = [torch.randn(2, 2, requires_grad=True) for _ in range(3)]
    for v in vectors:
        memory.write(v, torch.tensor([True, False]))
    m, counts = memory.read()
    assert counts.tolist() == [2, 0]
    m.sum().backward()
    assert torch.equal(vectors[0].grad, torch.zeros(2, 2))  # evicted
    assert torch.equal(vectors[2].grad, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
