"""Input discovery and record reading for the data tools.

One job: turn an ``--input`` argument (a file, a directory or a glob) into an ordered list of
input files, and read their records (JSONL lines, gzipped JSONL lines, Parquet rows, plain-text
lines) with the file name and line number attached, so that every bad record can be reported
precisely. Decoding a record (UTF-8, JSON, keys) is separate from reading it so that the
expensive part can run in worker processes. Nothing here imports torch or megatron.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
GZIP_SUFFIXES = tuple(s + ".gz" for s in JSONL_SUFFIXES)
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = JSONL_SUFFIXES + GZIP_SUFFIXES + PARQUET_SUFFIXES


class InputError(ValueError):
    """An input that cannot be used at all (missing, unreadable, wrong format)."""


class BadRecord(ValueError):
    """One record that cannot be used; ``kind`` groups the reasons for the final report."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class InputFile:
    """One input file and how to read it."""

    path: str
    kind: str  # "jsonl" | "jsonl.gz" | "parquet" | "text"

    @property
    def unit(self) -> str:
        """What a record number counts in this file, for messages."""
        return "row" if self.kind == "parquet" else "line"


@dataclass(frozen=True)
class Record:
    """A raw record: its position and its undecoded payload.

    ``payload`` is the raw line (bytes) for line-based files and a ``{key: value}`` dict for
    Parquet rows. ``nbytes`` is the size of the raw input it stands for (for MB/s).
    """

    file_index: int
    number: int  # 1-based line (or row) number
    payload: Any
    nbytes: int


def file_kind(path: str, allowed: Sequence[str] = RECORD_SUFFIXES) -> str | None:
    """The reader kind for ``path`` from its suffix, or None when it is not a supported file."""
    name = path.lower()
    if name.endswith(GZIP_SUFFIXES) and name.endswith(tuple(allowed)):
        return "jsonl.gz"
    if name.endswith(JSONL_SUFFIXES) and name.endswith(tuple(allowed)):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES) and name.endswith(tuple(allowed)):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES) and name.endswith(tuple(allowed)):
        return "text"
    return None


def resolve_inputs(
    specs: str | Sequence[str], allowed: Sequence[str] = RECORD_SUFFIXES
) -> list[InputFile]:
    """Expand files, directories and globs into a sorted, de-duplicated list of input files.

    A directory contributes its supported files (not recursively), sorted by name; a glob its
    matches, sorted. Raises InputError naming the argument when nothing usable is found.
    """
    if isinstance(specs, str):
        specs = [specs]
    out: list[InputFile] = []
    seen: set[str] = set()
    for spec in specs:
        if os.path.isdir(spec):
            names = sorted(os.listdir(spec))
            paths = [os.path.join(spec, n) for n in names]
            paths = [p for p in paths if os.path.isfile(p) and file_kind(p, allowed)]
            if not paths:
                raise InputError(
                    f"input directory {spec!r} holds no supported files "
                    f"(expected names ending in {', '.join(allowed)})"
                )
        elif os.path.exists(spec):
            paths = [spec]
        elif glob.has_magic(spec):
            paths = sorted(p for p in glob.glob(spec) if not os.path.isdir(p))
            if not paths:
                raise InputError(f"input pattern {spec!r} matches no files")
        else:
            raise InputError(f"input {spec!r} does not exist")
        for path in paths:
            kind = file_kind(path, allowed)
            if kind is None:
                raise InputError(
                    f"input file {path!r} has an unsupported type "
                    f"(expected a name ending in {', '.join(allowed)})"
                )
            if not os.access(path, os.R_OK):
                raise InputError(f"input file {path!r} is not readable")
            if path not in seen:
                seen.add(path)
                out.append(InputFile(path, kind))
    return out


def check_inputs(files: Sequence[InputFile], keys: Sequence[str]) -> None:
    """Cheap up-front checks: Parquet files open and hold every key as a column."""
    for f in files:
        if f.kind != "parquet":
            continue
        names = _parquet_file(f.path).schema_arrow.names
        missing = [k for k in keys if k not in names]
        if missing:
            raise InputError(
                f"Parquet file {f.path!r} has no column {missing[0]!r} "
                f"(columns: {', '.join(names)}); pick columns with --json-keys"
            )


def count_records(files: Sequence[InputFile]) -> list[int]:
    """The number of records in each file (lines, or Parquet rows from the footer)."""
    counts = []
    for f in files:
        if f.kind == "parquet":
            counts.append(_parquet_file(f.path).metadata.num_rows)
            continue
        n = 0
        last = b"\n"
        with _open_binary(f) as stream:
            while True:
                block = stream.read(1 << 20)
                if not block:
                    break
                n += block.count(b"\n")
                last = block[-1:]
        counts.append(n + (0 if last == b"\n" else 1))
    return counts


def iter_records(
    files: Sequence[InputFile],
    keys: Sequence[str] = ("text",),
    start: int = 0,
    stop: int | None = None,
) -> Iterator[Record]:
    """Yield the records of all files in order; ``start``/``stop`` select a global range."""
    position = 0
    for file_index, f in enumerate(files):
        if stop is not None and position >= stop:
            return
        if f.kind == "parquet":
            records = _iter_parquet(file_index, f, keys)
        else:
            records = _iter_lines(file_index, f)
        for record in records:
            if position >= start and (stop is None or position < stop):
                yield record
            position += 1
            if stop is not None and position >= stop:
                return


def decode_record(record: Record, keys: Sequence[str]) -> tuple[dict[str, str], int]:
    """Decode a raw record into ``{key: text}``; raises BadRecord with the reason.

    Returns the texts and the number of input bytes they stand for.
    """
    payload = record.payload
    if isinstance(payload, bytes):
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecord(
                "invalid UTF-8", f"invalid UTF-8 at byte {err.start} ({err.reason})"
            ) from None
        if not line.strip():
            raise BadRecord("malformed JSON", "blank line, expected a JSON object")
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            reason = f"malformed JSON ({err.msg} at column {err.colno})"
            raise BadRecord("malformed JSON", reason) from None
        if not isinstance(data, dict):
            raise BadRecord(
                "malformed JSON", f"expected a JSON object, got {type(data).__name__}"
            )
    else:
        data = payload
    texts = {}
    for key in keys:
        if key not in data or data[key] is None:
            raise BadRecord("missing key", f"missing key {key!r}")
        value = data[key]
        if not isinstance(value, str):
            raise BadRecord(
                "missing key", f"key {key!r} holds {type(value).__name__}, expected a string"
            )
        if isinstance(payload, bytes) and "\\u" in line and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:  # a JSON escape of a lone surrogate
                bad = repr(value[err.start])
                raise BadRecord(
                    "invalid UTF-8", f"key {key!r} holds {bad}, which is not valid Unicode"
                ) from None
        texts[key] = value
    return texts, record.nbytes


def read_texts(
    files: Sequence[InputFile], keys: Sequence[str] = ("text",)
) -> Iterator[str]:
    """Yield every text of every record (JSON keys in order; plain-text files line by line).

    Stops with InputError naming file and line on the first bad record.
    """
    for record in iter_records(files, keys):
        f = files[record.file_index]
        if f.kind == "text":
            try:
                yield record.payload.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{f.path}:{record.number}: invalid UTF-8 at byte {err.start}"
                ) from None
            continue
        try:
            texts, _ = decode_record(record, keys)
        except BadRecord as bad:
            raise InputError(f"{f.path}:{record.number}: {bad.reason}") from None
        yield from texts.values()


def _open_binary(f: InputFile):
    try:
        if f.kind == "jsonl.gz":
            return gzip.open(f.path, "rb")
        return open(f.path, "rb")
    except OSError as err:
        raise InputError(f"cannot open input file {f.path!r}: {err.strerror}") from None


def _iter_lines(file_index: int, f: InputFile) -> Iterator[Record]:
    with _open_binary(f) as stream:
        number = 0
        try:
            for number, line in enumerate(stream, start=1):  # noqa: B007
                yield Record(file_index, number, line, len(line))
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise InputError(
                f"cannot read input file {f.path!r} after {f.unit} {number}: {err}"
            ) from None


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise InputError(f"cannot read Parquet file {path!r}: {err}") from None


def _iter_parquet(file_index: int, f: InputFile, keys: Sequence[str]) -> Iterator[Record]:
    parquet = _parquet_file(f.path)
    number = 0
    try:
        for batch in parquet.iter_batches(columns=list(keys), batch_size=1024):
            columns = {k: batch.column(k).to_pylist() for k in keys}
            for i in range(batch.num_rows):
                number += 1
                row = {k: columns[k][i] for k in keys}
                nbytes = sum(len(v.encode("utf-8")) for v in row.values() if isinstance(v, str))
                yield Record(file_index, number, row, nbytes)
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"cannot read Parquet file {f.path!r} after row {number}: {err}"
        ) from None
