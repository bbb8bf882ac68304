"""Tokenize raw documents into Megatron ``.bin/.idx`` datasets (``tools/preprocess_data.py``).

The output is what Megatron-LM's ``tools/preprocess_data.py`` writes for the same tokenizer
and input: megatron-core's ``IndexedDatasetBuilder``, the token dtype from
``DType.optimal_dtype(vocab_size)``, one dataset per JSON key named
``{output_prefix}_{key}_{document|sentence}``, the EOD token appended to the last sequence of a
document with ``--append-eod``. Documents keep their input order whatever the number of workers
or partitions, so the bytes do not depend on either.

Where this differs from Megatron-LM: a bad record (malformed JSON, missing key, empty document,
invalid UTF-8) stops the run with its file and line instead of crashing or writing an empty
document (``--skip-bad-lines`` skips and counts them instead); ``--split-sentences`` cuts the
document's own tokens at sentence starts (see ``sentences.py``) instead of tokenizing sentences
one by one with NLTK; outputs appear only once complete, each with a tokenizer sidecar
``{prefix}.tokenizer.json`` (see ``provenance.py``) that training checks its tokenizer against.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy

from megatron_latent.data.indexed import (
    AtomicIndexedDatasetWriter,
    dataset_prefix,
    optimal_token_dtype,
)
from megatron_latent.data.provenance import tokenizer_fingerprint
from megatron_latent.data.readers import (
    RECORD_SUFFIXES,
    BadRecord,
    InputError,
    InputFile,
    Record,
    check_inputs,
    count_records,
    decode_record,
    iter_records,
    resolve_inputs,
)
from megatron_latent.data.tokenizers import Tokenizer, build_tokenizer

MAX_REPORTED_SKIPS = 10
_BATCH_BYTES = 1 << 18
_BATCH_RECORDS = 64


class PreprocessError(RuntimeError):
    """The run cannot go on; the message names the file and line where it can."""


@dataclass
class PreprocessConfig:
    """Everything ``tools/preprocess_data.py`` takes (Megatron-LM's flag names)."""

    input: list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_special_tokens: list[str] = field(default_factory=list)
    eod_token: str | None = None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    split_sentences: bool = False
    split_on_newlines: bool = False
    lang: str = "en"
    workers: int = 1
    partitions: int = 1
    log_interval: int = 1000
    skip_bad_lines: bool = False

    @property
    def level(self) -> str:
        return "sentence" if self.split_sentences else "document"

    def build_tokenizer(self) -> Tokenizer:
        return build_tokenizer(
            self.tokenizer_type,
            tokenizer_model=self.tokenizer_model,
            vocab_file=self.vocab_file,
            merge_file=self.merge_file,
            special_tokens=self.tokenizer_special_tokens,
            eod_token=self.eod_token,
        )


@dataclass
class PreprocessStats:
    """What a run did."""

    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def add(self, other: PreprocessStats) -> None:
        self.documents += other.documents
        self.sequences += other.sequences
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.skipped.update(other.skipped)

    def summary(self) -> str:
        rate = max(self.seconds, 1e-9)
        text = (
            f"{self.documents} documents, {self.sequences} sequences, {self.tokens} tokens "
            f"in {self.seconds:.1f}s ({self.documents / rate:.1f} docs/s, "
            f"{self.bytes / rate / 2**20:.2f} MB/s, {self.tokens / rate:.0f} tokens/s)"
        )
        if self.skipped:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} bad records ({kinds})"
        return text


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Worker side: decode + tokenize one batch of records.

_WORKER: dict[str, Any] = {}


def _init_worker(config: PreprocessConfig, dtype: type[numpy.number]) -> None:
    _WORKER.clear()
    _WORKER["config"] = config
    _WORKER["tokenizer"] = config.build_tokenizer()
    _WORKER["dtype"] = dtype
    _WORKER["eod"] = _WORKER["tokenizer"].eod if config.append_eod else None
    if config.split_sentences:
        from megatron_latent.data.sentences import SentenceSplitter

        _WORKER["splitter"] = SentenceSplitter(config.lang, config.split_on_newlines)


def _encode_text(text: str) -> tuple[list[int], list[int]]:
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    if "splitter" in _WORKER:
        from megatron_latent.data.sentences import sentence_lengths

        ids, spans = tokenizer.tokenize_with_offsets(text)
        lengths = sentence_lengths(text, spans, _WORKER["splitter"].sentence_starts(text))
    else:
        ids = tokenizer.tokenize(text)
        lengths = [len(ids)] if ids else []
    return ids, lengths


def _encode_record(record: Record) -> tuple:
    """``("ok", number, nbytes, {key: (tokens, lengths)})`` or ``("bad", number, kind, reason)``."""
    config: PreprocessConfig = _WORKER["config"]
    try:
        texts, nbytes = decode_record(record, config.json_keys)
        out = {}
        for key, text in texts.items():
            if not text.strip():
                raise BadRecord("empty document", f"empty document under key {key!r}")
            ids, lengths = _encode_text(text)
            if not ids:
                raise BadRecord("empty document", f"no tokens under key {key!r}")
            if _WORKER["eod"] is not None:
                ids.append(_WORKER["eod"])
                lengths[-1] += 1
            out[key] = (numpy.asarray(ids, dtype=_WORKER["dtype"]), lengths)
    except BadRecord as bad:
        return ("bad", record.file_index, record.number, bad.kind, bad.reason)
    except Exception as err:  # the tokenizer rejected the text: report where
        reason = f"cannot tokenize ({type(err).__name__}: {err})"
        return ("bad", record.file_index, record.number, "tokenizer error", reason)
    return ("ok", record.file_index, record.number, nbytes, out)


def _encode_batch(batch: list) -> list[tuple]:
    results = []
    for item in batch:
        if isinstance(item, str):  # a reading error, passed through in order
            results.append(("fatal", item))
        else:
            results.append(_encode_record(item))
    return results


# ----------------------------------------------------------------------------------------------
# Main side.


def _batches(records: Iterator[Record]) -> Iterator[list]:
    """Group records into batches of bounded size; a reading error ends the stream in order."""
    batch: list = []
    size = 0
    try:
        for record in records:
            batch.append(record)
            size += record.nbytes
            if size >= _BATCH_BYTES or len(batch) >= _BATCH_RECORDS:
                yield batch
                batch, size = [], 0
    except InputError as err:
        batch.append(str(err))
    if batch:
        yield batch


def _mp_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_range(
    config: PreprocessConfig,
    files: Sequence[InputFile],
    workers: int,
    output_prefix: str,
    dtype: type[numpy.number],
    start: int = 0,
    stop: int | None = None,
    label: str = "",
    log: Callable[[str], None] = _stderr,
    sidecar: dict[str, Any] | None = None,
) -> PreprocessStats:
    """Tokenize records ``[start, stop)`` of ``files`` into datasets under ``output_prefix``
    (each with the tokenizer ``sidecar``, when given)."""
    stats = PreprocessStats()
    writers: dict[str, AtomicIndexedDatasetWriter] = {}
    pool = None
    began = time.time()
    try:
        for key in config.json_keys:
            prefix = dataset_prefix(output_prefix, key, config.level)
            writers[key] = AtomicIndexedDatasetWriter(prefix, dtype, sidecar)
        batches = _batches(iter_records(files, config.json_keys, start, stop))
        if workers > 1:
            pool = _mp_context().Pool(workers, initializer=_init_worker, initargs=(config, dtype))
            results: Iterable[list] = pool.imap(_encode_batch, batches)
        else:
            _init_worker(config, dtype)
            results = map(_encode_batch, batches)
        for batch in results:
            for result in batch:
                _consume(result, config, files, writers, stats, label, log)
                if config.log_interval > 0 and result[0] == "ok":
                    if stats.documents % config.log_interval == 0:
                        elapsed = max(time.time() - began, 1e-9)
                        log(
                            f"{label}Processed {stats.documents} documents "
                            f"({stats.documents / elapsed:.1f} docs/s, "
                            f"{stats.bytes / elapsed / 2**20:.2f} MB/s)."
                        )
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for writer in writers.values():
            writer.commit()
            stats.outputs.append(writer.prefix)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for writer in writers.values():
            writer.abort()
        raise
    stats.seconds = time.time() - began
    return stats


def _consume(
    result: tuple,
    config: PreprocessConfig,
    files: Sequence[InputFile],
    writers: dict[str, AtomicIndexedDatasetWriter],
    stats: PreprocessStats,
    label: str,
    log: Callable[[str], None],
) -> None:
    if result[0] == "fatal":
        raise PreprocessError(result[1])
    if result[0] == "bad":
        _, file_index, number, kind, reason = result
        where = f"{files[file_index].path}:{number}"
        if not config.skip_bad_lines:
            raise PreprocessError(
                f"{where}: {reason} (--skip-bad-lines skips such records and counts them)"
            )
        if sum(stats.skipped.values()) < MAX_REPORTED_SKIPS:
            log(f"{label}skipping {where}: {reason}")
        stats.skipped[kind] += 1
        return
    _, _, _, nbytes, encoded = result
    for key, (tokens, lengths) in encoded.items():
        writers[key].add_document(tokens, lengths)
        stats.sequences += len(lengths)
        stats.tokens += int(tokens.size)
    stats.documents += 1
    stats.bytes += nbytes


def _partition_ranges(total: int, partitions: int) -> list[tuple[int, int]]:
    bounds = [total * p // partitions for p in range(partitions + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _partition_main(index, config, files, workers, prefix, dtype, start, stop, queue) -> None:
    label = f"[partition {index}] "
    try:
        stats = _run_range(config, files, workers, prefix, dtype, start, stop, label)
        queue.put((index, "ok", stats))
    except BaseException as err:  # reported to the parent, which cleans up and raises
        message = str(err) if isinstance(err, (PreprocessError, InputError)) else repr(err)
        queue.put((index, "error", message))


def _collect(processes: list, queue: Any) -> dict[int, tuple[str, Any]]:
    """Wait for every partition's outcome; a process that died silently counts as an error."""
    import queue as queue_module

    outcomes: dict[int, tuple[str, Any]] = {}
    while len(outcomes) < len(processes):
        try:
            index, status, payload = queue.get(timeout=0.5)
            outcomes[index] = (status, payload)
        except queue_module.Empty:
            for index, proc in enumerate(processes):
                if index not in outcomes and not proc.is_alive() and proc.exitcode != 0:
                    outcomes[index] = ("error", f"partition {index} died (exit {proc.exitcode})")
    for proc in processes:
        proc.join()
    return outcomes


def _run_partitions(
    config: PreprocessConfig,
    files: Sequence[InputFile],
    dtype: type[numpy.number],
    log: Callable[[str], None],
    sidecar: dict[str, Any] | None = None,
) -> PreprocessStats:
    """Contiguous document ranges in parallel processes, merged in order afterwards (the
    merged outputs get the tokenizer ``sidecar``; the partitions none)."""
    total = sum(count_records(files))
    ranges = _partition_ranges(total, config.partitions)
    workers = config.workers // config.partitions
    ctx = _mp_context()
    queue = ctx.Queue()
    part_prefixes = [f"{config.output_prefix}_partition{p}" for p in range(config.partitions)]
    processes = []
    for p, (start, stop) in enumerate(ranges):
        args = (p, config, files, workers, part_prefixes[p], dtype, start, stop, queue)
        proc = ctx.Process(target=_partition_main, args=args)
        proc.start()
        processes.append(proc)
    try:
        outcomes = _collect(processes, queue)
    except BaseException:
        for proc in processes:
            proc.terminate()
            proc.join()
        raise
    stats = PreprocessStats()
    part_outputs = [
        dataset_prefix(prefix, key, config.level)
        for prefix in part_prefixes
        for key in config.json_keys
    ]
    try:
        errors = [outcomes[p][1] for p in sorted(outcomes) if outcomes[p][0] == "error"]
        if errors:
            raise PreprocessError(errors[0])
        for p in sorted(outcomes):
            stats.add(outcomes[p][1])
        log(f"Merging {config.partitions} partitions")
        for key in config.json_keys:
            with AtomicIndexedDatasetWriter(
                dataset_prefix(config.output_prefix, key, config.level), dtype, sidecar
            ) as writer:
                for prefix in part_prefixes:
                    writer.add_index(dataset_prefix(prefix, key, config.level))
                writer.commit()
                stats.outputs.append(writer.prefix)
    finally:
        for prefix in part_outputs:
            for suffix in (".bin", ".idx"):
                if os.path.exists(prefix + suffix):
                    os.remove(prefix + suffix)
    return stats


def check_config(config: PreprocessConfig) -> tuple[list[InputFile], Tokenizer]:
    """Every check that can fail before tokenizing: inputs, tokenizer, flags, output place."""
    if config.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {config.workers}")
    if config.partitions < 1:
        raise PreprocessError(f"--partitions must be >= 1, got {config.partitions}")
    if config.workers % config.partitions:
        raise PreprocessError(
            f"--workers ({config.workers}) must be a multiple of --partitions "
            f"({config.partitions}): each partition gets workers/partitions processes"
        )
    if not config.json_keys:
        raise PreprocessError("--json-keys needs at least one key")
    files = resolve_inputs(config.input, RECORD_SUFFIXES)
    check_inputs(files, config.json_keys)
    tokenizer = config.build_tokenizer()
    if config.append_eod:
        tokenizer.eod  # noqa: B018 -- raises a clear error when there is none
    if config.split_sentences:
        from megatron_latent.data.sentences import SentenceSplitter

        SentenceSplitter(config.lang, config.split_on_newlines)
    parent = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PreprocessError(f"--output-prefix: cannot write to directory {parent!r}")
    return files, tokenizer


def preprocess(
    config: PreprocessConfig, log: Callable[[str], None] = _stderr
) -> PreprocessStats:
    """Run the whole preprocessing; returns its statistics.

    Raises PreprocessError / InputError / TokenizerError with a message fit for the user.
    """
    began = time.time()
    files, tokenizer = check_config(config)
    dtype = optimal_token_dtype(tokenizer.vocab_size)
    sidecar = tokenizer_fingerprint(tokenizer).to_json()
    log(
        f"Tokenizing {len(files)} file(s) with {type(tokenizer).__name__} "
        f"(vocab {tokenizer.vocab_size}, {numpy.dtype(dtype).name} tokens), "
        f"{config.workers} worker(s), {config.partitions} partition(s)"
    )
    if config.partitions > 1:
        stats = _run_partitions(config, files, dtype, log, sidecar)
    else:
        stats = _run_range(config, files, config.workers, config.output_prefix, dtype, log=log,
                           sidecar=sidecar)
    stats.seconds = time.time() - began
    return stats
