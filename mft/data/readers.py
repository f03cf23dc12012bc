"""Data files -> records, one per row, each with the line (or row) number users see in errors.

JSONL (.jsonl; a .json file holding a JSON array is read whole), CSV (.csv, .tsv) and Parquet
(.parquet, needs pyarrow). Records stream: a JSONL, CSV or Parquet file larger than memory is
read a line / a row group at a time. JSON lines are not decoded here: decoding runs next to
tokenization, in the worker processes.

Numbers: JSONL and JSON arrays give the line the record starts on; CSV the line its record starts
on (the header is line 1); Parquet the row number (1-based).

Text files are UTF-8, with or without a BOM. Bytes that are not UTF-8 are kept (as lone
surrogates, Python's "surrogateescape") so that only their row is reported, by `decode`, which
also turns invalid JSON, duplicate keys, nesting deeper than MAX_DEPTH and lone surrogates from
JSON escapes into a RowError of that row.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mft.data.samples import RowError
from mft.utils.errors import MftError

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
# Deeper rows are refused: no real sample nests this far, and the code that walks rows (json,
# jsonschema, mistral-common) recurses, so a deeper one would end in a RecursionError.
MAX_DEPTH = 64
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: only these can decode to a lone surrogate


@dataclass(frozen=True)
class Record:
    line: int
    raw: str | None = None  # undecoded JSON text: a JSONL line, an element of a JSON array
    row: Any = None  # an already decoded row (CSV, Parquet)

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
    if kind != "parquet":
        with path.open("rb") as f:
            if f.read(2) in _UTF16_BOMS:
                raise MftError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte order mark); save it as UTF-8")
    if kind == "json" and _first_char(path) != "[":
        kind = "jsonl"  # many .json files are JSON lines
    yield from {"jsonl": _jsonl, "json": _json_array, "csv": _csv, "tsv": _csv, "parquet": _parquet}[kind](path)


def columns(path: str | Path) -> list[str] | None:
    """The columns of a table (CSV / TSV header, Parquet schema); None for JSON, whose rows differ."""
    path = Path(path)
    kind = file_type(path)
    if kind in ("csv", "tsv"):
        with _open_text(path, newline="") as f:
            try:
                rows = csv.reader(f, delimiter="\t" if kind == "tsv" else ",")
                header = next((row for row in rows if any(v.strip() for v in row)), None)
            except csv.Error:
                return None  # the reader reports it at its line
        return None if header is None else [h.strip() for h in header]
    if kind == "parquet":
        return list(_parquet_file(path).schema_arrow.names)
    return None


def _open_text(path: Path, newline: str = "\n"):
    """utf-8-sig drops a leading BOM (editors on Windows write one); bad bytes reach `decode`.
    Lines end at "\n" only, so line numbers are those of grep -n and sed (a stray "\r" splits nothing)."""
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _first_char(path: Path) -> str:
    with _open_text(path) as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return ""


def _jsonl(path: Path) -> Iterator[Record]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield Record(lineno, raw=line)


def _json_array(path: Path) -> Iterator[Record]:
    """A JSON array read whole; each element keeps the line it starts on."""
    with _open_text(path) as f:
        text = f.read()
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
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise MftError(f"{path}:{e.lineno}: invalid JSON array ({_json_problem(e)} column {e.colno})") from None
        except RecursionError:
            raise MftError(f"{path}:{line}: this element of the JSON array is nested too deeply to read") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise MftError(f"{path}:{line}: invalid JSON array ({_first_clause(e)})") from None
        yield Record(line, raw=text[pos:end])  # decoded again by `decode`, which checks keys and depth
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
    with _open_text(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next((row for row in reader if any(v.strip() for v in row)), None)  # blank lines first
            if header is None:
                return
            header = [h.strip() for h in header]
            if problem := _header_problem(header):
                raise MftError(f"{path}:{reader.line_num}: the header {problem}")
            start = reader.line_num + 1
            for values in reader:
                if values and any(v.strip() for v in values):
                    yield Record(start, row=_csv_row(header, values))
                start = reader.line_num + 1
        except csv.Error as e:  # e.g. a field over the size limit
            raise MftError(f"{path}:{reader.line_num}: not valid {path.suffix[1:].upper()}: {e}") from None


def _header_problem(header: list[str]) -> str | None:
    if bad := [h for h in header if _bad_utf8(h) is not None]:
        return f"is not valid UTF-8 (column {bad[0]!r}); save the file as UTF-8"
    if twice := sorted({h for h in header if header.count(h) > 1}):
        return f"names column(s) {twice} more than once; each column needs its own name"
    return None


def _csv_row(header: list[str], values: list[str]) -> Any:
    if len(values) != len(header):
        return _BadRow("bad_row", f"{len(values)} fields, the header has {len(header)}")
    for name, value in zip(header, values):
        if (at := _bad_utf8(value)) is not None:
            return _BadRow("bad_encoding", f"column {name!r} is not valid UTF-8 ({_bad_byte(value, at)}); "
                                           "save the file as UTF-8")
    return dict(zip(header, values))


def _parquet_file(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise MftError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise MftError(f"{path}: not a readable Parquet file ({e})") from None


def _parquet(path: Path) -> Iterator[Record]:
    n = 0
    for batch in _parquet_file(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield Record(n, row=row)


class _BadRow:
    """A row the reader could already tell is broken (e.g. a CSV row with too many fields)."""

    def __init__(self, code: str, reason: str):
        self.code, self.reason = code, reason


# ---------------------------------------------------------------- decoding


def decode(rec: Record) -> Any:
    """The row of a record, or RowError: invalid JSON, a key twice in one object, nesting deeper
    than MAX_DEPTH, bytes that are not UTF-8, lone surrogates (JSON escapes such as "\\ud800"),
    or what the reader already found wrong (a CSV row with too many fields)."""
    if isinstance(rec.row, _BadRow):
        raise RowError(rec.row.code, rec.row.reason)
    if not rec.is_raw:
        return rec.row  # CSV rows were checked by the reader; Parquet strings are UTF-8 by format
    text = rec.raw
    if (at := _bad_utf8(text)) is not None:
        raise RowError("bad_encoding", f"not valid UTF-8 ({_bad_byte(text, at)} at column {at + 1}); "
                                       "save the file as UTF-8")
    try:
        # Without its line break: a string left open then ends the line, not at the break.
        row = json.loads(text.rstrip("\r\n"), object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise RowError("invalid_json", f"invalid JSON ({_json_problem(e)} column {e.colno})") from None
    except RowError:  # a duplicate key
        raise
    except RecursionError:
        raise RowError("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise RowError("invalid_json", f"invalid JSON ({_first_clause(e)})") from None
    if _SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_DEPTH:
        _check_values(row)
    return row


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    row = dict(pairs)
    if len(row) < len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise RowError("duplicate_key", f"key {_short(twice)} appears twice in one object; "
                                        "JSON readers silently keep only the last one")
    return row


def _check_values(row: Any) -> None:
    """Depth and lone surrogates, walked without recursion (the row may be deep)."""
    stack = [(row, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise RowError("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels (at {_short(where)})")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, f"{where}.{k}" if where else k)
                stack.append((v, f"{where}.{k}" if where else k, depth + 1))
        elif isinstance(value, list):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, str):
            _check_text(value, where)


def _check_text(text: str, where: str) -> None:
    if (at := _bad_utf8(text)) is not None:
        raise RowError("lone_surrogate", f"{_short(where) if where else 'a string'} holds a lone surrogate "
                                         f"{text[at]!a} (half of a UTF-16 pair, from a JSON \\u escape); "
                                         "text must be valid Unicode")


def _bad_utf8(text: str) -> int | None:
    """Where a string holds a code point UTF-8 cannot encode (a surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _bad_byte(text: str, at: int) -> str:
    code = ord(text[at])
    return f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"{text[at]!a}"


def _json_problem(e: json.JSONDecodeError) -> str:
    """json's message, ready for " column N": some end in "at" already ("Unterminated string starting at")."""
    return e.msg if e.msg.endswith(" at") else f"{e.msg} at"


def _first_clause(e: ValueError) -> str:
    return str(e).split(":")[0]  # "Exceeds the limit (4300 digits) for integer string conversion"


def _short(value: Any, limit: int = 60) -> str:
    text = ascii(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def read_samples(paths, opts=None, max_reported: int = 10) -> list:
    """Read and validate every file into samples; raise one MftError listing the first bad rows.

    In-memory and single-process: for tests, tools and small files (training uses mft.data.store).
    """
    from mft.data.samples import RowOptions, parse_row

    opts = opts or RowOptions()
    errors, samples = [], []
    for path in paths:
        for rec in iter_records(path):
            source = f"{path}:{rec.line}"
            try:
                samples.append(parse_row(decode(rec), source, opts))
            except RowError as e:
                errors.append(f"{source}: {e}")
    if errors:
        shown = "; ".join(errors[:max_reported])
        more = f" (first {max_reported} shown)" if len(errors) > max_reported else ""
        raise MftError(f"{len(errors)} invalid data row(s){more}: {shown}")
    return samples
