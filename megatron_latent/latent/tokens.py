"""The four latent-thought tokens in a tokenizer and in a checkpoint (BoLT, "Tokens").

* ``add_latent_tokens_to_tokenizer`` appends ``LATENT_TOKENS`` after a tokenizer's base
  vocabulary, in order (ids ``V .. V+3``): to a Hugging Face ``tokenizer.json`` as added
  special tokens, to a SentencePiece ``.model`` as four ``USER_DEFINED`` pieces. The result is
  checked by loading it with the project's tokenizer.
* ``latent_token_ids`` finds the four ids in a built project tokenizer.
* ``grow_checkpoint`` gives a checkpoint's input embedding and untied output head the four new
  rows, so a pretrained model continues training with the grown tokenizer
  (``pretrain.py --load <grown> --finetune``).

New rows (the notes: N(0, d^-0.5) clamped to +-3 sigma, seed 42): with ``d`` the hidden size and
``sigma = d ** -0.5``, one ``torch.Generator().manual_seed(seed)`` draws
``torch.randn(4, d) * sigma`` for the embedding first, then ``torch.randn(4, d) * sigma`` for
the output head, each clamped to ``[-3 sigma, 3 sigma]`` (float32, then cast to the weight's
dtype). Row ``V + k`` is token ``LATENT_TOKENS[k]``.

Rows of the vocabulary-row weights (``embedding.word_embeddings.weight``,
``output_layer.weight``): ``[0, V)`` are kept bit-identical, the four new rows follow, and the
rows that followed ``V`` (a method's extra ids such as thought memory's, then padding) move
up by four. The result is cut (only trailing padding rows) or zero-padded to the grown
model's padded size (``padded_vocab_size`` of the method-prepared config for the output TP
size), so a method's extra ids keep following the vocabulary. Every other tensor is copied
as it is, whatever the method.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..data.tokenizer_base import TokenizerError
from . import LATENT_TOKENS, LatentTokenIds

HF_TYPES = ("HuggingFaceTokenizer",)
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")
VOCAB_ROW_WEIGHTS = ("embedding.word_embeddings.weight", "output_layer.weight")
DEFAULT_SEED = 42


# -- tokenizers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerResult:
    """What ``add_latent_tokens_to_tokenizer`` did."""

    output_path: str
    base_vocab_size: int  # ids before the four tokens
    vocab_size: int  # base + 4
    ids: LatentTokenIds
    already_present: bool  # the input already held the four at the expected ids


def _existing_ids(lookup) -> dict[str, int]:
    return {t: i for t in LATENT_TOKENS if (i := lookup(t)) is not None}


def _check_existing(path: str, existing: dict[str, int], size: int) -> bool:
    """True when the tokenizer already ends with the four tokens at the expected ids;
    raise when it holds some of them elsewhere."""
    if not existing:
        return False
    expected = LatentTokenIds.after(size - 4).as_tuple()
    if len(existing) == 4 and tuple(existing[t] for t in LATENT_TOKENS) == expected:
        return True
    found = ", ".join(f"{t}={i}" for t, i in existing.items())
    raise TokenizerError(
        f"--tokenizer-model {path!r} already contains latent token(s) {found}, not the four "
        f"{', '.join(LATENT_TOKENS)} as its last ids {expected[0]}..{expected[-1]}; "
        "start from the tokenizer without them")


def _write_bytes_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if os.path.exists(path):
            raise TokenizerError(f"--output-tokenizer {path!r} exists; choose a new path")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _hf_paths(tokenizer_path: str, output_path: str) -> tuple[str, str]:
    if os.path.isdir(tokenizer_path):
        tokenizer_path = os.path.join(tokenizer_path, "tokenizer.json")
    if not output_path.endswith(".json"):
        output_path = os.path.join(output_path, "tokenizer.json")
    return tokenizer_path, output_path


def _add_to_hf(tokenizer_path: str, output_path: str) -> TokenizerResult:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tok = RustTokenizer.from_file(tokenizer_path)
    except Exception as err:
        raise TokenizerError(f"--tokenizer-model {tokenizer_path!r} is not a Hugging Face "
                             f"tokenizer.json ({' '.join(str(err).split())})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    already = _check_existing(tokenizer_path, _existing_ids(tok.token_to_id), size)
    base = size - 4 if already else size
    if not already:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in LATENT_TOKENS])
        ids = tuple(tok.token_to_id(t) for t in LATENT_TOKENS)
        if ids != LatentTokenIds.after(base).as_tuple():
            raise TokenizerError(
                f"--tokenizer-model {tokenizer_path!r}: the tokens got ids {ids}, not "
                f"{base}..{base + 3} (the vocabulary has holes?)")
    _write_bytes_atomic(output_path, tok.to_str(pretty=True).encode("utf-8"))
    # The named tokens (EOS = end of document, BOS, PAD) come from tokenizer_config.json
    # next to tokenizer.json: it travels with the grown tokenizer.
    source_dir = os.path.dirname(os.path.abspath(tokenizer_path))
    target_dir = os.path.dirname(os.path.abspath(output_path))
    config = os.path.join(source_dir, "tokenizer_config.json")
    target = os.path.join(target_dir, "tokenizer_config.json")
    if source_dir != target_dir and os.path.isfile(config):
        if not os.path.exists(target):
            shutil.copyfile(config, target)
        elif open(config, "rb").read() != open(target, "rb").read():
            raise TokenizerError(
                f"--output-tokenizer: {target!r} exists and differs from {config!r}; the "
                "grown tokenizer needs the input's tokenizer_config.json (its named tokens)")
    return TokenizerResult(output_path, base, base + 4, LatentTokenIds.after(base), already)


def _add_to_sentencepiece(tokenizer_path: str, output_path: str) -> TokenizerResult:
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(tokenizer_path, "rb") as handle:
            proto.ParseFromString(handle.read())
        if not len(proto.pieces):
            raise ValueError("no pieces")
    except Exception as err:
        raise TokenizerError(f"--tokenizer-model {tokenizer_path!r} is not a SentencePiece "
                             f".model ({' '.join(str(err).split())})") from None
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    size = len(proto.pieces)
    already = _check_existing(tokenizer_path, _existing_ids(pieces.get), size)
    base = size - 4 if already else size
    if not already:
        for token in LATENT_TOKENS:
            piece = proto.pieces.add()
            piece.piece = token
            piece.score = 0.0
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    data = proto.SerializeToString()
    processor = SentencePieceProcessor(model_proto=data)
    ids = tuple(processor.piece_to_id(t) for t in LATENT_TOKENS)
    if ids != LatentTokenIds.after(base).as_tuple() or processor.get_piece_size() != base + 4:
        raise TokenizerError(f"--tokenizer-model {tokenizer_path!r}: the grown model gives the "
                             f"tokens ids {ids}, not {base}..{base + 3}")
    _write_bytes_atomic(output_path, data)
    return TokenizerResult(output_path, base, base + 4, LatentTokenIds.after(base), already)


def add_latent_tokens_to_tokenizer(tokenizer_path: str, tokenizer_type: str,
                                   output_path: str) -> TokenizerResult:
    """Write a copy of the tokenizer with ``LATENT_TOKENS`` appended (ids ``V .. V+3``).

    ``tokenizer_type`` is ``HuggingFaceTokenizer`` (``tokenizer_path``: a ``tokenizer.json`` or
    its directory; ``output_path``: a ``.json`` file, or a directory to write ``tokenizer.json``
    into; ``tokenizer_config.json`` is copied along) or ``SentencePieceTokenizer`` (a ``.model``).
    A tokenizer that already holds the four at ids ``V-4 .. V-1`` is copied unchanged
    (``already_present``); one holding any of them elsewhere is refused. The written file is
    loaded back with the project's tokenizer and its ids checked.
    """
    from ..data.tokenizers import build_tokenizer

    if tokenizer_type not in HF_TYPES + SENTENCEPIECE_TYPES:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; use one of "
            f"{', '.join(HF_TYPES + SENTENCEPIECE_TYPES)}")
    if tokenizer_type in HF_TYPES:
        tokenizer_path, output_path = _hf_paths(tokenizer_path, output_path)
    if not os.path.isfile(tokenizer_path):
        raise TokenizerError(f"--tokenizer-model {tokenizer_path!r} does not exist")
    if os.path.exists(output_path):
        raise TokenizerError(f"--output-tokenizer {output_path!r} exists; choose a new path")
    if os.path.abspath(output_path) == os.path.abspath(tokenizer_path):
        raise TokenizerError("--output-tokenizer must differ from --tokenizer-model")
    before = build_tokenizer(tokenizer_type, tokenizer_model=tokenizer_path)
    if tokenizer_type in HF_TYPES:
        result = _add_to_hf(tokenizer_path, output_path)
    else:
        result = _add_to_sentencepiece(tokenizer_path, output_path)
    after = build_tokenizer(tokenizer_type, tokenizer_model=result.output_path)
    if after.vocab_size != result.vocab_size or latent_token_ids(after) != result.ids:
        raise TokenizerError(f"{result.output_path!r} does not load with the expected ids "
                             f"{result.ids.as_tuple()} (vocab size {after.vocab_size})")
    if before._eod_id() != after._eod_id():
        raise TokenizerError(f"{result.output_path!r}: the end-of-document id changed from "
                             f"{before._eod_id()} to {after._eod_id()}")
    return result


def latent_token_ids(tokenizer: Any) -> LatentTokenIds:
    """The ids of the four tokens in a built project tokenizer (``build_tokenizer``); refuses a
    tokenizer that lacks any of them or holds them other than consecutive and in order."""
    ids = [tokenizer.token_to_id(t) for t in LATENT_TOKENS]
    missing = [t for t, i in zip(LATENT_TOKENS, ids) if i is None]
    if missing:
        raise TokenizerError(
            f"the tokenizer {getattr(tokenizer, 'path', '')!r} lacks the latent token(s) "
            f"{', '.join(missing)}; add them with tools/add_latent_tokens.py")
    if ids != list(range(ids[0], ids[0] + 4)):
        found = ", ".join(f"{t}={i}" for t, i in zip(LATENT_TOKENS, ids))
        raise TokenizerError(f"the latent tokens are not consecutive ids in the order "
                             f"{', '.join(LATENT_TOKENS)}: {found}")
    return LatentTokenIds(*ids)


# -- checkpoints -----------------------------------------------------------------------------
@dataclass(frozen=True)
class GrowResult:
    """What ``grow_checkpoint`` did."""

    output_dir: str
    iteration: int  # of the source checkpoint
    old_vocab_size: int
    new_vocab_size: int
    old_rows: int  # padded rows in the source (merged over TP)
    new_rows: int  # padded rows written (for `tensor_parallel_size`)
    tensor_parallel_size: int
    ids: LatentTokenIds


def new_latent_rows(hidden_size: int, seed: int = DEFAULT_SEED
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding rows, output-head rows), each [4, hidden_size] float32: N(0, d^-0.5)
    clamped to +-3 sigma, drawn from one generator seeded `seed`, embedding first."""
    sigma = hidden_size ** -0.5
    generator = torch.Generator().manual_seed(seed)
    embedding = (torch.randn(4, hidden_size, generator=generator) * sigma).clamp(
        -3 * sigma, 3 * sigma)
    head = (torch.randn(4, hidden_size, generator=generator) * sigma).clamp(
        -3 * sigma, 3 * sigma)
    return embedding, head


def _prepared_model_config(run):
    """The method-prepared model config (a method's extra ids included)."""
    from ..methods.registry import get_method

    spec = get_method(run.method)
    options = spec.options_from_args(argparse.Namespace(**run.method_args))
    return spec.prepare_model_config(run.model, options)


def insert_rows(tensor: torch.Tensor, at: int, rows: torch.Tensor, total: int) -> torch.Tensor:
    """``tensor[:at]``, ``rows`` (cast), ``tensor[at:]``, then cut or zero-padded to ``total``."""
    grown = torch.cat([tensor[:at], rows.to(tensor.dtype), tensor[at:]])
    if grown.shape[0] >= total:
        return grown[:total].clone()
    return torch.cat([grown, grown.new_zeros(total - grown.shape[0], *grown.shape[1:])])


def check_checkpoint_vocab(load_dir: str, base_vocab_size: int,
                           iteration: int | None = None) -> dict[str, Any]:
    """The stored run config of ``load_dir``, after checking that its vocabulary is the
    tokenizer's base vocabulary (the four tokens must follow exactly the rows it has)."""
    from ..training.checkpointing import read_checkpoint_config

    if not os.path.isdir(load_dir):
        raise ConfigError(f"--load {load_dir!r} is not a directory")
    stored = read_checkpoint_config(load_dir, iteration)
    if stored is None:
        raise ConfigError(f"--load {load_dir!r} holds no checkpoint "
                          "(no latest_checkpointed_iteration.txt)")
    vocab = stored.get("model", {}).get("vocab_size")
    if vocab != base_vocab_size:
        raise ConfigError(
            f"--load {load_dir!r} has vocab_size {vocab} but the tokenizer's base vocabulary "
            f"is {base_vocab_size}: the four tokens must follow the checkpoint's vocabulary "
            "(give the tokenizer the checkpoint was trained with)")
    return stored


def grow_checkpoint(load_dir: str, output_dir: str, new_vocab_size: int,
                    tokenizer_type: str | None = None, tokenizer_model: str | None = None,
                    seed: int = DEFAULT_SEED, iteration: int | None = None,
                    tensor_parallel_size: int | None = None) -> GrowResult:
    """Write a weights-only checkpoint (iteration 0, for ``--load ... --finetune``) of
    ``load_dir`` with the four latent rows inserted after its vocabulary (see the module
    docstring), split for ``tensor_parallel_size`` (default: the source's). Its stored run
    config has ``model.vocab_size = new_vocab_size`` (= old + 4) and the given tokenizer, which
    is checked to hold the four tokens at ids ``old .. old+3``."""
    from ..data.tokenizers import build_tokenizer
    from ..training.checkpointing import load_full_model_state, write_weights_checkpoint
    from ..training.config import RunConfig

    if os.path.exists(output_dir):
        raise ConfigError(f"--save {output_dir!r} exists; choose a new directory")
    old_vocab = new_vocab_size - 4
    stored = check_checkpoint_vocab(load_dir, old_vocab, iteration)
    ids = LatentTokenIds.after(old_vocab)
    if tokenizer_type:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model=tokenizer_model)
        if tokenizer.vocab_size != new_vocab_size or latent_token_ids(tokenizer) != ids:
            raise ConfigError(
                f"tokenizer {tokenizer_model!r} has {tokenizer.vocab_size} ids, the latent "
                f"tokens at {latent_token_ids(tokenizer).as_tuple()}; expected "
                f"{new_vocab_size} ids with them at {ids.as_tuple()}")
    full, stored, found_iteration = load_full_model_state(load_dir, iteration)
    missing = [name for name in VOCAB_ROW_WEIGHTS if name not in full]
    if missing:
        raise ConfigError(f"--load {load_dir!r} has no {', '.join(missing)} (tied or "
                          "renamed vocabulary weights are not supported)")
    hidden = full[VOCAB_ROW_WEIGHTS[0]].shape[1]
    if full[VOCAB_ROW_WEIGHTS[1]].shape[1] != hidden:
        raise ConfigError(f"--load {load_dir!r}: embedding and output head widths differ")

    old_run = RunConfig.from_dict(stored)
    old_rows = full[VOCAB_ROW_WEIGHTS[0]].shape[0]
    old_prepared = _prepared_model_config(old_run)
    if old_rows < old_vocab + old_prepared.extra_vocab:
        raise ConfigError(f"--load {load_dir!r}: {old_rows} embedding rows, fewer than its "
                          f"vocabulary ({old_vocab} + {old_prepared.extra_vocab} extra ids)")
    saved_tp = old_run.parallel.tensor_model_parallel_size
    tp = tensor_parallel_size or saved_tp
    run_config = dict(stored)
    run_config["model"] = dict(stored["model"], vocab_size=new_vocab_size)
    new_run = RunConfig.from_dict(run_config)
    new_run.model.validate(tp)
    new_rows = _prepared_model_config(new_run).padded_vocab_size(tp)

    embedding_rows, head_rows = new_latent_rows(hidden, seed)
    grown = dict(full)
    for name, rows in zip(VOCAB_ROW_WEIGHTS, (embedding_rows, head_rows)):
        grown[name] = insert_rows(full[name], old_vocab, rows, new_rows)

    run_config["parallel"] = dict(stored.get("parallel") or {}, tensor_model_parallel_size=tp)
    if tokenizer_type:
        run_config["tokenizer"] = {"tokenizer_type": tokenizer_type,
                                   "tokenizer_model": os.path.abspath(tokenizer_model),
                                   "vocab_file": None, "merge_file": None}
    run_config["latent_tokens"] = {
        "grown_from": os.path.abspath(load_dir), "iteration": found_iteration,
        "old_vocab_size": old_vocab, "ids": list(ids.as_tuple()), "tokens": list(LATENT_TOKENS),
        "seed": seed, "init": "N(0, d^-0.5) clamped to +-3 sigma; embedding rows drawn first"}

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".grow-", dir=parent)
    try:
        write_weights_checkpoint(staging, grown, run_config, tensor_parallel_size=tp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        if os.path.exists(output_dir):
            raise ConfigError(f"--save {output_dir!r} exists; choose a new directory")
        os.replace(staging, output_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return GrowResult(output_dir, found_iteration, old_vocab, new_vocab_size, old_rows,
                      new_rows, tp, ids)


__all__ = ["DEFAULT_SEED", "GrowResult", "TokenizerResult", "add_latent_tokens_to_tokenizer",
           "check_checkpoint_vocab", "grow_checkpoint", "insert_rows", "latent_token_ids",
           "new_latent_rows"]
