"""The TopK SAE of the concept method: tensors, configuration and its exact encode/decode.

With ``normalize_activations == "layer_norm"`` a residual vector h is first standardised per
token: μ = mean(h), σ = std(h, unbiased) + 1e-5, x = (h − μ)/σ (Bessel's correction, the eps
added to σ, no affine weights: not ``nn.LayerNorm``). Then pre = (x − b_dec) @ W_enc + b_enc
(without − b_dec when ``apply_b_dec_to_input`` is false); the k largest entries of pre are
kept (ties broken by the lowest latent id), ReLU'd, and every other entry is 0: that is z.
Decoding is (z @ W_dec + b_dec)·σ + μ. With ``"none"``, μ = 0 and σ = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

NORMALIZATIONS = ("none", "layer_norm")
LAYER_NORM_EPS = 1e-5


@dataclass
class TopKSAE:
    """A TopK sparse autoencoder: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec``
    [d_sae, d_in], ``b_dec`` [d_in], and how inputs are prepared (see the module doc)."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    k: int
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def check(self) -> None:
        """Raise ValueError when shapes or settings disagree."""
        d_in, d_sae = self.W_enc.shape
        expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                    "b_dec": (d_in,)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"SAE tensor {name} has shape {list(got)}, expected {list(shape)}")
        if not 1 <= int(self.k) <= d_sae:
            raise ValueError(f"SAE k={self.k} must be between 1 and d_sae={d_sae}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations={self.normalize_activations!r} is not one "
                             f"of {list(NORMALIZATIONS)}")

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> TopKSAE:
        """This SAE with its tensors moved (a new object; metadata shared)."""
        moved = {name: getattr(self, name).to(device=device, dtype=dtype)
                 for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        return TopKSAE(**moved, k=self.k, apply_b_dec_to_input=self.apply_b_dec_to_input,
                       normalize_activations=self.normalize_activations,
                       metadata=self.metadata)

    # -- the maths -----------------------------------------------------------------------
    def normalize(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x, μ, σ) for inputs h [..., d_in]; μ, σ have shape [..., 1]."""
        return normalize(h, self.normalize_activations)

    def pre_activations(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [..., d_sae] of already-normalised inputs x."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode_with_stats(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z, μ, σ): the sparse code of h and the normalisation statistics decode needs."""
        x, mu, sigma = self.normalize(h)
        return topk_relu(self.pre_activations(x), self.k), mu, sigma

    def encode(self, h: Tensor) -> Tensor:
        """Sparse codes z [..., d_sae] of residual vectors h [..., d_in]."""
        return self.encode_with_stats(h)[0]

    def decode(self, z: Tensor, mu: Tensor | None = None, sigma: Tensor | None = None) -> Tensor:
        """z @ W_dec + b_dec, mapped back through σ and μ when given (layer_norm)."""
        out = z @ self.W_dec + self.b_dec
        if sigma is not None:
            out = out * sigma
        if mu is not None:
            out = out + mu
        return out

    def reconstruct(self, h: Tensor) -> Tensor:
        """decode(encode(h)) in the space of h."""
        z, mu, sigma = self.encode_with_stats(h)
        return self.decode(z, mu, sigma)


def normalize(h: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """(x, μ, σ) of h [..., d]: the per-token standardisation of ``layer_norm`` (unbiased std,
    eps added to σ) or the identity for ``none`` (μ = 0, σ = 1)."""
    if mode == "layer_norm":
        mu = h.mean(dim=-1, keepdim=True)
        sigma = h.std(dim=-1, keepdim=True, unbiased=True) + LAYER_NORM_EPS
        return (h - mu) / sigma, mu, sigma
    if mode == "none":
        ones = torch.ones(h.shape[:-1] + (1,), dtype=h.dtype, device=h.device)
        return h, torch.zeros_like(ones), ones
    raise ValueError(f"normalize_activations={mode!r} is not one of {list(NORMALIZATIONS)}")


def topk_indices(pre: Tensor, k: int) -> Tensor:
    """Ids [..., k] of the k largest entries of pre along the last dim, ties broken by the
    lowest id (``torch.topk`` alone does not promise which of equal values it returns)."""
    threshold = torch.topk(pre, k, dim=-1).values[..., -1:]
    above = pre > threshold
    need = k - above.sum(dim=-1, keepdim=True)
    equal = pre == threshold
    chosen = above | (equal & (equal.cumsum(dim=-1) <= need))
    # Exactly k True per row; the ids in increasing order.
    ids = torch.arange(pre.shape[-1], device=pre.device).expand_as(pre)
    return ids[chosen].view(*pre.shape[:-1], k)


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """pre with its k largest entries (lowest id first among ties) ReLU'd, every other 0."""
    ids = topk_indices(pre, k)
    return torch.zeros_like(pre).scatter(-1, ids, pre.gather(-1, ids).clamp_min(0))
