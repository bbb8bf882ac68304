"""SDPA core attention against a plain masked softmax written here: megatron's mask convention
(True = masked out), causal masking, and a query block at the end of a longer key block."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_latent.models.layers import SDPACoreAttention


def attention(mask_type: AttnMaskType) -> SDPACoreAttention:
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               attention_dropout=0.0)
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=mask_type).eval()


def reference(query, key, value, masked_out):
    """softmax(q k^T / sqrt(d)) v with masked_out [b, 1|heads, sq, sk] (True = not attended);
    inputs and output in megatron's [s, b, heads, dim] / [s, b, heads * dim] layout."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(masked_out, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    s, b = query.shape[:2]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def tensors(sq: int, sk: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, 2, 4, 8, generator=generator) for s in (sq, sk, sk)]


def test_explicit_mask_follows_megatrons_convention():
    query, key, value = tensors(12, 12)
    generator = torch.Generator().manual_seed(1)
    masked_out = torch.rand(2, 1, 12, 12, generator=generator) < 0.4
    masked_out[..., 0] = False  # every query keeps a key
    out = attention(AttnMaskType.padding)(query, key, value, attention_mask=masked_out)
    torch.testing.assert_close(out, reference(query, key, value, masked_out), atol=1e-6,
                               rtol=1e-5)


def test_document_reset_mask_matches_reference():
    """The block-diagonal causal mask megatron's GPTDataset builds for --reset-attention-mask."""
    query, key, value = tensors(10, 10, seed=2)
    allowed = torch.ones(10, 10).tril().bool()
    allowed[4:, :4] = False  # a document ends at position 3
    masked_out = ~allowed[None, None].expand(2, 1, 10, 10)
    out = attention(AttnMaskType.causal)(query, key, value, attention_mask=masked_out)
    torch.testing.assert_close(out, reference(query, key, value, masked_out), atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("sq, sk", [(9, 9), (3, 9), (1, 9)])
def test_causal_attention_with_and_without_cached_keys(sq, sk):
    query, key, value = tensors(sq, sk, seed=3)
    # Query i sits at absolute position sk - sq + i and sees keys up to it.
    positions = torch.arange(sk - sq, sk)[:, None]
    masked_out = (torch.arange(sk)[None, :] > positions)[None, None]
    out = attention(AttnMaskType.causal)(query, key, value, attention_mask=None)
    torch.testing.assert_close(out, reference(query, key, value, masked_out), atol=1e-6,
                               rtol=1e-5)
