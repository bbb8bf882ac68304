"""The independent reference of the model tests: a random Hugging Face GPTNeoX (Pythia) model."""

from __future__ import annotations

import torch


def make_gpt_neox(vocab_size: int = 256, layers: int = 2, hidden: int = 64, heads: int = 4,
                  seed: int = 0, max_positions: int = 128,
                  rotary_base: int = 10000):
    """A float32 GPTNeoXForCausalLM with Pythia's architecture and perturbed norms/biases,
    so the mapping of every one of them matters."""
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25,
        max_position_embeddings=max_positions, use_parallel_residual=True,
        tie_word_embeddings=False, hidden_act="gelu", attention_dropout=0.0, hidden_dropout=0.0,
        rotary_emb_base=rotary_base,
    )
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model
