#!/usr/bin/env python
"""Ask a teacher for the latent thought behind every chunk of every document (BoLT's teacher
synthesis), resumably; the output is tools/make_latent_data.py's input.

    python tools/synthesize_latents.py --input docs.jsonl --output latents.jsonl \\
        --teacher http --base-url https://api.openai.com/v1 --model gpt-4o-mini \\
        --temperature 0.7 --max-tokens 6000 --concurrency 32
    python tools/synthesize_latents.py --input docs.jsonl --output latents.jsonl \\
        --teacher project --load ckpt/ --max-tokens 512 --batch-size 16
    torchrun --nproc_per_node 2 tools/synthesize_latents.py --input docs.jsonl \\
        --output latents.jsonl --teacher project --load ckpt/ --tensor-model-parallel-size 2
    python tools/synthesize_latents.py --input docs.jsonl --output latents.jsonl \\
        --teacher hf --hf-model path/to/hf_model --device cuda --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

EPILOG = """\
input (JSONL, .jsonl/.json/.ndjson, optionally .gz; files, directories or quoted globs):
  one JSON object per line and document: {"id": ..., optional, "text": "...", required,
  "chunks": [...], optional: chunk texts that concatenate to "text"; otherwise the chunking
  rule of megatron_latent/latent/chunking.py is applied}. Other fields are passed through.

prompt:
  chunk i is asked for with megatron_latent.latent.synthesis.PROMPT_TEMPLATE, its {prefix} the
  previous chunk's text ("N/A" for chunk 0) and its {suffix} the chunk; --prompt-template FILE
  replaces the template (it must hold {prefix} and {suffix} once each). The teacher's text is
  used verbatim. --temperature 0 is greedy decoding for every teacher.

output:
  --output: JSONL in tools/make_latent_data.py's input format, one line per document whose
  chunks are all finished, in input order: the input record with "chunks" and "latent_text"
  (one text per chunk). It is written atomically at the end of each run (to a temporary file,
  fsynced, then renamed) from the journal: it is always consistent and complete documents
  only; a document with an unfinished chunk is left out until a rerun finishes it.

resuming (--work-dir, default {output}.work):
  journal.jsonl: one line per finished chunk (document key = sha256 of its text and chunks,
  chunk index, latent text, tokens), appended, flushed and fsynced as soon as the teacher
  returns it, so a crash or Ctrl-C loses nothing written (a torn last line is dropped on the
  next start). A rerun skips every chunk in the journal (never requested twice) and asks only
  for the rest. settings.json records the teacher, its sampling settings and the prompt
  template; a rerun with other settings is refused unless --allow-changed-settings. The work
  directory is locked against a second concurrent run.

failures:
  a request that fails (HTTP: after --retries retries with exponential backoff and jitter on
  connection errors, timeouts, 429 and 5xx; project: a prompt longer than the context) is
  counted and reported; its chunk stays unfinished and is asked for again on the next run.

exit status: 0 all chunks finished; 1 some chunks unfinished (failed requests; rerun);
  2 bad flags, inputs or settings; 130 interrupted (the journal keeps what was finished).
"""

TEACHERS = ("project", "hf", "http")


class SynthesisError(ValueError):
    """A bad flag, input or work directory; the message names the flag or file."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=EPILOG)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", required=True,
                    help="JSONL files, directories or globs of documents")
    io.add_argument("--output", required=True,
                    help="JSONL for tools/make_latent_data.py (written at the end of each run)")
    io.add_argument("--work-dir", default=None,
                    help="journal and settings for resuming (default: {output}.work)")
    io.add_argument("--limit-documents", type=int, default=None,
                    help="use only the first N documents of the input")
    io.add_argument("--allow-changed-settings", action="store_true",
                    help="resume a work directory made with other teacher settings")
    io.add_argument("--log-interval", type=float, default=10.0,
                    help="seconds between progress lines (default: %(default)s; 0: each batch)")
    gen = parser.add_argument_group("generation (every teacher)")
    gen.add_argument("--teacher", choices=TEACHERS, required=True)
    gen.add_argument("--prompt-template", default=None,
                     help="a file with the prompt template ({prefix}, {suffix})")
    gen.add_argument("--max-tokens", type=int, default=None,
                     help="most generated tokens per chunk (default: 6000 for http as in the "
                          "notes, 512 for project and hf)")
    gen.add_argument("--temperature", type=float, default=0.7,
                     help="sampling temperature; 0 = greedy (default: %(default)s, the notes')")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    gen.add_argument("--top-k", type=int, default=0, help="project/hf: top-k (0 = off)")
    gen.add_argument("--seed", type=int, default=None,
                     help="sampling seed (project/hf: default 0, mixed with each batch's "
                          "prompts; http: sent as 'seed' when given)")
    gen.add_argument("--stop", action="append", default=[],
                     help="stop string (repeatable; project and http)")
    gen.add_argument("--batch-size", type=int, default=None,
                     help="prompts per batch (project/hf: default 8; http: prompts handed to "
                          "the thread pool at once, default 4 x --concurrency)")
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="project/hf device (default: %(default)s)")
    project = parser.add_argument_group("--teacher project (a checkpoint of this project)")
    project.add_argument("--load", default=None, help="checkpoint directory")
    project.add_argument("--iteration", type=int, default=None, help="default: latest")
    project.add_argument("--tensor-model-parallel-size", type=int, default=1,
                         help="TP size; run under torchrun with as many processes")
    precision = project.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 (default on CUDA)")
    precision.add_argument("--fp32", action="store_true", help="float32 (default on the CPU)")
    project.add_argument("--no-cache", action="store_true",
                         help="recompute the prefix for every token (reference path)")
    for name in ("--tokenizer-type", "--tokenizer-model", "--vocab-file", "--merge-file"):
        project.add_argument(name, default=None, help="override the checkpoint's tokenizer")
    hf = parser.add_argument_group("--teacher hf (a Hugging Face causal LM folder)")
    hf.add_argument("--hf-model", default=None, help="local folder with config and weights")
    hf.add_argument("--hf-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default: the checkpoint's)")
    http = parser.add_argument_group("--teacher http (an OpenAI-compatible endpoint)")
    http.add_argument("--base-url", default=None,
                      help="e.g. http://127.0.0.1:8000/v1 (POSTs to {base}/completions)")
    http.add_argument("--model", default=None, help="the 'model' field of each request")
    http.add_argument("--chat", action="store_true",
                      help="use {base}/chat/completions with the prompt as the user message")
    http.add_argument("--api-key", default=None,
                      help="bearer token (default: the variable named by --api-key-env)")
    http.add_argument("--api-key-env", default="OPENAI_API_KEY",
                      help="environment variable holding the key (default: %(default)s)")
    http.add_argument("--concurrency", type=int, default=8,
                      help="requests in flight (default: %(default)s)")
    http.add_argument("--retries", type=int, default=5,
                      help="retries per request after the first attempt (default: %(default)s)")
    http.add_argument("--retry-backoff", type=float, default=1.0,
                      help="first retry delay in seconds, doubled per retry, with jitter "
                           "(default: %(default)s)")
    http.add_argument("--max-backoff", type=float, default=60.0,
                      help="longest retry delay in seconds (default: %(default)s)")
    http.add_argument("--timeout", type=float, default=600.0,
                      help="seconds per request attempt (default: %(default)s)")
    return parser


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- documents


@dataclass
class Document:
    record: dict
    text: str
    chunks: list[str]
    key: str
    where: str  # file:line, for messages

    @property
    def name(self) -> str:
        return repr(self.record["id"]) if "id" in self.record else self.where


def document_key(text: str, chunks: list[str]) -> str:
    """The journal's key of a document: sha256 of its text and chunks (not of its position,
    so inputs may be reordered or re-sharded between runs)."""
    payload = json.dumps([text, chunks], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()[:32]


def read_documents(specs: list[str], limit: int | None) -> list[Document]:
    from megatron_latent.data.readers import (
        GZIP_SUFFIXES,
        JSONL_SUFFIXES,
        InputError,
        iter_records,
        resolve_inputs,
    )
    from megatron_latent.latent.chunking import chunk_document

    try:
        files = resolve_inputs(specs, JSONL_SUFFIXES + GZIP_SUFFIXES)
    except InputError as error:
        raise SynthesisError(f"--input: {error}") from None
    documents = []
    for record in iter_records(files, stop=limit):
        where = f"{files[record.file_index].path}:{record.number}"
        try:
            data = json.loads(record.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SynthesisError(f"{where}: not a JSON line ({error})") from None
        if not isinstance(data, dict):
            raise SynthesisError(f"{where}: expected a JSON object")
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise SynthesisError(f"{where}: 'text' must be a non-empty string")
        chunks = data.get("chunks")
        if chunks is None:
            chunks = chunk_document(text)
        elif (not isinstance(chunks, list) or not chunks
              or not all(isinstance(c, str) and c for c in chunks)):
            raise SynthesisError(f"{where}: 'chunks' must be a list of non-empty strings")
        elif "".join(chunks) != text:
            raise SynthesisError(f"{where}: the 'chunks' do not concatenate to 'text'")
        documents.append(Document(data, text, list(chunks), document_key(text, chunks), where))
    if not documents:
        raise SynthesisError(f"--input {' '.join(specs)} holds no documents")
    return documents


# --------------------------------------------------------------------------- work directory


class Journal:
    """Finished chunks, one JSON line each: appended, flushed and fsynced per chunk.

    Opening it drops a torn last line (a crash during a write) and indexes every line's offset
    by (document key, chunk), so the latents stay on disk, not in memory."""

    def __init__(self, path: str, log=_stderr):
        self.path = path
        self.index: dict[tuple[str, int], int] = {}
        if os.path.exists(path):
            self._repair(log)
        self.handle = open(path, "ab")
        self._scan()
        self.reader = open(path, "rb")

    def _repair(self, log) -> None:
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())
                log(f"synthesize: dropped a torn last line of {self.path} ({len(data) - keep} "
                    "bytes, written when a run stopped)")

    def _scan(self) -> None:
        with open(self.path, "rb") as handle:
            offset = 0
            for number, line in enumerate(handle, 1):
                try:
                    entry = json.loads(line)
                    key = (entry["doc"], int(entry["chunk"]))
                    if not isinstance(entry["latent_text"], str):
                        raise TypeError("latent_text is not a string")
                except (ValueError, KeyError, TypeError) as error:
                    raise SynthesisError(f"{self.path}:{number}: corrupt journal line "
                                         f"({error}); move the work directory away") from None
                self.index.setdefault(key, offset)
                offset += len(line)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.index

    def add(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        offset = self.handle.tell()
        self.handle.write(line)
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.index.setdefault((entry["doc"], int(entry["chunk"])), offset)

    def read(self, key: tuple[str, int]) -> dict:
        self.reader.seek(self.index[key])
        return json.loads(self.reader.readline())

    def close(self) -> None:
        self.handle.close()
        self.reader.close()


@contextlib.contextmanager
def locked(work_dir: str):
    import fcntl

    handle = open(os.path.join(work_dir, ".lock"), "a")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SynthesisError(f"--work-dir {work_dir} is in use by another run") from None
        yield
    finally:
        handle.close()


def check_settings(work_dir: str, settings: dict, allow_changed: bool) -> None:
    path = os.path.join(work_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as handle:
            before = json.load(handle)
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed and not allow_changed:
            details = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise SynthesisError(
                f"--work-dir {work_dir} was started with other settings ({details}); rerun with "
                "the same settings, another --work-dir, or --allow-changed-settings")
        if not changed:
            return
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(settings, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_output(path: str, documents: list[Document], journal: Journal) -> tuple[int, int]:
    """Complete documents, in input order, atomically; returns (written, incomplete)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    written = incomplete = 0
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            for doc in documents:
                keys = [(doc.key, i) for i in range(len(doc.chunks))]
                if not all(k in journal for k in keys):
                    incomplete += 1
                    continue
                record = {k: v for k, v in doc.record.items()
                          if k not in ("latent_ids", "latent_text", "chunks")}
                record["chunks"] = doc.chunks
                record["latent_text"] = [journal.read(k)["latent_text"] for k in keys]
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return written, incomplete


# --------------------------------------------------------------------------- teachers


def check_args(args: argparse.Namespace) -> None:
    if args.limit_documents is not None and args.limit_documents < 1:
        raise SynthesisError(f"--limit-documents must be >= 1, got {args.limit_documents}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise SynthesisError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise SynthesisError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SynthesisError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SynthesisError(f"--batch-size must be >= 1, got {args.batch_size}")
    if any(not s for s in args.stop):
        raise SynthesisError("--stop strings must be non-empty")
    needed = {"project": ("--load", args.load), "hf": ("--hf-model", args.hf_model),
              "http": ("--base-url", args.base_url)}[args.teacher]
    if not needed[1]:
        raise SynthesisError(f"--teacher {args.teacher} needs {needed[0]}")
    if args.teacher == "project" and not os.path.isdir(args.load):
        raise SynthesisError(f"--load {args.load}: no such checkpoint directory")
    if args.teacher == "hf" and not os.path.isdir(args.hf_model):
        raise SynthesisError(f"--hf-model {args.hf_model}: no such directory")
    if args.teacher == "http":
        if not args.base_url.startswith(("http://", "https://")):
            raise SynthesisError(f"--base-url {args.base_url!r} must start with http:// or "
                                 "https://")
        for flag, value, low in (("--concurrency", args.concurrency, 1),
                                 ("--retries", args.retries, 0)):
            if value < low:
                raise SynthesisError(f"{flag} must be >= {low}, got {value}")
        if args.timeout <= 0 or args.retry_backoff < 0 or args.max_backoff < 0:
            raise SynthesisError("--timeout must be > 0, --retry-backoff and --max-backoff "
                                 ">= 0")
    if args.teacher == "project":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != args.tensor_model_parallel_size:
            raise SynthesisError(
                f"--tensor-model-parallel-size {args.tensor_model_parallel_size} must equal the "
                f"number of processes ({world}): every rank runs the same batches")


def build_teacher(args: argparse.Namespace):
    from megatron_latent.latent import synthesis

    if args.teacher == "http":
        return synthesis.HTTPTeacher(
            args.base_url, model=args.model,
            api_key=args.api_key or os.environ.get(args.api_key_env) or None, chat=args.chat,
            temperature=args.temperature, max_tokens=args.max_tokens or 6000, top_p=args.top_p,
            seed=args.seed, stop=args.stop, concurrency=args.concurrency, retries=args.retries,
            backoff=args.retry_backoff, max_backoff=args.max_backoff, timeout=args.timeout,
            batch_size=args.batch_size)
    import torch

    from megatron_latent.inference.loading import tool_device

    device = tool_device(args.device)
    if args.teacher == "hf":
        return synthesis.HFTeacher(
            args.hf_model, device=str(device), dtype=args.hf_dtype,
            max_new_tokens=args.max_tokens or 512, temperature=args.temperature,
            top_p=args.top_p or 1.0, top_k=args.top_k, seed=args.seed or 0,
            batch_size=args.batch_size or 8)
    return synthesis.ProjectTeacher(
        args.load, tensor_parallel_size=args.tensor_model_parallel_size, device=device,
        dtype=torch.bfloat16 if args.bf16 else torch.float32 if args.fp32 else None,
        iteration=args.iteration,
        tokenizer_overrides={"tokenizer_type": args.tokenizer_type,
                             "tokenizer_model": args.tokenizer_model,
                             "vocab_file": args.vocab_file, "merge_file": args.merge_file},
        max_new_tokens=args.max_tokens or 512, temperature=args.temperature,
        top_p=args.top_p or 1.0, top_k=args.top_k, seed=args.seed or 0,
        batch_size=args.batch_size or 8, stop=args.stop, use_cache=not args.no_cache)


# --------------------------------------------------------------------------- the run


@dataclass
class Stats:
    documents: int = 0
    chunks: int = 0
    earlier: int = 0  # finished before this run
    done: int = 0  # finished in this run
    failed: int = 0  # requests that failed for good in this run
    tokens: int = 0
    written: int = 0
    incomplete: int = 0
    seconds: float = 0.0
    requests: int | None = None  # HTTP attempts
    retries: int | None = None
    errors: list[str] = field(default_factory=list)

    def progress(self) -> str:
        elapsed = max(self.seconds, 1e-9)
        return (f"{self.earlier + self.done}/{self.chunks} chunks "
                f"({self.done} this run, {self.earlier} earlier), "
                f"{self.done / elapsed:.2f} chunks/s, {self.tokens / elapsed:.1f} tokens/s, "
                f"{self.failed} failed")

    def summary(self) -> str:
        http = (f", {self.requests} HTTP requests ({self.retries} retries)"
                if self.requests is not None else "")
        return (f"{self.done} chunks done this run ({self.earlier} earlier, "
                f"{self.earlier + self.done}/{self.chunks} in all), {self.failed} failed "
                f"requests, {self.tokens} tokens generated in {self.seconds:.1f}s "
                f"({self.done / max(self.seconds, 1e-9):.2f} chunks/s, "
                f"{self.tokens / max(self.seconds, 1e-9):.1f} tokens/s){http}; "
                f"{self.written}/{self.documents} documents written, "
                f"{self.incomplete} incomplete")


def synthesize(args: argparse.Namespace, teacher: Any = None, log=_stderr) -> Stats:
    """Run the tool (``teacher``: a prebuilt one, else from the flags); raises SynthesisError
    for bad flags, inputs or work directories."""
    from megatron_latent.latent import synthesis

    check_args(args)
    template = synthesis.PROMPT_TEMPLATE
    if args.prompt_template:
        try:
            template = Path(args.prompt_template).read_text(encoding="utf-8")
            synthesis.check_template(template)
        except (OSError, ValueError) as error:
            raise SynthesisError(f"--prompt-template {args.prompt_template}: {error}") from None
    documents = read_documents(args.input, args.limit_documents)
    if teacher is None:
        from megatron_latent.config import ConfigError

        try:
            teacher = build_teacher(args)
        except (ConfigError, ValueError, OSError) as error:
            raise SynthesisError(f"--teacher {args.teacher}: {error}") from None
    writer = getattr(teacher, "is_writer", True)
    settings = dict(teacher.describe(), prompt_template=synthesis.template_fingerprint(template))
    work_dir = args.work_dir or f"{args.output}.work"
    stats = Stats(documents=len(documents), chunks=sum(len(d.chunks) for d in documents))
    sync = getattr(teacher, "sync", lambda value: value)
    with contextlib.ExitStack() as stack:
        journal = None
        status: tuple[str, Any]
        if writer:
            try:
                os.makedirs(work_dir, exist_ok=True)
                stack.enter_context(locked(work_dir))
                check_settings(work_dir, settings, args.allow_changed_settings)
                journal = Journal(os.path.join(work_dir, "journal.jsonl"), log)
                stack.callback(journal.close)
                status = ("ok", set(journal.index))
            except (SynthesisError, OSError) as error:
                status = ("error", str(error))
        else:
            status = ("ok", set())
        status = sync(status)  # every rank runs the batches rank 0 leaves to do
        if status[0] == "error":
            raise SynthesisError(status[1])
        done: set = status[1]
        pending, seen = [], set()
        for doc in documents:
            for i in range(len(doc.chunks)):
                key = (doc.key, i)
                if key in done:
                    stats.earlier += 1
                elif key not in seen:  # a duplicate document is asked for once
                    seen.add(key)
                    pending.append((doc, i, synthesis.chunk_prompt(doc.chunks, i, template)))
        if writer:
            log(f"synthesize: {stats.documents} documents, {stats.chunks} chunks, "
                f"{stats.earlier} finished earlier, {len(pending)} to ask the {args.teacher} "
                f"teacher for (work dir {work_dir})")
        began = last = time.time()
        batch = max(1, int(getattr(teacher, "batch_size", 8)))
        for start in range(0, len(pending), batch):
            window = pending[start:start + batch]
            for index, outcome in synthesis.iter_outcomes(teacher, [p for _, _, p in window]):
                doc, i, _ = window[index]
                if isinstance(outcome, synthesis.TeacherResult):
                    if journal is not None:
                        journal.add({"doc": doc.key, "chunk": i, "id": doc.record.get("id"),
                                     "latent_text": outcome.text, "tokens": outcome.tokens,
                                     "finish_reason": outcome.finish_reason})
                    stats.done += 1
                    stats.tokens += outcome.tokens
                else:
                    stats.failed += 1
                    message = (f"chunk {i} of document {doc.name} failed after "
                               f"{outcome.attempts} attempt(s): {outcome.error}")
                    if len(stats.errors) < 20:
                        stats.errors.append(message)
                    if writer:
                        log(f"synthesize: warning: {message}")
                stats.seconds = time.time() - began
            if writer and time.time() - last >= args.log_interval:
                last = time.time()
                log(f"synthesize: {stats.progress()}")
        stats.seconds = time.time() - began
        if hasattr(teacher, "requests"):
            stats.requests, stats.retries = teacher.requests, teacher.retried
        if journal is not None:
            stats.written, stats.incomplete = write_output(args.output, documents, journal)
    return stats


def main(argv: list[str] | None = None, teacher: Any = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_latent.config import ConfigError

    initialized = _dist_initialized()
    try:
        stats = synthesize(args, teacher)
    except (SynthesisError, ConfigError) as error:
        print(f"synthesize_latents.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synthesize_latents.py: interrupted; the finished chunks are kept in the journal, "
              "rerun to continue", file=sys.stderr)
        return 130
    finally:
        if args.teacher == "project" and teacher is None and not initialized:
            from megatron_latent.distributed import destroy_parallel

            destroy_parallel()
    if _rank() == 0:
        print(f"synthesize_latents.py: done: {stats.summary()}", file=sys.stderr)
        if stats.incomplete:
            print(f"synthesize_latents.py: {stats.incomplete} document(s) incomplete "
                  f"({stats.failed} failed requests); rerun the same command to retry them",
                  file=sys.stderr)
        print(f"Wrote {stats.written} documents to {args.output}")
    return 1 if stats.incomplete else 0


def _dist_initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    sys.exit(main())
