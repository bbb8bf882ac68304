#!/usr/bin/env python
"""Write latent-thought training data (BoLT's M-step input) as a Megatron indexed dataset.

Each document's chunks are written with their latents in the prior or posterior form (a coin
per chunk), opened by the start token and closed by EOD, into an ordinary .bin/.idx dataset
that the GPT training reads like any other (../shared/methods/latent_thoughts.md, decisions 4
and 5; the formats are megatron_latent/latent/formats.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns on import that the GPU kernel libraries are absent; data tools use none.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

EPILOG = """\
input (JSONL, .jsonl/.json/.ndjson, optionally .gz; files, directories or quoted globs):
  one JSON object per line and document:
    {"id": "doc-7",                      optional; shown in messages
     "text": "First sentence. Second...",  the raw document (required, non-empty)
     "chunks": ["First sentence.", " Second..."],
                                         optional: the chunk texts, which must concatenate to
                                         "text" exactly; when absent, the chunking rule of
                                         megatron_latent/latent/chunking.py is applied
     "latent_ids": [[812, 33, 90], [7, 7]]
                                         one list of token ids per chunk: z as sampled, with or
                                         without its stopping EoL (a latent cut at the length
                                         cap has none; both are written as SoL ... EoL)
    }
  Instead of "latent_ids", "latent_text": ["...", "..."] gives one text per chunk (teacher
  outputs, where text is all there is); each is tokenised once, without BOS/EOS. Neither a
  chunk's text nor a latent text may tokenise into a latent-thought token. Each chunk's text
  is tokenised once, without BOS/EOS, and from then on everything is ids.

output:
  {output_prefix}.bin/.idx, one sequence per written document, and the tokenizer sidecar
  {output_prefix}.tokenizer.json (as tools/preprocess_data.py writes it). Files are written as
  *.incomplete and renamed when done: a failed run leaves nothing that looks finished.
  Documents are written in input order; each document's --copies copies follow one another.

tokenizer:
  The four latent-thought tokens (<|START_OF_LATENT|>, <|END_OF_LATENT|>, <|PRIOR_PREFIX|>,
  <|POSTERIOR_PREFIX|>) are appended to the tokenizer in this order when it has none of them;
  otherwise they must already be its last four ids in this order. Train with the same
  tokenizer (e.g. --tokenizer-special-tokens with the four tokens in this order) so the
  sidecar check passes.

format (per document copy):
  start + chunk_1 + ... + chunk_n + EOD, start = BOS when the tokenizer has one distinct from
  EOD, else EOD. Per chunk, with --latent-type random (default), prior "SoL PRI z EoL x" or
  posterior "SoL EoL x SoL POS z EoL", p = 0.5 each, drawn from
  numpy default_rng([seed, doc_key, copy, 0]) where doc_key = the first 8 bytes (big-endian)
  of SHA-256(text): the draws depend on --seed, the document's text and the copy index only
  (not on file order, worker count or DP/TP size). Write one copy per planned epoch
  (--copies) to keep a fresh draw per epoch.

raw mixing (--mix-raw-ratio r):
  each copy of each document is written raw ("start x_1 ... x_n EOD", the same chunk ids
  without latents) instead of augmented with probability r, drawn from
  default_rng([seed, doc_key, copy, 1]); the number of written documents does not change.
  0 (default, all BoLT runs): every copy augmented; 1: every copy raw.

example:
  python tools/make_latent_data.py --input latents.jsonl --output-prefix data/bolt_train \\
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer/ --copies 2 --seed 42
"""


class LatentDataError(ValueError):
    """A bad input or setting; the message names the file and line where there is one."""


@dataclass
class Stats:
    documents: int = 0
    written: int = 0
    raw: int = 0
    prior_chunks: int = 0
    posterior_chunks: int = 0
    other_chunks: int = 0
    tokens: int = 0
    text_tokens: int = 0
    latent_tokens: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = max(self.seconds, 1e-9)
        ratio = self.latent_tokens / max(self.text_tokens, 1)
        return (
            f"{self.documents} documents, {self.written} written ({self.raw} raw), "
            f"{self.prior_chunks} prior / {self.posterior_chunks} posterior"
            + (f" / {self.other_chunks} fixed-form" if self.other_chunks else "")
            + f" chunks, {self.tokens} tokens ({ratio:.2f} latent tokens per text token) "
            f"in {self.seconds:.1f}s ({self.documents / rate:.1f} docs/s)"
        )


def build_parser() -> argparse.ArgumentParser:
    from megatron_latent.data.tokenizer_args import add_tokenizer_args
    from megatron_latent.latent.formats import LATENT_TYPES

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_tokenizer_args(parser)
    parser.add_argument("--input", nargs="+", required=True,
                        help="JSONL files, directories or globs (see below).")
    parser.add_argument("--output-prefix", required=True,
                        help="Writes {prefix}.bin, {prefix}.idx, {prefix}.tokenizer.json.")
    parser.add_argument("--copies", type=int, default=1,
                        help="Copies of every document, each with its own coin draws: one per "
                        "planned epoch (default 1).")
    parser.add_argument("--seed", type=int, default=42,
                        help="Data seed of the coin and raw draws (default 42).")
    parser.add_argument("--mix-raw-ratio", type=float, default=0.0,
                        help="Probability that a copy is written raw instead (default 0).")
    parser.add_argument("--latent-type", choices=LATENT_TYPES, default="random",
                        help="random (default): the per-chunk coin; prior_only / "
                        "posterior_only: 'SoL z EoL x' / 'x SoL z EoL' for every chunk.")
    parser.add_argument("--log-interval", type=int, default=1000,
                        help="Report progress every this many documents (0: never).")
    return parser


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Document:
    text: str
    chunks_ids: list[list[int]]
    latents_ids: list[list[int]]


class _Parser:
    """Turns one JSONL record into ids; raises ValueError with the reason (no location)."""

    def __init__(self, tokenizer: Any, latent_ids: Any) -> None:
        self.tokenizer = tokenizer
        self.t = latent_ids
        self.forbidden = set(latent_ids.as_tuple())
        self.vocab_size = int(tokenizer.vocab_size)

    def parse(self, payload: bytes) -> Document:
        from megatron_latent.latent.chunking import chunk_document, tokenize_chunks

        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"invalid UTF-8 at byte {err.start} ({err.reason})") from None
        if not line.strip():
            raise ValueError("blank line, expected a JSON object")
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        where = f"document {data['id']!r}: " if "id" in data else ""
        try:
            return self._parse_object(data, chunk_document, tokenize_chunks)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None

    def _parse_object(self, data: dict, chunk_document, tokenize_chunks) -> Document:
        text = data.get("text")
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("empty document ('text' holds no non-whitespace character)")
        chunks = data.get("chunks")
        if chunks is None:
            chunks = chunk_document(text)
        else:
            if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
                raise ValueError("'chunks' must be a list of strings")
            if "".join(chunks) != text:
                raise ValueError("the 'chunks' do not concatenate to 'text'")
            if not chunks or any(not c for c in chunks):
                raise ValueError("'chunks' holds an empty chunk")
        has_ids, has_text = "latent_ids" in data, "latent_text" in data
        if has_ids == has_text:
            raise ValueError("give exactly one of 'latent_ids' and 'latent_text'")
        key = "latent_ids" if has_ids else "latent_text"
        latents = data[key]
        if not isinstance(latents, list) or len(latents) != len(chunks):
            count = len(latents) if isinstance(latents, list) else type(latents).__name__
            raise ValueError(f"{key!r} must be a list with one entry per chunk: "
                             f"{len(chunks)} chunks, {key!r} has {count}")
        try:
            chunks_ids = tokenize_chunks(self.tokenizer, chunks, self.forbidden)
        except ValueError as err:
            raise ValueError(f"'chunks': {err}") from None
        if has_ids:
            latents_ids = [self._ids(z, i) for i, z in enumerate(latents)]
        else:
            if not all(isinstance(z, str) for z in latents):
                raise ValueError("'latent_text' must be a list of strings")
            try:
                latents_ids = tokenize_chunks(self.tokenizer, latents, self.forbidden)
            except ValueError as err:
                raise ValueError(f"'latent_text': {err}".replace("chunk ", "latent ")) from None
        return Document(text, chunks_ids, latents_ids)

    def _ids(self, z: Any, i: int) -> list[int]:
        from megatron_latent.latent.formats import FormatError, normalize_latent

        if not isinstance(z, list):
            raise ValueError(f"'latent_ids' entry {i} must be a list of token ids")
        for t in z:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"'latent_ids' entry {i} holds {t!r}, not a token id in "
                                 f"[0, {self.vocab_size})")
        try:
            return normalize_latent(z, self.t)
        except FormatError as err:
            raise ValueError(f"'latent_ids' entry {i}: {err}") from None


def make_latent_data(args: argparse.Namespace, log=_stderr) -> Stats:
    """Run the tool; raises LatentDataError (or the tokenizer's/reader's errors) on failure."""
    import numpy

    from megatron_latent.data.indexed import AtomicIndexedDatasetWriter, optimal_token_dtype
    from megatron_latent.data.provenance import tokenizer_fingerprint
    from megatron_latent.data.readers import (
        GZIP_SUFFIXES,
        JSONL_SUFFIXES,
        iter_records,
        resolve_inputs,
    )
    from megatron_latent.data.tokenizer_args import tokenizer_from_args
    from megatron_latent.latent import formats

    if args.copies < 1:
        raise LatentDataError(f"--copies must be at least 1, got {args.copies}")
    if args.seed < 0:
        raise LatentDataError(f"--seed must be non-negative, got {args.seed}")
    if not 0.0 <= args.mix_raw_ratio <= 1.0:
        raise LatentDataError(f"--mix-raw-ratio must be in [0, 1], got {args.mix_raw_ratio}")
    began = time.time()
    files = resolve_inputs(args.input, JSONL_SUFFIXES + GZIP_SUFFIXES)
    tokenizer = tokenizer_from_args(args)
    from megatron_latent.data.tokenizers import TokenizerError
    from megatron_latent.latent.tokens import latent_token_ids

    try:
        t = latent_token_ids(tokenizer)
    except TokenizerError as err:
        raise LatentDataError(f"--tokenizer-model: {err}") from None
    start_id, eod_id = formats.document_start_id(tokenizer), int(tokenizer.eod)
    dtype = optimal_token_dtype(tokenizer.vocab_size)
    parser = _Parser(tokenizer, t)
    log(f"Writing latent data from {len(files)} file(s) with {type(tokenizer).__name__} "
        f"(vocab {tokenizer.vocab_size} with SoL/EoL/PRI/POS = {list(t.as_tuple())}, start "
        f"{start_id}, eod {eod_id}): {args.copies} copies, seed {args.seed}, latent type "
        f"{args.latent_type}, raw ratio {args.mix_raw_ratio}")
    stats = Stats()
    sidecar = tokenizer_fingerprint(tokenizer).to_json()
    with AtomicIndexedDatasetWriter(args.output_prefix, dtype, sidecar) as writer:
        for record in iter_records(files):
            try:
                doc = parser.parse(record.payload)
            except ValueError as err:
                raise LatentDataError(
                    f"{files[record.file_index].path}:{record.number}: {err}") from None
            key = formats.document_hash(doc.text)
            stats.documents += 1
            for copy in range(args.copies):
                if formats.written_raw(args.seed, key, copy, args.mix_raw_ratio):
                    ids = formats.raw_document(doc.chunks_ids, start_id=start_id, eod_id=eod_id)
                    stats.raw += 1
                else:
                    forms = formats.chunk_forms(args.latent_type, args.seed, key, copy,
                                                len(doc.chunks_ids))
                    body = formats.format_chunks(doc.chunks_ids, doc.latents_ids, forms, t)
                    ids = [start_id, *body, eod_id]
                    stats.prior_chunks += forms.count("prior")
                    stats.posterior_chunks += forms.count("posterior")
                    stats.other_chunks += len(forms) - forms.count("prior") - forms.count(
                        "posterior")
                    stats.latent_tokens += sum(len(z) for z in doc.latents_ids)
                stats.text_tokens += sum(len(x) for x in doc.chunks_ids)
                writer.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                stats.written += 1
                stats.tokens += len(ids)
            if args.log_interval > 0 and stats.documents % args.log_interval == 0:
                elapsed = max(time.time() - began, 1e-9)
                log(f"Processed {stats.documents} documents ({stats.written} written, "
                    f"{stats.documents / elapsed:.1f} docs/s).")
        if stats.documents == 0:
            raise LatentDataError(f"the input ({', '.join(f.path for f in files)}) holds no "
                                  "documents")
        writer.commit()
    stats.outputs.append(args.output_prefix)
    stats.seconds = time.time() - began
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = make_latent_data(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    from megatron_latent.data.indexed import sidecar_path

    print(f"Done: {stats.summary()}", file=sys.stderr)
    prefix = args.output_prefix
    print(f"Wrote {prefix}.bin, {prefix}.idx and {sidecar_path(prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
