"""The latent-thought training formats (BoLT's M-step input; ../shared/methods/latent_thoughts.md).

Everything here is token ids (decision 2): a chunk x is its text's ids (tokenised once,
``chunking.tokenize_chunks``) and a latent z is the ids that were sampled or tokenised once.

Per chunk, with SoL/EoL/PRI/POS the four latent-thought ids (``LatentTokenIds``):

- prior: ``SoL PRI z EoL x``
- posterior: ``SoL EoL x SoL POS z EoL`` (the empty ``SoL EoL`` marks the chunk boundary)
- prior_only: ``SoL z EoL x``; posterior_only: ``x SoL z EoL`` (the code's other types)

A document is its chunks joined without separator, opened by the start token and closed by
EOD: ``start + chunk_1 + ... + chunk_n + EOD``. The start token is the one training
documents start with (decision 4): the tokenizer's BOS when it has one distinct from EOD, else
EOD. A raw (un-augmented) document is ``start + x_1 + ... + x_n + EOD``, the same ids without
the latents.

A latent given with its stopping EoL (as sampled) loses that EoL before wrapping; a latent
that hit the length cap without one is wrapped all the same, so every z sits in ``SoL … EoL``.

**The coin** (``latent_type = random``, decision 5): each chunk is written in the prior form
with probability 0.5, else in the posterior form. The draws come from
``numpy.random.default_rng([seed, doc_key, copy, 0])`` — ``rng.random(n_chunks) < 0.5``,
True meaning prior — where ``seed`` is the data seed, ``copy`` the copy index (one copy per
planned epoch, so the code's per-epoch re-draw is kept) and ``doc_key = document_hash(text)``,
the first 8 bytes (big-endian) of the SHA-256 of the document's text. The key comes from the
text, not from a record id: it is the same for any file order, sharding, DP/TP size or worker
count and needs no id scheme. (Identical texts get identical draws.)

**Raw mixing** (the code's ``mix_in_raw_ratio``): a copy of a document is written raw instead
of augmented with probability ``ratio``, drawn as ``default_rng([seed, doc_key, copy,
1]).random() < ratio`` (never drawn for 0: every document augmented, as in all BoLT runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy

from megatron_latent.latent import LatentTokenIds

LATENT_TYPES = ("random", "prior_only", "posterior_only")
PRIOR_PROBABILITY = 0.5
_COIN_STREAM = 0
_RAW_STREAM = 1


class FormatError(ValueError):
    """Inputs that cannot be formatted (mismatched chunks and latents, a misplaced EoL)."""


# -- ids ------------------------------------------------------------------------------------


def document_hash(text: str) -> int:
    """The document key of the coin: SHA-256 of the UTF-8 text, first 8 bytes, big-endian."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def document_start_id(tokenizer: Any) -> int:
    """The token training documents start with: BOS when the tokenizer has one distinct from
    EOD, else EOD (decision 4)."""
    eod = int(tokenizer.eod)
    try:
        bos = int(tokenizer.bos)
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        bos = -1
    return bos if bos >= 0 and bos != eod else eod


def normalize_latent(z_ids: Sequence[int], tokens: LatentTokenIds) -> list[int]:
    """z without its stopping EoL (a latent cut at the length cap has none and is kept as it
    is); an EoL anywhere else is refused."""
    z = [int(t) for t in z_ids]
    if z and z[-1] == tokens.eol:
        z = z[:-1]
    if tokens.eol in z:
        raise FormatError(
            f"a latent holds the end-of-latent id {tokens.eol} at position {z.index(tokens.eol)},"
            " before its end"
        )
    return z


# -- one chunk ------------------------------------------------------------------------------


def prior_form(z_ids: Sequence[int], x_ids: Sequence[int], t: LatentTokenIds) -> list[int]:
    """``SoL PRI z EoL x``."""
    return [t.sol, t.pri, *normalize_latent(z_ids, t), t.eol, *x_ids]


def posterior_form(z_ids: Sequence[int], x_ids: Sequence[int], t: LatentTokenIds) -> list[int]:
    """``SoL EoL x SoL POS z EoL``."""
    return [t.sol, t.eol, *x_ids, t.sol, t.pos, *normalize_latent(z_ids, t), t.eol]


def prior_only_form(z_ids: Sequence[int], x_ids: Sequence[int], t: LatentTokenIds) -> list[int]:
    """``SoL z EoL x`` (the code's ``prior_only``)."""
    return [t.sol, *normalize_latent(z_ids, t), t.eol, *x_ids]


def posterior_only_form(
    z_ids: Sequence[int], x_ids: Sequence[int], t: LatentTokenIds
) -> list[int]:
    """``x SoL z EoL`` (the code's ``posterior_only``)."""
    return [*x_ids, t.sol, *normalize_latent(z_ids, t), t.eol]


# -- draws ----------------------------------------------------------------------------------


def _check_draw_args(seed: int, doc_key: int, copy: int) -> None:
    for name, value in (("seed", seed), ("doc_key", doc_key), ("copy", copy)):
        if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 0:
            raise FormatError(f"{name} must be a non-negative integer, got {value!r}")


def prior_coins(seed: int, doc_key: int, copy: int, num_chunks: int) -> list[bool]:
    """Per chunk, True for the prior form, False for the posterior (p = 0.5 each), from
    ``default_rng([seed, doc_key, copy, 0])``: nothing else enters."""
    _check_draw_args(seed, doc_key, copy)
    rng = numpy.random.default_rng([int(seed), int(doc_key), int(copy), _COIN_STREAM])
    return [bool(c) for c in rng.random(num_chunks) < PRIOR_PROBABILITY]


def written_raw(seed: int, doc_key: int, copy: int, ratio: float) -> bool:
    """Whether this copy of the document is written raw instead of augmented (probability
    ``ratio``, from ``default_rng([seed, doc_key, copy, 1])``; no draw when ratio is 0)."""
    if not 0.0 <= ratio <= 1.0:
        raise FormatError(f"the raw ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0:
        return False
    _check_draw_args(seed, doc_key, copy)
    rng = numpy.random.default_rng([int(seed), int(doc_key), int(copy), _RAW_STREAM])
    return bool(rng.random() < ratio)


# -- documents ------------------------------------------------------------------------------


def format_chunks(
    chunks_ids: Sequence[Sequence[int]],
    latents_ids: Sequence[Sequence[int]],
    forms: Sequence[str],
    tokens: LatentTokenIds,
) -> list[int]:
    """The chunks joined without separator, chunk i in ``forms[i]`` (``prior``,
    ``posterior``, ``prior_only`` or ``posterior_only``); no start or end token."""
    if not (len(chunks_ids) == len(latents_ids) == len(forms)):
        raise FormatError(
            f"{len(chunks_ids)} chunks, {len(latents_ids)} latents and {len(forms)} forms: "
            "each chunk needs one latent and one form"
        )
    out: list[int] = []
    for x, z, form in zip(chunks_ids, latents_ids, forms):
        if form not in _FORMS:
            raise FormatError(f"unknown form {form!r} (one of {', '.join(_FORMS)})")
        out.extend(_FORMS[form](z, x, tokens))
    return out


def chunk_forms(
    latent_type: str, seed: int, doc_key: int, copy: int, num_chunks: int
) -> list[str]:
    """Each chunk's form for a latent type: ``random`` draws the coin, the others are fixed."""
    if latent_type == "random":
        return ["prior" if c else "posterior" for c in prior_coins(seed, doc_key, copy, num_chunks)]
    if latent_type in ("prior_only", "posterior_only"):
        return [latent_type] * num_chunks
    raise FormatError(f"unknown latent type {latent_type!r} (one of {', '.join(LATENT_TYPES)})")


def augmented_document(
    chunks_ids: Sequence[Sequence[int]],
    latents_ids: Sequence[Sequence[int]],
    tokens: LatentTokenIds,
    seed: int,
    doc_key: int,
    copy: int,
    *,
    start_id: int,
    eod_id: int,
    latent_type: str = "random",
) -> list[int]:
    """``start + chunk_1 + ... + chunk_n + EOD``, each chunk in its drawn form."""
    forms = chunk_forms(latent_type, seed, doc_key, copy, len(chunks_ids))
    return [start_id, *format_chunks(chunks_ids, latents_ids, forms, tokens), eod_id]


def raw_document(chunks_ids: Sequence[Sequence[int]], *, start_id: int, eod_id: int) -> list[int]:
    """``start + x_1 + ... + x_n + EOD``: the document without latents."""
    return [start_id, *(t for x in chunks_ids for t in x), eod_id]


_FORMS = {
    "prior": prior_form,
    "posterior": posterior_form,
    "prior_only": prior_only_form,
    "posterior_only": posterior_only_form,
}

__all__ = [
    "LATENT_TYPES",
    "FormatError",
    "augmented_document",
    "chunk_forms",
    "document_hash",
    "document_start_id",
    "format_chunks",
    "normalize_latent",
    "posterior_form",
    "posterior_only_form",
    "prior_coins",
    "prior_form",
    "prior_only_form",
    "raw_document",
    "written_raw",
]
