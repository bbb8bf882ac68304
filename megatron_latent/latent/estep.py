"""The E-step on the project's own model (BoLT; ../shared/methods/latent_thoughts.md, "E-step").

For every chunk x of a document (with the prefix the notes give it):

- **posterior prompt** ``start + prefix + SoL EoL + x + SoL POS``; for the first chunk (empty
  prefix) ``start + x + SoL POS`` (no boundary marker); cut from the left to its last
  ``max_prompt`` (1024) tokens. ``start`` is ``formats.document_start_id`` (decision 4).
- **sampling** K candidates z ~ q(z | x): temperature 1, top-p 1, no top-k, i.e. a plain
  softmax over the *true* vocabulary (padded rows never drawn), KV-cached, all chunks x K rows
  of a batch decoded together, at any TP size (the last position's logits are gathered over
  the TP group, so every rank draws the same token; it is broadcast from the TP source rank
  all the same). A candidate ends with EoL (kept in z and in log q) or after ``max_new``
  (1024) tokens. Each row draws from its own ``torch.Generator`` seeded by
  ``sample_seed(seed, iteration, doc_key, chunk, sample)`` (decision 6): one uniform per
  generated token, turned into a token by the inverse CDF of the row's softmax, so a rerun
  gives the same z at any batch composition and any DP/TP size.
- **log q** = Σ log-softmax (fp32, T = 1) of the sampled ids, the stopping EoL included.
- **log p(z, x | prefix)** scored on ``start + prefix + SoL PRI + z' + EoL + x`` (z' = z
  without its EoL): Σ over SoL (decision 3: the true joint; constant over the K samples),
  PRI, z', EoL and x; start and prefix excluded. One full forward per sequence, exact over a
  TP-sharded vocabulary (``evaluation.vocab_scores``), the padded rows masked out, fp32.
  Sampling and scoring use the identical ids (decision 2): nothing is detokenised.
- **overflow**: when the longest of the K sequences exceeds ``max_seq`` (2048), the prefix is
  cut from the left, then x from the end, by the same amounts for all K; the cut x tokens are
  counted (they leave the ELBO's token count).
- **resampling**: log w = log p − log q; one draw from softmax(log w) with a generator seeded
  by ``resample_seed(seed, iteration, doc_key, chunk)``. Decision 7: candidates without EoL
  are excluded when another one finished; when none did, the highest-weight one is kept and
  counted (``no_finished``).
- **ELBO** (validation documents: ``chunking.uniform_chunks`` and the whole preceding
  document as prefix, ``validation=True``): elbo_n = logsumexp(log w[:n]) − log n for
  n ∈ {1, 2, 4} (those ≤ K), summed per document; reported per raw-text token (minus the cut
  ones) and per character. log p includes SoL and PRI (decision 3).
- **FLOPs** (decision 10): ≈ 2·N per sampled or scored token (every forward position: prompt
  prefill and decoded tokens for sampling, every position of each scored sequence), N the
  model's parameter count (vocabulary padded for TP = 1, so the count is TP-independent).

Seeds come from SHA-256 over ``(seed, iteration, doc_key, chunk[, sample])`` with
``doc_key = formats.document_hash(text)``: nothing depends on file order, batch or world size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..distributed import tp_rank, tp_size
from ..evaluation.vocab_scores import vocab_parallel_scores
from ..inference.stepping import (
    broadcast_from_tensor_parallel_source,
    last_token_logits,
    make_inference_context,
    max_positions,
    sequence_parallel_disabled,
    true_vocab_size,
    unwrap_model,
)
from . import LatentTokenIds
from .chunking import elbo_prefix_ids, estep_prefix_ids

#: The code's experiment settings (notes, E-step table).
MAX_PROMPT = 1024
MAX_NEW = 1024
MAX_SEQ = 2048
NUM_SAMPLES = 4
ELBO_NS = (1, 2, 4)
#: start, SoL, PRI and EoL around z in the scored sequence.
_JOINT_OVERHEAD = 4


class EStepError(ValueError):
    """Settings or inputs the E-step cannot run with."""


@dataclass(frozen=True)
class EStepSettings:
    num_samples: int = NUM_SAMPLES
    max_prompt: int = MAX_PROMPT
    max_new: int = MAX_NEW
    max_seq: int = MAX_SEQ
    #: Rows (chunk x sample candidates, or scored sequences) per forward.
    batch_size: int = 16
    seed: int = 0
    iteration: int = 0

    def validate(self, model: torch.nn.Module | None = None) -> None:
        for name in ("num_samples", "max_prompt", "max_new", "max_seq", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EStepError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("seed", "iteration"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EStepError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_seq < self.max_new + _JOINT_OVERHEAD:
            raise EStepError(f"max_seq {self.max_seq} must be at least max_new + 4 = "
                             f"{self.max_new + _JOINT_OVERHEAD} (a scored sequence holds start, "
                             "SoL, PRI, z and EoL whatever is cut)")
        limit = max_positions(model) if model is not None else None
        if limit is not None:
            if self.max_prompt + self.max_new > limit:
                raise EStepError(f"max_prompt + max_new = {self.max_prompt + self.max_new} "
                                 f"exceeds the model's max_position_embeddings {limit}")
            if self.max_seq > limit:
                raise EStepError(f"max_seq {self.max_seq} exceeds the model's "
                                 f"max_position_embeddings {limit}")


# -- seeds -----------------------------------------------------------------------------------


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from SHA-256 of the parts (decision 6)."""
    text = "/".join(str(int(p)) if not isinstance(p, str) else p for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2 ** 63 - 1)


def sample_seed(seed: int, iteration: int, doc_key: int, chunk: int, sample: int) -> int:
    """The generator seed of candidate ``sample`` of chunk ``chunk`` of a document."""
    return derive_seed("sample", seed, iteration, doc_key, chunk, sample)


def resample_seed(seed: int, iteration: int, doc_key: int, chunk: int) -> int:
    """The generator seed of the resampling draw of chunk ``chunk`` of a document."""
    return derive_seed("resample", seed, iteration, doc_key, chunk)


# -- sequences -------------------------------------------------------------------------------


def posterior_prompt(start_id: int, prefix: Sequence[int], x: Sequence[int],
                     t: LatentTokenIds, max_prompt: int = MAX_PROMPT) -> list[int]:
    """``start + prefix + SoL EoL + x + SoL POS`` (``start + x + SoL POS`` without a prefix),
    its last ``max_prompt`` tokens."""
    if prefix:
        ids = [start_id, *prefix, t.sol, t.eol, *x, t.sol, t.pos]
    else:
        ids = [start_id, *x, t.sol, t.pos]
    return ids[-max_prompt:]


def strip_eol(z: Sequence[int], t: LatentTokenIds) -> list[int]:
    z = [int(v) for v in z]
    return z[:-1] if z and z[-1] == t.eol else z


def prior_sequence(start_id: int, prefix: Sequence[int], z: Sequence[int], x: Sequence[int],
                   t: LatentTokenIds) -> tuple[list[int], int]:
    """(``start + prefix + SoL PRI + z' + EoL + x``, index of SoL): log p sums from there."""
    ids = [start_id, *prefix, t.sol, t.pri, *strip_eol(z, t), t.eol, *x]
    return ids, 1 + len(prefix)


def overflow_cut(prefix_len: int, x_len: int, longest_z: int, max_seq: int) -> tuple[int, int]:
    """(prefix tokens cut from the left, x tokens cut from the end) so that the longest joint
    sequence (``longest_z`` without EoL) fits ``max_seq``."""
    excess = _JOINT_OVERHEAD + prefix_len + longest_z + x_len - max_seq
    if excess <= 0:
        return 0, 0
    cut_prefix = min(excess, prefix_len)
    cut_x = min(excess - cut_prefix, x_len)
    if excess - cut_prefix - cut_x > 0:
        raise EStepError(f"a latent of {longest_z} tokens does not fit max_seq {max_seq}")
    return cut_prefix, cut_x


# -- sampling --------------------------------------------------------------------------------


@dataclass
class Sample:
    """One candidate z."""

    tokens: list[int]  # with the stopping EoL when finished
    log_q: float
    finished: bool
    #: forward positions (prompt + decoded) this row cost, for the FLOPs count
    positions: int = 0


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row of ``probs`` [b, V] with one uniform in [0, 1) per row."""
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_latents(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                   seeds: Sequence[int], eol_id: int, max_new: int = MAX_NEW) -> list[Sample]:
    """One candidate per prompt (KV-cached, batched, any TP): T = 1, top-p 1, no top-k, over
    the true vocabulary; row i draws from a generator seeded ``seeds[i]``. Run on every rank of
    the TP group with the same prompts; every rank returns the same samples."""
    if len(prompts) != len(seeds):
        raise EStepError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise EStepError("every prompt needs at least one token")
    vocab = true_vocab_size(model)
    for prompt in prompts:
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EStepError(f"prompt ids must be in [0, {vocab})")
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new
    limit = max_positions(model)
    if limit is not None and total > limit:
        raise EStepError(f"longest prompt + max_new = {total} positions exceeds the model's "
                         f"max_position_embeddings {limit}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = len(prompts)
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = [Sample([], 0.0, False) for _ in prompts]
    log_q = [0.0] * batch
    done = [False] * batch
    start = min(lengths)
    context = make_inference_context(model, batch, total)
    try:
        with sequence_parallel_disabled(model):
            step_input = tokens[:, :start]
            for position in range(start, total):
                logits = last_token_logits(model, step_input, context)  # [b, V] fp32
                context.increment_sequence_len_offset(step_input.shape[1])
                active = [i for i in range(batch) if position >= lengths[i] and not done[i]]
                if active:
                    index = torch.tensor(active, dtype=torch.long, device=logits.device)
                    logp = torch.log_softmax(logits[index].float(), dim=-1)
                    uniforms = torch.stack([torch.rand((), generator=generators[i],
                                                       dtype=torch.float64) for i in active])
                    chosen = broadcast_from_tensor_parallel_source(
                        _draw(logp.exp(), uniforms).contiguous())
                    picked = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
                    for j, i in enumerate(active):
                        token = int(chosen[j])
                        tokens[i, position] = token
                        out[i].tokens.append(token)
                        log_q[i] += float(picked[j])
                        if token == eol_id:
                            done[i] = out[i].finished = True
                        elif len(out[i].tokens) >= max_new:
                            done[i] = True
                if all(done):
                    break
                step_input = tokens[:, position:position + 1]
    finally:
        model.train(was_training)
    for i, sample in enumerate(out):
        sample.log_q = log_q[i]
        sample.positions = lengths[i] + len(sample.tokens)
    return out


# -- scoring ---------------------------------------------------------------------------------


@torch.no_grad()
def score_tokens(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                 starts: Sequence[int], batch_size: int = 16) -> list[float]:
    """Σ_{j ≥ starts[i]} log p(seq[j] | seq[:j]) per sequence (``starts[i] ≥ 1``): fp32
    log-softmax over the true vocabulary (padded rows masked) of a TP-sharded output, exact
    on every TP rank; sums in float64."""
    if len(sequences) != len(starts):
        raise EStepError(f"{len(sequences)} sequences but {len(starts)} starts")
    vocab = true_vocab_size(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[float] = []
    try:
        for begin in range(0, len(sequences), batch_size):
            part = sequences[begin:begin + batch_size]
            part_starts = starts[begin:begin + batch_size]
            width = max(len(s) for s in part)
            batch = torch.zeros(len(part), width, dtype=torch.long)
            rows, positions, targets = [], [], []
            for r, (seq, first) in enumerate(zip(part, part_starts)):
                if not 1 <= first <= len(seq):
                    raise EStepError(f"score start {first} outside a sequence of {len(seq)}")
                batch[r, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
                rows += [r] * (len(seq) - first)
                positions += range(first - 1, len(seq) - 1)  # logits at j-1 predict token j
                targets += list(seq[first:])
            with sequence_parallel_disabled(model):
                logits = model(batch.to(device))  # [b, s, V/tp]
            shard = logits.shape[-1]
            ids = torch.arange(shard, device=logits.device) + tp_rank() * shard
            rows_t, pos_t, targets_t = (torch.tensor(v, dtype=torch.long, device=logits.device)
                                        for v in (rows, positions, targets))
            picked = logits[rows_t, pos_t].float().masked_fill(ids >= vocab, float("-inf"))
            logprobs, _ = vocab_parallel_scores(picked, targets_t)
            sums = torch.zeros(len(part), dtype=torch.float64, device=logits.device)
            sums.index_add_(0, rows_t, logprobs.double())
            results += sums.tolist()
    finally:
        model.train(was_training)
    return results


# -- resampling and ELBO ---------------------------------------------------------------------


def resample(log_w: Sequence[float], finished: Sequence[bool], seed: int
             ) -> tuple[int, bool]:
    """(chosen index, no candidate finished). One draw from softmax(log w) over the finished
    candidates (all of them when every one finished; decision 7) with a generator seeded
    ``seed`` (``torch.multinomial`` on float64 probabilities); when none finished, the
    highest-weight candidate, and the flag is True."""
    if len(log_w) != len(finished) or not log_w:
        raise EStepError("resample needs one finish flag per log weight, at least one")
    weights = torch.tensor([float(v) for v in log_w], dtype=torch.float64)
    if not any(finished):
        return int(weights.argmax()), True
    candidates = [i for i, f in enumerate(finished) if f]
    if len(candidates) == 1:
        return candidates[0], False
    probs = torch.softmax(weights[candidates], dim=0)
    generator = torch.Generator().manual_seed(int(seed))
    return candidates[int(torch.multinomial(probs, 1, generator=generator))], False


def elbo_estimates(log_w: Sequence[float], ns: Sequence[int] = ELBO_NS) -> dict[int, float]:
    """elbo_n = logsumexp(log w[:n]) − log n for each n ≤ len(log w)."""
    weights = torch.tensor([float(v) for v in log_w], dtype=torch.float64)
    return {n: float(torch.logsumexp(weights[:n], dim=0)) - math.log(n)
            for n in ns if n <= len(weights)}


# -- documents -------------------------------------------------------------------------------


@dataclass
class ChunkResult:
    candidates: list[list[int]]
    log_q: list[float]
    log_p: list[float]
    log_w: list[float]
    finished: list[bool]
    choice: int
    no_finished: bool
    cut_prefix: int
    cut_x: int
    x_tokens: int

    @property
    def chosen(self) -> list[int]:
        return self.candidates[self.choice]

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "log_q": self.log_q, "log_p": self.log_p,
                "log_w": self.log_w, "finished": self.finished, "choice": self.choice,
                "no_finished": self.no_finished, "cut_prefix": self.cut_prefix,
                "cut_x": self.cut_x, "x_tokens": self.x_tokens}


@dataclass
class DocumentResult:
    doc_key: int
    chunks: list[ChunkResult]
    sampled_tokens: int = 0  # forward positions while sampling (prompt prefill + decoded)
    scored_tokens: int = 0  # forward positions while scoring
    flops: float = 0.0
    elbo: dict[int, float] = field(default_factory=dict)  # summed over chunks
    text_tokens: int = 0  # raw-text tokens minus the cut ones
    cut_tokens: int = 0

    @property
    def latents(self) -> list[list[int]]:
        return [c.chosen for c in self.chunks]


@dataclass
class EStepDocument:
    """A document as ids: its chunks' ids (tokenised once) and its key (document_hash)."""

    doc_key: int
    chunks_ids: list[list[int]]


def parameter_count(model: torch.nn.Module) -> int:
    """N of the FLOPs estimate: the model's parameter count with the vocabulary padded for
    TP = 1 (so every TP size reports the same), else the local count times the TP size."""
    inner = unwrap_model(model)
    config = getattr(inner, "model_config", None)
    if config is not None:
        try:
            from ..config import count_parameters

            return int(count_parameters(config, 1)["total"])
        except (AttributeError, TypeError):
            pass
    return int(sum(p.numel() for p in inner.parameters())) * tp_size()


def estep_documents(model: torch.nn.Module, documents: Sequence[EStepDocument],
                    tokens: LatentTokenIds, start_id: int, settings: EStepSettings,
                    validation: bool = False, num_params: int | None = None
                    ) -> list[DocumentResult]:
    """The E-step of every chunk of ``documents`` (see the module docstring); ``validation``
    takes the whole preceding document as prefix (the ELBO), else the raw previous 3 chunks.
    Every TP rank calls this with the same arguments and gets the same results."""
    settings.validate(model)
    k = settings.num_samples
    n_params = num_params if num_params is not None else parameter_count(model)
    prefix_of = elbo_prefix_ids if validation else estep_prefix_ids
    work = []  # (doc index, chunk index, prefix, x)
    for d, doc in enumerate(documents):
        if not doc.chunks_ids:
            raise EStepError(f"document {doc.doc_key} has no chunks")
        for c, x in enumerate(doc.chunks_ids):
            work.append((d, c, prefix_of(doc.chunks_ids, c), list(x)))
    # sampling: chunks x K rows
    prompts, seeds = [], []
    for d, c, prefix, x in work:
        prompt = posterior_prompt(start_id, prefix, x, tokens, settings.max_prompt)
        for s in range(k):
            prompts.append(prompt)
            seeds.append(sample_seed(settings.seed, settings.iteration,
                                     documents[d].doc_key, c, s))
    samples: list[Sample] = []
    for begin in range(0, len(prompts), settings.batch_size):
        samples += sample_latents(model, prompts[begin:begin + settings.batch_size],
                                  seeds[begin:begin + settings.batch_size], tokens.eol,
                                  settings.max_new)
    # scoring: the prior form of every candidate
    sequences, starts, cuts = [], [], []
    for w, (_d, _c, prefix, x) in enumerate(work):
        group = samples[w * k:(w + 1) * k]
        longest = max(len(strip_eol(s.tokens, tokens)) for s in group)
        cut_prefix, cut_x = overflow_cut(len(prefix), len(x), longest, settings.max_seq)
        kept_prefix, kept_x = prefix[cut_prefix:], x[:len(x) - cut_x]
        cuts.append((cut_prefix, cut_x))
        for s in group:
            seq, first = prior_sequence(start_id, kept_prefix, s.tokens, kept_x, tokens)
            sequences.append(seq)
            starts.append(first)
    log_p = score_tokens(model, sequences, starts, settings.batch_size)
    results = [DocumentResult(doc.doc_key, []) for doc in documents]
    for w, (d, c, _prefix, x) in enumerate(work):
        group = samples[w * k:(w + 1) * k]
        lq = [s.log_q for s in group]
        lp = log_p[w * k:(w + 1) * k]
        lw = [p - q for p, q in zip(lp, lq)]
        fin = [s.finished for s in group]
        choice, none_finished = resample(
            lw, fin, resample_seed(settings.seed, settings.iteration, documents[d].doc_key, c))
        cut_prefix, cut_x = cuts[w]
        result = results[d]
        result.chunks.append(ChunkResult([list(s.tokens) for s in group], lq, lp, lw, fin,
                                         choice, none_finished, cut_prefix, cut_x, len(x)))
        sampled = sum(s.positions for s in group)
        scored = sum(len(q) for q in sequences[w * k:(w + 1) * k])
        result.sampled_tokens += sampled
        result.scored_tokens += scored
        result.flops += 2.0 * n_params * (sampled + scored)
        result.cut_tokens += cut_x
        result.text_tokens += len(x) - cut_x
        for n, value in elbo_estimates(lw).items():
            result.elbo[n] = result.elbo.get(n, 0.0) + value
    return results


def elbo_report(results: Sequence[DocumentResult], characters: Sequence[int]) -> dict[str, Any]:
    """Summed ELBO_n over documents, per raw-text token (minus cut tokens) and per
    character; ``characters[i]`` is document i's text length."""
    tokens = sum(r.text_tokens for r in results)
    chars = sum(characters)
    report: dict[str, Any] = {
        "documents": len(results), "text_tokens": tokens,
        "cut_tokens": sum(r.cut_tokens for r in results), "characters": chars,
        "sampled_tokens": sum(r.sampled_tokens for r in results),
        "scored_tokens": sum(r.scored_tokens for r in results),
        "flops": sum(r.flops for r in results),
        "log_p_includes": "SoL, PRI, z, EoL and x (decision 3)"}
    ns = sorted({n for r in results for n in r.elbo})
    for n in ns:
        total = sum(r.elbo.get(n, 0.0) for r in results)
        report[f"elbo_{n}"] = total
        report[f"elbo_{n}_per_token"] = total / tokens if tokens else None
        report[f"elbo_{n}_per_char"] = total / chars if chars else None
    return report


__all__ = [
    "ELBO_NS", "MAX_NEW", "MAX_PROMPT", "MAX_SEQ", "NUM_SAMPLES", "ChunkResult",
    "DocumentResult", "EStepDocument", "EStepError", "EStepSettings", "Sample",
    "derive_seed", "elbo_estimates", "elbo_report", "estep_documents", "overflow_cut",
    "parameter_count", "posterior_prompt", "prior_sequence", "resample", "resample_seed",
    "sample_latents", "sample_seed", "score_tokens", "strip_eol",
]
