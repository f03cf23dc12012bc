"""Tokenize a data file once: a `TokenStore` of flat token ids and masks, cached on disk.

One store per (file content, tokenizer, encoding settings). The rows of a file are read in
order, decoded, validated, encoded (ids + supervision mask) in chunks, in worker processes when
the file is large, and appended to flat arrays:

    <cache_dir>/<key>/ids.bin     uint32 token ids of every document, back to back
    <cache_dir>/<key>/mask.bin    uint8 supervision flag of each id
    <cache_dir>/<key>/docs.npz    per document: offsets (n+1), line, supervised targets, is_text
    <cache_dir>/<key>/meta.json   the file, the settings, rows seen, every bad row (line: reason),
                                  literal control strings found

The key hashes the file's bytes, the tokenizer file's bytes and the settings, so an edited file,
another tokenizer or other options give a new entry and an unchanged one loads at once (memory
mapped: a store larger than RAM is fine). Entries appear atomically; concurrent builders (ranks
under torchrun) wait on a lock and the later ones load what the first wrote. Without a cache
dir the store is built in memory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from mft.data.encode import control_strings, encode_sample
from mft.data.readers import Record, columns, decode, file_type, iter_records
from mft.data.samples import RowError, RowOptions, column_problem, parse_row
from mft.data.tokenizer import Tokenizer, load_tokenizer
from mft.utils.atomic import atomic_dir
from mft.utils.errors import MftError

log = logging.getLogger(__name__)

STORE_VERSION = 3  # bump when the encoding, the row rules or the layout change: old entries are then ignored
CHUNK_ROWS = 256  # rows per unit of work
AUTO_WORKERS_MIN_BYTES = 16 << 20  # files smaller than this are tokenized in-process by default
MAX_CONTROL_EXAMPLES = 5


@dataclass(frozen=True)
class EncodeSettings:
    """Everything besides the file and the tokenizer that changes the tokens."""

    row: RowOptions = RowOptions()
    control: str = "warn"  # literal control strings in text: warn (plain text) | map (control tokens)

    def describe(self) -> dict:
        return {"row": dataclasses.asdict(self.row), "control": self.control}


@dataclass
class Chunk:
    """The encoded rows of one chunk (what a worker sends back)."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    lines: np.ndarray
    supervised: np.ndarray
    is_text: np.ndarray
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (line, code, message)
    control_rows: int = 0
    control_counts: dict[str, int] = field(default_factory=dict)
    control_lines: list[int] = field(default_factory=list)


def encode_records(records: Iterable[Record], path: str, tokenizer: Tokenizer, settings: EncodeSettings) -> Chunk:
    """Decode, validate and encode records; bad rows become (line, code, message) errors."""
    all_ids: list[int] = []
    all_mask: list[bool] = []
    lengths, lines, supervised, is_text = [], [], [], []
    errors: list[tuple[int, str, str]] = []
    control_rows, control_counts, control_lines = 0, {}, []
    for rec in records:
        try:
            sample = parse_row(decode(rec), f"{path}:{rec.line}", settings.row)
            literal = control_strings(sample, tokenizer)
            try:
                enc = encode_sample(sample, tokenizer, settings.control)
            except RowError:  # mft's own refusal (thinking without [THINK] tokens), already worded
                raise
            except Exception as e:  # noqa: BLE001 - mistral-common's own checks, as a row error
                raise RowError("cannot_encode", cannot_encode(e)) from None
        except RowError as e:
            errors.append((rec.line, e.code, str(e)))
            continue
        if literal:
            control_rows += 1
            for s in literal:
                control_counts[s] = control_counts.get(s, 0) + 1
            if len(control_lines) < MAX_CONTROL_EXAMPLES:
                control_lines.append(rec.line)
        all_ids += enc.ids
        all_mask += enc.mask
        lengths.append(len(enc.ids))
        lines.append(rec.line)
        supervised.append(enc.num_supervised)
        is_text.append(enc.is_text)
    return Chunk(
        ids=np.array(all_ids, dtype=np.uint32),
        mask=np.array(all_mask, dtype=np.bool_),
        lengths=np.array(lengths, dtype=np.int64),
        lines=np.array(lines, dtype=np.int64),
        supervised=np.array(supervised, dtype=np.int64),
        is_text=np.array(is_text, dtype=np.bool_),
        errors=errors,
        control_rows=control_rows,
        control_counts=control_counts,
        control_lines=control_lines,
    )


def no_rows(store: TokenStore) -> str | None:
    """Why a file gave no row at all (training and mft-validate-data both refuse it), or None."""
    if store.meta["rows"]:
        return None
    kind = file_type(store.path)
    return "no rows: the file " + {"csv": "is empty or has only a header", "tsv": "is empty or has only a header",
                                   "parquet": "has no rows"}.get(kind, "is empty or holds only blank lines")


def cannot_encode(e: Exception) -> str:
    """mistral-common's refusal of a sample as one line (pydantic's errors span several)."""
    return "mistral-common cannot encode this sample: " + " ".join(str(e).split())


@dataclass
class TokenStore:
    """One tokenized file: documents as slices of flat id and mask arrays."""

    path: str
    ids: np.ndarray  # uint32, every document back to back
    mask: np.ndarray  # bool, supervision flag per id
    offsets: np.ndarray  # int64 (n + 1): document i is ids[offsets[i]:offsets[i + 1]]
    lines: np.ndarray  # int64: the line (or row) each document came from
    supervised: np.ndarray  # int64: supervised targets per document
    is_text: np.ndarray  # bool: text documents continue across sequences; chats follow too_long
    meta: dict[str, Any]  # rows, errors, control strings, settings, key
    cached: bool = False  # loaded from the cache rather than tokenized now

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def errors(self) -> list[tuple[int, str, str]]:
        return [tuple(e) for e in self.meta["errors"]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    def source(self, i: int) -> str:
        return f"{self.path}:{int(self.lines[i])}"

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


# ---------------------------------------------------------------- building


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, path: str, settings: EncodeSettings) -> None:
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), path=path, settings=settings)


def _encode_in_worker(records: list[Record]) -> Chunk:
    return encode_records(records, _WORKER["path"], _WORKER["tokenizer"], _WORKER["settings"])


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded_chunks(path: str, tokenizer: Tokenizer, settings: EncodeSettings, workers: int) -> Iterator[Chunk]:
    """Chunks in file order; with workers, at most 2 per worker are in flight (bounded memory)."""
    chunks = _chunks(iter_records(path), CHUNK_ROWS)
    if workers <= 0:
        for chunk in chunks:
            yield encode_records(chunk, path, tokenizer, settings)
        return
    import multiprocessing

    # spawn: workers load their own tokenizer and never inherit CUDA or OpenMP state.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.path, path, settings)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Sink:
    """Where chunks go: appended to files (cache) or kept in memory."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "mask", "lengths", "lines", "supervised", "is_text")}
        self.files = {}
        if folder is not None:
            self.files = {k: open(folder / f"{k}.bin", "wb") for k in ("ids", "mask")}
        self.meta = {"rows": 0, "errors": [], "control_rows": 0, "control_counts": {}, "control_lines": []}

    def add(self, chunk: Chunk) -> None:
        for k in ("ids", "mask"):
            if self.folder is not None:
                self.files[k].write(getattr(chunk, k).astype(np.uint8 if k == "mask" else np.uint32).tobytes())
            else:
                self.parts[k].append(getattr(chunk, k))
        for k in ("lengths", "lines", "supervised", "is_text"):
            self.parts[k].append(getattr(chunk, k))
        m = self.meta
        m["rows"] += len(chunk.lines) + len(chunk.errors)
        m["errors"] += [list(e) for e in chunk.errors]
        m["control_rows"] += chunk.control_rows
        for s, n in chunk.control_counts.items():
            m["control_counts"][s] = m["control_counts"].get(s, 0) + n
        m["control_lines"] = (m["control_lines"] + chunk.control_lines)[:MAX_CONTROL_EXAMPLES]

    def docs(self) -> dict[str, np.ndarray]:
        def cat(k, dtype):
            return np.concatenate(self.parts[k]).astype(dtype) if self.parts[k] else np.zeros(0, dtype)

        lengths = cat("lengths", np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return {"offsets": offsets, "lines": cat("lines", np.int64), "supervised": cat("supervised", np.int64),
                "is_text": cat("is_text", np.bool_)}

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _resolve_workers(workers: int | None, path: str) -> int:
    if workers is None:  # auto: worth the start-up cost only for large files
        if os.path.getsize(path) < AUTO_WORKERS_MIN_BYTES:
            return 0
        return min(8, os.cpu_count() or 1)
    return max(0, workers)


def build_store(
    path: str | Path,
    tokenizer: Tokenizer,
    settings: EncodeSettings = EncodeSettings(),
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> TokenStore:
    """The TokenStore of a file: from the cache when it holds this exact file, tokenizer and
    settings, else tokenized now (and cached when cache_dir is given)."""
    path = str(path)
    if not Path(path).is_file():
        raise MftError(f"data file not found: {path} (relative paths start at {Path.cwd()})")
    if (header := columns(path)) is not None and (problem := column_problem(header, settings.row)):
        raise MftError(f"{path}: {problem}")
    n_workers = _resolve_workers(workers, path)
    if cache_dir is None:
        sink = _Sink(None)
        for chunk in _encoded_chunks(path, tokenizer, settings, n_workers):
            sink.add(chunk)
        docs = sink.docs()
        ids = np.concatenate(sink.parts["ids"]) if sink.parts["ids"] else np.zeros(0, np.uint32)
        mask = np.concatenate(sink.parts["mask"]) if sink.parts["mask"] else np.zeros(0, np.bool_)
        meta = {**sink.meta, "file": path, "settings": settings.describe(), "key": None}
        return TokenStore(path, ids, mask, docs["offsets"], docs["lines"], docs["supervised"], docs["is_text"], meta)

    cache_dir = Path(cache_dir).expanduser()
    key = cache_key(path, tokenizer, settings, cache_dir)
    entry = cache_dir / key
    if (entry / "meta.json").is_file():
        return _load(entry, path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this very entry
        if (entry / "meta.json").is_file():
            return _load(entry, path)
        log.info("tokenizing %s (%s workers) into the cache %s", path, n_workers or "no", entry)
        with atomic_dir(entry) as tmp:
            sink = _Sink(tmp)
            try:
                for chunk in _encoded_chunks(path, tokenizer, settings, n_workers):
                    sink.add(chunk)
            finally:
                sink.close()
            np.savez(tmp / "docs.npz", **sink.docs())
            meta = {**sink.meta, "file": str(Path(path).resolve()), "settings": settings.describe(), "key": key,
                    "tokenizer": tokenizer.path, "version": STORE_VERSION}
            (tmp / "meta.json").write_text(json.dumps(meta))
    store = _load(entry, path)
    store.cached = False
    return store


def _load(entry: Path, path: str) -> TokenStore:
    meta = json.loads((entry / "meta.json").read_text())
    with np.load(entry / "docs.npz") as docs:
        offsets, lines, supervised, is_text = (docs[k] for k in ("offsets", "lines", "supervised", "is_text"))
    n = int(offsets[-1])
    ids = np.memmap(entry / "ids.bin", dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
    mask = np.memmap(entry / "mask.bin", dtype=np.bool_, mode="r", shape=(n,)) if n else np.zeros(0, np.bool_)
    return TokenStore(path, ids, mask, offsets, lines, supervised, is_text, meta, cached=True)


# ---------------------------------------------------------------- keys


def cache_key(path: str, tokenizer: Tokenizer, settings: EncodeSettings, cache_dir: Path) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": STORE_VERSION, "settings": settings.describe()}, sort_keys=True).encode())
    h.update(file_digest(tokenizer.path).encode())
    h.update(content_digest(path, cache_dir).encode())
    return h.hexdigest()[:32]


@lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    st = os.stat(path)
    return _digest_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def content_digest(path: str, cache_dir: Path) -> str:
    """sha256 of the file's bytes; remembered per (path, size, mtime) so an unchanged large file
    is not read again on the next run."""
    resolved = Path(path).resolve()
    st = os.stat(resolved)
    stat_key = hashlib.sha256(f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir / "stat" / stat_key
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_digest(resolved)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache still works, it just hashes again next time
    return digest
