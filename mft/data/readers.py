"""Data files -> records, one per row, each with the line (or row) number users see in errors.

JSONL (.jsonl; a .json file holding a JSON array is read whole), CSV (.csv, .tsv) and Parquet
(.parquet, needs pyarrow). Records stream: a JSONL, CSV or Parquet file larger than memory is
read a line / a row group at a time. JSON lines are not decoded here: decoding runs next to
tokenization, in the worker processes.

Numbers: JSONL and JSON arrays give the line the record starts on; CSV the line its record starts
on (the header is line 1); Parquet the row number (1-based).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mft.utils.errors import MftError

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Record:
    line: int
    raw: str | None = None  # an undecoded JSON line (JSONL)
    row: Any = None  # an already decoded row (CSV, Parquet, JSON array)

    @property
    def is_raw(self) -> bool:
        return self.raw is not None


def file_type(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_TYPES:
        raise MftError(f"{path}: unknown data file type {suffix!r}; expected one of {', '.join(FILE_TYPES)}")
    return FILE_TYPES[suffix]


def iter_records(path: str | Path) -> Iterator[Record]:
    """Every row of a data file, in order (blank JSONL lines are skipped, not rows)."""
    path = Path(path)
    if not path.is_file():
        raise MftError(f"data file not found: {path}")
    kind = file_type(path)
    if kind == "json" and _first_char(path) != "[":
        kind = "jsonl"  # many .json files are JSON lines
    yield from {"jsonl": _jsonl, "json": _json_array, "csv": _csv, "tsv": _csv, "parquet": _parquet}[kind](path)


def _first_char(path: Path) -> str:
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield Record(lineno, raw=line)


def _json_array(path: Path) -> Iterator[Record]:
    """A JSON array read whole; each element keeps the line it starts on."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise MftError(f"{path}:{e.lineno}: invalid JSON array ({e.msg} at column {e.colno})") from None
        yield Record(line, row=value)
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            bad = text.count("\n", 0, pos) + 1
            raise MftError(f"{path}:{bad}: invalid JSON array (expected ',' or ']')")


def _csv(path: Path) -> Iterator[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # texts are long; the default limit is 128 KiB
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        start = reader.line_num + 1
        for values in reader:
            if values and any(v.strip() for v in values):
                if len(values) != len(header):
                    yield Record(start, row=_BadRow(f"{len(values)} fields, the header has {len(header)}"))
                else:
                    yield Record(start, row=dict(zip(header, values)))
            start = reader.line_num + 1


def _parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MftError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield Record(n, row=row)


class _BadRow:
    """A row the reader could already tell is broken (e.g. a CSV row with too many fields)."""

    def __init__(self, reason: str):
        self.reason = reason


def read_samples(paths, opts=None, max_reported: int = 10) -> list:
    """Read and validate every file into samples; raise one MftError listing the first bad rows.

    In-memory and single-process: for tests, tools and small files (training uses mft.data.store).
    """
    from mft.data.samples import RowError, RowOptions, parse_row

    opts = opts or RowOptions()
    errors, samples = [], []
    for path in paths:
        for rec in iter_records(path):
            source = f"{path}:{rec.line}"
            try:
                row = rec.row
                if rec.is_raw:
                    try:
                        row = json.loads(rec.raw)
                    except json.JSONDecodeError as e:
                        raise RowError("invalid_json", f"invalid JSON ({e.msg} at character {e.pos + 1})") from None
                elif isinstance(row, _BadRow):
                    raise RowError("bad_row", row.reason)
                samples.append(parse_row(row, source, opts))
            except RowError as e:
                errors.append(f"{source}: {e}")
    if errors:
        shown = "; ".join(errors[:max_reported])
        more = f" (first {max_reported} shown)" if len(errors) > max_reported else ""
        raise MftError(f"{len(errors)} invalid data row(s){more}: {shown}")
    return samples
