"""The thought-memory C layer (memory cross-attention + gate + MLP) at TP=2 equals TP=1:
outputs, input/memory gradients and gathered parameter gradients, with empty, one-slot, full
and partial memory rows."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.spec_utils import build_module

from megatron_latent.config import ModelConfig
from megatron_latent.distributed import tp_group, tp_rank, tp_size
from megatron_latent.methods.thought_memory.layers import (
    gated_cross_attention_layer_spec,
)
from megatron_latent.models.language_model import RuntimeOptions, build_transformer_config

H, M = 64, 5
MODEL = ModelConfig(num_layers=1, hidden_size=H, num_attention_heads=4, vocab_size=64,
                    seq_length=8)
COUNTS = torch.tensor([0, 1, M, 3])


def partition_dim(param: torch.nn.Parameter) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def load_full_weights(layer: torch.nn.Module) -> None:
    """Each parameter's full tensor drawn from a per-name seed (the same at every TP size),
    this rank's shard copied in along megatron's partition dim."""
    for index, (name, param) in enumerate(sorted(layer.named_parameters())):
        dim = partition_dim(param)
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= tp_size()
        full = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(100 + index))
        if name.endswith("norm.weight") or name == "gate":
            full += 1.0
        if dim is not None:
            full = full.chunk(tp_size(), dim=dim)[tp_rank()]
        with torch.no_grad():
            param.copy_(full)


def gathered_grads(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in layer.named_parameters():
        grad = param.grad
        dim = partition_dim(param)
        if dim is not None and tp_size() > 1:
            parts = [torch.empty_like(grad) for _ in range(tp_size())]
            dist.all_gather(parts, grad.contiguous(), group=tp_group())
            grad = torch.cat(parts, dim=dim)
        grads[name] = grad
    return grads


def run(use_parallel, tp: int):
    use_parallel(tp)
    config = build_transformer_config(MODEL, RuntimeOptions(tensor_model_parallel_size=tp))
    layer = build_module(gated_cross_attention_layer_spec(), config=config, layer_number=1)
    load_full_weights(layer)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, H, generator=generator, requires_grad=True)
    m = torch.randn(M, 4, H, generator=generator, requires_grad=True)
    out, _ = layer(x, context=m, context_mask=COUNTS)
    probe = torch.randn(out.shape, generator=generator)
    (out * probe).sum().backward()
    return out.detach(), x.grad, m.grad, gathered_grads(layer)


def test_c_layer_tp2_equals_tp1(use_parallel):
    out1, x_grad1, m_grad1, grads1 = run(use_parallel, 1)
    out2, x_grad2, m_grad2, grads2 = run(use_parallel, 2)
    torch.testing.assert_close(out2, out1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_grad2, x_grad1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m_grad2, m_grad1, atol=1e-5, rtol=1e-4)
    assert set(grads1) == set(grads2) and "gate" in grads1
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], atol=1e-5, rtol=1e-4, msg=name)
