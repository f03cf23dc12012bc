"""Build the train and validation datasets from the data config: files -> stores -> packed batches.

Each data file becomes a TokenStore (tokenized once, cached on disk). A dataset is a list of
parts (a store and the documents of it that it uses) with optional weights; each epoch its
documents are ordered (mft.data.mixing), planned into sequences (mft.data.packing) and collated
into batches on demand. `BatchIterator` walks the batches epoch after epoch, for one rank of
`world_size`, and saves / restores its position exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from mft.data.batch import Batch
from mft.data.config import AlpacaStyle, DataConfig, DataFormat, OnError, data_config
from mft.data.mixing import draws_per_epoch, epoch_order
from mft.data.packing import (
    PackedSequence,
    PackPlan,
    PackStats,
    collate_plan,
    plan_packing,
)
from mft.data.samples import RowOptions
from mft.data.store import EncodeSettings, TokenStore, build_store, no_rows
from mft.data.tokenizer import Tokenizer
from mft.utils.errors import MftError

log = logging.getLogger(__name__)

# The held-out split ignores cfg.seed on purpose: runs that differ only in seed are then
# evaluated on the same samples.
SPLIT_SEED = 1234
MAX_REPORTED = 10
_SOURCE_KEYS = {"file", "path", "weight", "format", "text_column", "alpaca"}


@dataclass
class Part:
    """The documents of one store that a dataset uses (all of them, or one side of a held-out split)."""

    store: TokenStore
    indices: np.ndarray  # document indices into the store
    weight: float | None = None

    @property
    def name(self) -> str:
        return self.store.path


class PackedDataset:
    """Documents from one or more parts, ordered by weight per epoch and packed into seq_len positions."""

    def __init__(
        self,
        parts: Sequence[Part],
        seq_len: int,
        pad_id: int,
        too_long: str = "truncate",
        seed: int = 0,
        shuffle: bool = True,
        name: str = "data",
        skipped: int = 0,
        pack_buffer: int = 1,
    ):
        self.parts = list(parts)
        self.seq_len, self.pad_id, self.too_long, self.pack_buffer = seq_len, pad_id, too_long, pack_buffer
        self.seed, self.shuffle, self.name, self.skipped = seed, shuffle, name, skipped
        weights = [p.weight for p in self.parts]
        if any(w is not None for w in weights) and any(w is None for w in weights):
            raise MftError(f"{name} files: give every file a weight or none (got {weights})")
        self.weights = None if weights and weights[0] is None else [float(w) for w in weights]
        if not shuffle:
            self.weights = None  # evaluation reads every document once, in file order
        self.sizes = [len(p.indices) for p in self.parts]
        self._base = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        cat = lambda f: np.concatenate([f(p) for p in self.parts]) if self.parts else np.zeros(0, np.int64)  # noqa: E731
        self._lengths = cat(lambda p: np.diff(p.store.offsets)[p.indices])
        self._supervised = cat(lambda p: p.store.supervised[p.indices])
        self._is_text = cat(lambda p: p.store.is_text[p.indices]).astype(np.bool_)
        self._cache: tuple[int, np.ndarray, np.ndarray, PackPlan] | None = None
        self.stats: PackStats = self.plan(0).stats

    # ------------------------------------------------------------ epochs

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, PackPlan]:
        if not self.shuffle:
            epoch = 0
        if self._cache is None or self._cache[0] != epoch:
            src, loc = epoch_order(self.sizes, self.weights, self.seed, epoch, self.shuffle)
            flat = self._base[src] + loc
            stores = [p.store for p in self.parts]
            docs = [p.indices for p in self.parts]

            def mask_of(k: int) -> np.ndarray:
                return stores[src[k]].doc(int(docs[src[k]][loc[k]]))[1]

            plan = plan_packing(self._lengths[flat], self._supervised[flat], self._is_text[flat],
                                self.seq_len, self.too_long, mask_of, self.pack_buffer)
            self._cache = (epoch, src, loc, plan)
        return self._cache[1], self._cache[2], self._cache[3]

    def plan(self, epoch: int = 0) -> PackPlan:
        return self._epoch(epoch)[2]

    def num_batches(self, batch_size: int, epoch: int = 0) -> int:
        return math.ceil(self.plan(epoch).num_sequences / batch_size)

    def batch(self, index: int, batch_size: int, epoch: int = 0) -> Batch:
        """Batch `index` of the epoch: sequences [index * batch_size, (index + 1) * batch_size)."""
        src, loc, plan = self._epoch(epoch)
        first = index * batch_size
        last = min(first + batch_size, plan.num_sequences)
        if not 0 <= first < last:
            raise IndexError(f"batch {index} of an epoch with {plan.num_sequences} sequences")
        stores = [p.store for p in self.parts]
        docs = [p.indices for p in self.parts]

        def fetch(k: int) -> tuple[np.ndarray, np.ndarray]:
            return stores[src[k]].doc(int(docs[src[k]][loc[k]]))

        return collate_plan(plan, first, last, fetch, self.pad_id)

    def batches(self, batch_size: int, epoch: int = 0) -> Iterator[Batch]:
        """Batches of batch_size sequences; the last one may be smaller (nothing is dropped)."""
        _check_batch_size(batch_size)
        for i in range(self.num_batches(batch_size, epoch)):
            yield self.batch(i, batch_size, epoch)

    def iterator(self, batch_size: int, rank: int = 0, world_size: int = 1) -> BatchIterator:
        return BatchIterator(self, batch_size, rank, world_size)

    def sequences(self, epoch: int = 0) -> list[PackedSequence]:
        """The packed sequences of one epoch as lists (for tests and inspection; small data only)."""
        out = []
        for i in range(self.plan(epoch).num_sequences):
            b = self.batch(i, 1, epoch)
            lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
            out.append(PackedSequence(b.tokens.tolist(), b.targets.tolist(), b.loss_mask.tolist(), b.positions.tolist(), lens))
        return out

    def __len__(self) -> int:
        """Packed sequences in epoch 0; a reshuffled epoch may pack into a few more or fewer."""
        return self.stats.sequences

    # ------------------------------------------------------------ reporting

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def sources(self) -> list[str]:
        """"path:line" of every document, in file order."""
        return [p.store.source(int(i)) for p in self.parts for i in p.indices]

    def fingerprint(self, split_before_fill: bool = False) -> str:
        """Identifies the data and the packing: a saved iterator state only fits the same one."""
        h = hashlib.sha256()
        # pack_buffer=1 (greedy) hashes as before it existed, so a run saved then resumes with it;
        # "split" hashes as "split-fill" since it fills sequences with pieces of chats that fit
        # (`split_before_fill`: the fingerprint the same settings had before, to say why they differ).
        too_long = "split-fill" if self.too_long == "split" and not split_before_fill else self.too_long
        settings = [self.seq_len, too_long, self.seed, self.weights] + ([self.pack_buffer] if self.pack_buffer != 1 else [])
        h.update(json.dumps(settings).encode())
        for p in self.parts:
            h.update(str(p.store.meta.get("key") or (p.store.path, p.store.num_tokens)).encode())
            h.update(np.ascontiguousarray(p.indices).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        """One line for the log: samples, sequences, the padding share of their positions, what was cut."""
        s = self.stats
        positions = s.tokens + s.padding
        per_epoch = draws_per_epoch(self.sizes, self.weights)
        mix = ""
        if len(self.parts) > 1:
            total = max(1, sum(per_epoch))
            mix = " [" + ", ".join(f"{Path(p.name).name} {c / total:.0%}" for p, c in zip(self.parts, per_epoch)) + "]"
        return (
            f"{self.name}: {sum(per_epoch)} samples{mix} -> {s.sequences} sequences of {self.seq_len} tokens, "
            f"padding {s.padding / max(positions, 1):.1%} of positions; {s.tokens} tokens of data "
            f"({s.supervised / max(s.tokens, 1):.0%} supervised); truncated {s.truncated}, dropped {s.dropped}, "
            f"split {s.split}, unsupervised {s.unsupervised}, skipped invalid rows {self.skipped}"
        )

    def report(self) -> dict[str, Any]:
        """Packing stats of epoch 0 plus what was read: for the run summary."""
        per_epoch = draws_per_epoch(self.sizes, self.weights)
        return {
            **asdict(self.stats),
            "skipped_rows": self.skipped,
            "sources": [
                {"file": p.name, "weight": p.weight, "samples": len(p.indices), "per_epoch": c,
                 "skipped_rows": len(p.store.errors)}
                for p, c in zip(self.parts, per_epoch)
            ],
        }


class BatchIterator:
    """Endless batches of one rank: epoch after epoch, reshuffled each epoch.

    Rank r of world_size takes batches r, r + world_size, ... of every epoch, so the ranks
    partition the batches. The state is (epoch, batches this rank took in it): the order of an
    epoch is a pure function of the data seed, so restoring it replays exactly.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, rank: int = 0, world_size: int = 1):
        _check_batch_size(batch_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.epoch, self.position = 0, 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        while True:
            index = self.position * self.world_size + self.rank
            if index < self.dataset.num_batches(self.batch_size, self.epoch):
                break
            if self.position == 0:
                raise MftError(
                    f"{self.dataset.name}: epoch {self.epoch} packs into fewer batches of {self.batch_size} "
                    f"sequences than there are ranks ({self.world_size}); lower batch_size or add data"
                )
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.dataset.batch(index, self.batch_size, self.epoch)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: save it with a checkpoint, give it to load_state_dict."""
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "world_size": self.world_size, "seed": self.dataset.seed, "fingerprint": self.dataset.fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.dataset.too_long == "split" and state.get("fingerprint") == self.dataset.fingerprint(True):
            raise MftError(
                "the saved data position was planned by the data.too_long=split packing of an older mft, which "
                "did not cut chats to fill sequences; the packing now differs, so that position cannot be "
                "mapped onto it: start the run again (or resume it with the mft version that saved it)"
            )
        if state.get("fingerprint") != self.dataset.fingerprint() or state.get("batch_size") != self.batch_size:
            raise MftError(
                "the saved data position belongs to other data or settings (files, seq_len, too_long, pack_buffer, seed, "
                "weights or batch_size changed); resume with the same data config"
            )
        epoch, position, saved_world = state.get("epoch"), state.get("position"), state.get("world_size", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, position, saved_world)) \
                or epoch < 0 or position < 0 or saved_world < 1:
            raise MftError(f"the saved data position {dict(state)} is not a valid one (epoch, position and "
                           "world_size must be whole numbers >= 0)")
        if saved_world != self.world_size:
            # Ranks move in lockstep: position * world_size batches of the epoch were consumed.
            position = position * saved_world // self.world_size
        batches = self.dataset.num_batches(self.batch_size, epoch)
        if position * self.world_size > batches:
            raise MftError(f"the saved data position (batch {position} of epoch {epoch}) lies past the epoch's "
                           f"{batches} batches; resume with the same data config")
        self.epoch, self.position = epoch, position


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise MftError(f"batch_size={batch_size}: expected a positive number of sequences")


# ---------------------------------------------------------------- config -> datasets


@dataclass(frozen=True)
class SourceSpec:
    file: str
    weight: float | None
    settings: EncodeSettings


def _choice(enum: type[Enum], value: Any, what: str) -> Enum:
    """A per-file option (file entries are free-form, so Hydra does not type them)."""
    try:
        return enum(value)
    except ValueError:
        raise MftError(f"{what}={value!r}: expected one of {', '.join(c.value for c in enum)}") from None


def source_specs(value: Any, key: str, cfg: DataConfig, tokenizer_version: str) -> list[SourceSpec]:
    """data.<key>: paths, or mappings {file, weight, format, text_column, alpaca} (per-file options)."""
    entries = [value] if isinstance(value, (str, Mapping)) else list(value or [])
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"file": entry}
        if not isinstance(entry, Mapping):
            raise MftError(f"data.{key}: expected a path or {{file: ..., weight: ...}}, got {entry!r}")
        entry = dict(entry)
        if extra := sorted(set(entry) - _SOURCE_KEYS):
            raise MftError(f"data.{key}: unknown key(s) {extra} in {entry}; allowed: file, weight, format, text_column, alpaca")
        file = entry.get("file", entry.get("path"))
        if not file:
            raise MftError(f"data.{key}: entry {entry} has no 'file'")
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise MftError(f"data.{key}: weight {weight!r} of {file}: expected a non-negative number")
        fmt = _choice(DataFormat, entry.get("format", cfg.format), f"data.{key} {file}: format")
        alpaca = _choice(AlpacaStyle, entry.get("alpaca", cfg.alpaca), f"data.{key} {file}: alpaca")
        row = RowOptions(format=fmt.value, text_column=str(entry.get("text_column", cfg.text_column)),
                         alpaca=alpaca.value, tokenizer_version=tokenizer_version)
        specs.append(SourceSpec(str(file), None if weight is None else float(weight),
                                EncodeSettings(row, cfg.control_tokens.value)))
    return specs


def split_holdout(n: int, fraction: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Hold out round(fraction * n) documents (at least 1), chosen by a fixed seed; keep order."""
    n_valid = max(1, round(fraction * n))
    if n_valid >= n:
        raise MftError(
            f"valid_fraction={fraction} of {n} training samples in {name} leaves nothing to train on; "
            "lower it or give valid_files"
        )
    held = np.zeros(n, dtype=np.bool_)
    held[np.random.default_rng([SPLIT_SEED, zlib.crc32(Path(name).name.encode())]).permutation(n)[:n_valid]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def load_stores(specs: Sequence[SourceSpec], tokenizer: Tokenizer, cache_dir: str | None, workers: int | None) -> list[TokenStore]:
    missing = [s.file for s in specs if not Path(s.file).is_file()]
    if missing:
        raise MftError(f"data file not found: {', '.join(missing)} (relative paths start at {Path.cwd()})")
    built: dict[tuple, TokenStore] = {}
    stores = []
    for s in specs:
        key = (str(Path(s.file).resolve()), s.settings)
        if key not in built:
            built[key] = _build_or_fallback(s, tokenizer, cache_dir, workers)
        stores.append(built[key])
    return stores


def _build_or_fallback(spec: SourceSpec, tokenizer: Tokenizer, cache_dir: str | None, workers: int | None) -> TokenStore:
    if cache_dir:
        try:
            return build_store(spec.file, tokenizer, spec.settings, cache_dir, workers)
        except OSError as e:
            log.warning("data cache %s unusable (%s); tokenizing %s in memory", cache_dir, e, spec.file)
    return build_store(spec.file, tokenizer, spec.settings, None, workers)


def report_problems(stores: Sequence[TokenStore], on_error: OnError, what: str) -> int:
    """Raise on bad rows (on_error=raise) or log every one (skip); warn about control strings.
    Returns the number of skipped rows."""
    seen, errors = set(), []
    for st in stores:
        if id(st) in seen:
            continue
        seen.add(id(st))
        errors += [f"{st.path}:{line}: {message}" for line, _, message in st.errors]
        m = st.meta
        if m.get("control_rows"):
            mode = m["settings"]["control"]
            counts = ", ".join(f"{s} x{n}" for s, n in sorted(m["control_counts"].items()))
            lines = ", ".join(f"{st.path}:{n}" for n in m["control_lines"])
            if mode == "map":
                log.info("%s: %d samples hold literal control strings (%s), mapped to control tokens in text samples",
                         st.path, m["control_rows"], counts)
            else:
                log.warning(
                    "%s: %d samples hold literal control strings (%s), tokenized as plain text, e.g. at %s; "
                    "set data.control_tokens=map to turn them into control tokens in text samples",
                    st.path, m["control_rows"], counts, lines)
    if errors and on_error == OnError["raise"]:
        shown = "; ".join(errors[:MAX_REPORTED])
        more = f" (first {MAX_REPORTED} shown)" if len(errors) > MAX_REPORTED else ""
        raise MftError(
            f"{len(errors)} invalid data row(s) in {what}{more}: {shown}. "
            "Check the files with mft-validate-data (--fix writes a repaired copy), or set data.on_error=skip."
        )
    for e in errors:
        log.warning("skipped %s", e)
    if errors:
        log.warning("%s: skipped %d invalid row(s) (data.on_error=skip)", what, len(errors))
    return len(errors)


def build_datasets(
    cfg: DataConfig | Mapping[str, Any], tokenizer: Tokenizer, cache_dir: str | None = ..., workers: int | None = ...
) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, valid) from the data config (mft/data/config.py: every key and its default); a plain
    mapping is typed into a DataConfig first. cache_dir and workers, when given, override the config's."""
    cfg = data_config(cfg)
    seq_len, too_long, seed, fraction, on_error = cfg.seq_len, cfg.too_long.value, cfg.seed, cfg.valid_fraction, cfg.on_error
    cache_dir = cfg.cache_dir if cache_dir is ... else cache_dir
    workers = cfg.num_workers if workers is ... else workers
    train_specs = source_specs(cfg.train_files, "train_files", cfg, tokenizer.version)
    valid_specs = source_specs(cfg.valid_files, "valid_files", cfg, tokenizer.version)
    if not train_specs:
        raise MftError("data config: 'train_files' is empty; expected at least one data file")
    if not 0.0 <= fraction < 1.0:
        raise MftError(f"data config: valid_fraction={fraction}; expected 0 <= valid_fraction < 1")
    if seq_len < 2:
        raise MftError(f"data config: seq_len={seq_len}; expected at least 2")
    if cfg.pack_buffer < 1:
        raise MftError(f"data config: pack_buffer={cfg.pack_buffer}; expected at least 1 (1: greedy packing in order)")

    train_stores = load_stores(train_specs, tokenizer, cache_dir, workers)
    valid_stores = load_stores(valid_specs, tokenizer, cache_dir, workers)
    for st in train_stores + valid_stores:
        if problem := no_rows(st):
            raise MftError(f"{st.path}: {problem}; every data file needs at least one sample")
    skipped_train = report_problems(train_stores, on_error, "train_files")
    skipped_valid = report_problems(valid_stores, on_error, "valid_files") if valid_stores else 0
    for spec, st in zip(train_specs, train_stores):
        if len(st) == 0:
            raise MftError(f"data config: no usable samples in {spec.file} ({st.meta['rows']} rows read)")

    train_parts, valid_parts = [], []
    for spec, st in zip(train_specs, train_stores):
        everything = np.arange(len(st), dtype=np.int64)
        if fraction > 0 and not valid_specs:
            keep, held = split_holdout(len(st), fraction, spec.file)
            train_parts.append(Part(st, keep, spec.weight))
            valid_parts.append(Part(st, held))
        else:
            train_parts.append(Part(st, everything, spec.weight))
    valid_parts += [Part(st, np.arange(len(st), dtype=np.int64)) for st in valid_stores]

    train = PackedDataset(train_parts, seq_len, tokenizer.eos_id, too_long, seed, True, "train", skipped_train,
                          cfg.pack_buffer)
    if train.stats.sequences == 0:
        raise MftError(f"data config: no training sequence left after packing ({train.summary()})")
    valid = None
    if valid_parts and sum(len(p.indices) for p in valid_parts):
        valid = PackedDataset(valid_parts, seq_len, tokenizer.eos_id, too_long, seed, False, "valid", skipped_valid,
                              cfg.pack_buffer)
    return train, valid
