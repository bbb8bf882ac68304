"""A TopK SAE trainer ("Scaling and evaluating sparse autoencoders", Gao et al. 2024).

Inputs are prepared as the SAE will encode them (``normalize_activations``); the loss is the
normalised reconstruction error of the prepared inputs (MSE over their variance) plus, for
latents that have not fired for ``dead_tokens`` tokens, the AuxK loss (the k_aux largest dead
pre-activations reconstruct the residual error; weight ``auxk_coef``). Decoder rows are kept
at unit norm (their gradient's radial part is removed before each Adam step and the rows are
renormalised after); the encoder starts as the decoder's transpose, b_enc at 0 and b_dec at
the geometric median of the first batch. The result is a ``TopKSAE`` whose exact encode
(``encode.py``) is the one the trainer used, ties aside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fileio import atomic_write
from .encode import TopKSAE, normalize


def default_lr(d_sae: int) -> float:
    """The paper's learning-rate scaling: 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


@dataclass(frozen=True)
class SAETrainConfig:
    d_in: int
    d_sae: int
    k: int
    normalize_activations: str = "layer_norm"
    lr: float | None = None
    auxk_coef: float = 1 / 32
    k_aux: int | None = None  # default: d_in // 2
    dead_tokens: int = 10_000_000

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.d_sae)


def geometric_median(x: Tensor, iterations: int = 50, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distances to the rows of x."""
    point = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - point).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        if (new - point).norm() <= eps * (1 + point.norm()):
            return new
        point = new
    return point


def fraction_of_variance_unexplained(h: Tensor, reconstruction: Tensor) -> float:
    """Σ‖h − ĥ‖² / Σ‖h − mean(h)‖² over the rows of h [n, d]."""
    error = (h - reconstruction).pow(2).sum()
    total = (h - h.mean(dim=0, keepdim=True)).pow(2).sum().clamp_min(1e-30)
    return float(error / total)


class SAETrainer(torch.nn.Module):
    """Parameters, Adam state and firing statistics of one TopK SAE in training."""

    def __init__(self, config: SAETrainConfig, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        d_in, d_sae = config.d_in, config.d_sae
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W_dec.to(device))
        self.W_enc = torch.nn.Parameter(W_dec.t().clone().to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64, device=device))
        # Token count at which each latent last fired (-1: never).
        self.register_buffer("last_fired", torch.full((d_sae,), -1, dtype=torch.int64,
                                                      device=device))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool, device=device))
        self.optimizer = torch.optim.Adam(self.parameters(), lr=config.learning_rate,
                                          betas=(0.9, 0.999), eps=6.25e-10)

    # -- pieces of a step ----------------------------------------------------------------------
    def prepare(self, h: Tensor) -> Tensor:
        return normalize(h.float(), self.config.normalize_activations)[0]

    def _decode_sparse(self, ids: Tensor, acts: Tensor, bias: bool = True) -> Tensor:
        out = F.embedding_bag(ids, self.W_dec, per_sample_weights=acts, mode="sum")
        return out + self.b_dec if bias else out

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for ``dead_tokens`` tokens (AuxK's latents)."""
        since = self.tokens_seen - self.last_fired.clamp_min(0)
        return since >= self.config.dead_tokens

    def dead_fraction(self) -> float:
        """Share of latents that fired on no token of the last min(dead_tokens, all)."""
        window = min(self.config.dead_tokens, int(self.tokens_seen))
        return float((self.last_fired < int(self.tokens_seen) - window).float().mean())

    @torch.no_grad()
    def initialise(self, h: Tensor) -> None:
        """b_dec = geometric median of the prepared first batch."""
        self.b_dec.copy_(geometric_median(self.prepare(h)))
        self.initialised.fill_(True)

    def step(self, h: Tensor) -> dict[str, float]:
        """One Adam step on activations h [n, d_in]; returns the batch's losses."""
        if not bool(self.initialised):
            self.initialise(h)
        cfg = self.config
        x = self.prepare(h)
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, ids = torch.topk(pre, cfg.k, dim=-1)
        acts = values.relu()
        recon = self._decode_sparse(ids, acts)
        variance = (x - x.mean(dim=0, keepdim=True)).pow(2).sum().clamp_min(1e-30)
        mse = (recon - x).pow(2).sum() / variance
        loss = mse
        auxk = torch.zeros(())
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead and cfg.auxk_coef > 0:
            k_aux = min(cfg.k_aux or max(1, cfg.d_in // 2), n_dead)
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            aux_values, aux_ids = torch.topk(dead_pre, k_aux, dim=-1)
            error = (x - recon).detach()
            aux_recon = self._decode_sparse(aux_ids, aux_values.relu(), bias=False)
            error_var = (error - error.mean(dim=0, keepdim=True)).pow(2).sum().clamp_min(1e-30)
            auxk = (aux_recon - error).pow(2).sum() / error_var
            loss = loss + cfg.auxk_coef * auxk
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grad = self.W_dec.grad
            grad -= (grad * self.W_dec).sum(dim=1, keepdim=True) * self.W_dec
        self.optimizer.step()
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.tokens_seen += x.shape[0]
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[ids[acts > 0]] = True
            self.last_fired[fired] = self.tokens_seen
        return {"fvu": float(mse.detach()), "auxk": float(auxk.detach()), "dead_now": n_dead / cfg.d_sae}

    def to_sae(self, metadata: dict[str, Any] | None = None) -> TopKSAE:
        """The trained SAE (detached fp32 copies on the CPU)."""
        def copy(t: Tensor) -> Tensor:
            return t.detach().float().cpu().clone()

        return TopKSAE(W_enc=copy(self.W_enc), b_enc=copy(self.b_enc), W_dec=copy(self.W_dec),
                       b_dec=copy(self.b_dec), k=self.config.k, apply_b_dec_to_input=True,
                       normalize_activations=self.config.normalize_activations,
                       metadata=dict(metadata or {}))

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "model": self.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def save_state(path: str, state: dict[str, Any]) -> None:
    """torch.save through a temporary file and a rename (never a half-written state)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, h: Tensor, chunk: int = 4096) -> float:
    """FVU of the SAE's exact encode/decode on activations h [n, d_in], in h's space."""
    sae = sae.to(device=h.device)
    recon = torch.cat([sae.reconstruct(h[i:i + chunk].float())
                       for i in range(0, h.shape[0], chunk)])
    return fraction_of_variance_unexplained(h.float(), recon)


def train_steps(trainer: SAETrainer, batch: Callable[[int], Tensor], start: int, steps: int,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> None:
    """Run steps ``start .. steps-1``; ``batch(step)`` gives that step's activations [n, d_in],
    ``on_step(step + 1, losses)`` is called after each (progress, checkpoints)."""
    for step in range(start, steps):
        losses = trainer.step(batch(step))
        if on_step is not None:
            on_step(step + 1, losses)
