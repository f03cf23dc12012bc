"""Build the train and validation datasets from the data config: files -> samples -> packed batches.

In-memory first cut: every sample is tokenized once up front; packing is cheap and is redone
per epoch after shuffling the samples, so each epoch sees different neighbours.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mft.data.batch import Batch
from mft.data.encode import Encoded, encode_sample
from mft.data.packing import TOO_LONG, PackedSequence, PackStats, collate, pack
from mft.data.samples import Sample, read_samples
from mft.data.tokenizer import Tokenizer
from mft.errors import MftError

# The held-out split ignores cfg.seed on purpose: runs that differ only in seed are then
# evaluated on the same samples.
SPLIT_SEED = 1234


class PackedDataset:
    """Encoded documents, packed into sequences of seq_len positions each epoch."""

    def __init__(
        self,
        docs: Sequence[Encoded],
        seq_len: int,
        pad_id: int,
        too_long: str = "truncate",
        seed: int = 0,
        shuffle: bool = True,
        name: str = "data",
    ):
        self.docs = list(docs)
        self.seq_len, self.pad_id, self.too_long = seq_len, pad_id, too_long
        self.seed, self.shuffle, self.name = seed, shuffle, name
        self._cache: tuple[int, list[PackedSequence]] | None = None
        self.stats: PackStats = self._pack(0)[1]

    def _pack(self, epoch: int) -> tuple[list[PackedSequence], PackStats]:
        docs = self.docs
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(docs))
            docs = [docs[i] for i in order]
        return pack(docs, self.seq_len, self.pad_id, self.too_long)

    def sequences(self, epoch: int = 0) -> list[PackedSequence]:
        """The packed sequences of one epoch (deterministic in seed and epoch)."""
        if not self.shuffle:
            epoch = 0
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._pack(epoch)[0])
        return self._cache[1]

    def __len__(self) -> int:
        """Packed sequences in epoch 0; a reshuffled epoch may pack into a few more or fewer."""
        return self.stats.sequences

    def batches(self, batch_size: int, epoch: int = 0) -> Iterator[Batch]:
        """Batches of batch_size sequences; the last one may be smaller (nothing is dropped)."""
        if batch_size < 1:
            raise MftError(f"batch_size={batch_size}: expected a positive number of sequences")
        seqs = self.sequences(epoch)
        for i in range(0, len(seqs), batch_size):
            yield collate(seqs[i : i + batch_size])

    def summary(self) -> str:
        s = self.stats
        real = s.tokens + s.padding
        return (
            f"{self.name}: {s.samples} samples -> {s.sequences} sequences of {self.seq_len} tokens; "
            f"{s.tokens} tokens ({s.supervised / max(s.tokens, 1):.0%} supervised, "
            f"{s.padding / max(real, 1):.1%} padding); truncated {s.truncated}, dropped {s.dropped}, "
            f"split {s.split}, unsupervised {s.unsupervised}"
        )


def split_holdout(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Hold out round(fraction * n) samples (at least 1), chosen by a fixed seed; keep order."""
    n = len(samples)
    n_valid = max(1, round(fraction * n))
    if n_valid >= n:
        raise MftError(
            f"valid_fraction={fraction} of {n} training samples leaves nothing to train on; "
            "lower it or give valid_files"
        )
    held = set(np.random.default_rng(SPLIT_SEED).permutation(n)[:n_valid].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    valid = [s for i, s in enumerate(samples) if i in held]
    return train, valid


def _option(cfg: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is ...:
        raise MftError(f"data config: missing key '{key}'")
    return default


def _paths(value: Any) -> list[str]:
    """A list of file paths; a single path string is accepted too."""
    return [value] if isinstance(value, str) else [str(v) for v in value]


def build_datasets(cfg: Mapping[str, Any], tokenizer: Tokenizer) -> tuple[PackedDataset, PackedDataset | None]:
    """(train, valid) from cfg keys train_files, valid_files, valid_fraction, seq_len, too_long, seed."""
    train_files = _paths(_option(cfg, "train_files"))
    valid_files = _paths(_option(cfg, "valid_files", []))
    fraction = float(_option(cfg, "valid_fraction", 0.0))
    seq_len = int(_option(cfg, "seq_len"))
    too_long = str(_option(cfg, "too_long", "truncate"))
    seed = int(_option(cfg, "seed", 0))
    if not train_files:
        raise MftError("data config: 'train_files' is empty; expected at least one JSONL file")
    if not 0.0 <= fraction < 1.0:
        raise MftError(f"data config: valid_fraction={fraction}; expected 0 <= valid_fraction < 1")
    if seq_len < 2:
        raise MftError(f"data config: seq_len={seq_len}; expected at least 2")
    if too_long not in TOO_LONG:
        raise MftError(f"data config: too_long={too_long!r}; expected one of {', '.join(TOO_LONG)}")

    for key, paths in (("train_files", train_files), ("valid_files", valid_files)):
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise MftError(f"data.{key}: file not found: {', '.join(missing)} (relative paths start at {Path.cwd()})")
    train_samples = read_samples(train_files)
    if not train_samples:
        raise MftError(f"data config: no samples in train_files {train_files}")
    valid_samples: list[Sample] | None = None
    if valid_files:
        valid_samples = read_samples(valid_files)
    elif fraction > 0:
        train_samples, valid_samples = split_holdout(train_samples, fraction)

    def build(samples: list[Sample], name: str, shuffle: bool) -> PackedDataset:
        docs = [encode_sample(s, tokenizer) for s in samples]
        return PackedDataset(docs, seq_len, tokenizer.eos_id, too_long, seed, shuffle, name)

    train = build(train_samples, "train", shuffle=True)
    if train.stats.sequences == 0:
        raise MftError(f"data config: no training sequence left after packing ({train.summary()})")
    valid = build(valid_samples, "valid", shuffle=False) if valid_samples else None
    return train, valid
