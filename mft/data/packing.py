"""Pack encoded documents into fixed-length sequences, and collate sequences into a Batch.

A document of L ids gives L-1 positions: inputs ids[:-1], targets ids[1:], mask[1:]. Documents
are placed greedily in the order given; one that does not fit in what is left of a sequence
starts the next one, and the left-over tail becomes a padding document of its own (pad id,
never supervised), so every sequence has exactly seq_len positions and no real document ever
attends to padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch

from mft.data.batch import Batch
from mft.data.encode import Encoded
from mft.errors import MftError

TOO_LONG = ("truncate", "drop")


@dataclass
class PackStats:
    """What the packer did; every sample it was given is accounted for."""

    samples: int = 0  # documents given to the packer
    sequences: int = 0  # packed sequences emitted
    tokens: int = 0  # real (non-padding) input positions
    supervised: int = 0  # supervised targets
    padding: int = 0  # padding positions
    truncated: int = 0  # chats cut to seq_len + 1 ids
    dropped: int = 0  # chats longer than seq_len + 1 ids, dropped (too_long="drop")
    split: int = 0  # texts longer than seq_len + 1 ids, split into chunks
    unsupervised: int = 0  # documents skipped: no supervised target (e.g. truncated before the answer)

    def __add__(self, other: PackStats) -> PackStats:
        return PackStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass
class PackedSequence:
    """seq_len positions: real documents then (maybe) one padding document."""

    tokens: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    doc_lens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, ids: Sequence[int], mask: Sequence[bool]) -> None:
        n = len(ids) - 1
        self.tokens += ids[:-1]
        self.targets += ids[1:]
        self.loss_mask += mask[1:]
        self.positions += range(n)
        self.doc_lens.append(n)


def _fit(doc: Encoded, seq_len: int, too_long: str, stats: PackStats) -> Iterator[tuple[list, list]]:
    """Yield the (ids, mask) pieces of a document that fit in one sequence."""
    ids, mask = doc.ids, doc.mask
    if len(ids) <= seq_len + 1:
        yield ids, mask
    elif doc.is_text:
        # Chunks overlap by one id: the last target of a chunk is the first input of the next,
        # so every target of the text is trained on exactly once.
        stats.split += 1
        for start in range(0, len(ids) - 1, seq_len):
            yield ids[start : start + seq_len + 1], mask[start : start + seq_len + 1]
    elif too_long == "truncate":
        stats.truncated += 1
        yield ids[: seq_len + 1], mask[: seq_len + 1]
    else:
        stats.dropped += 1


def pack(
    docs: Iterable[Encoded], seq_len: int, pad_id: int, too_long: str = "truncate"
) -> tuple[list[PackedSequence], PackStats]:
    """Greedy packing in the given order; see the module docstring."""
    if too_long not in TOO_LONG:
        raise MftError(f"too_long={too_long!r}: expected one of {', '.join(TOO_LONG)}")
    if seq_len < 1:
        raise MftError(f"seq_len={seq_len}: expected a positive number of tokens")
    stats, out, current = PackStats(), [], PackedSequence()

    def close() -> None:
        pad = seq_len - len(current)
        if pad:
            current.add([pad_id] * (pad + 1), [False] * (pad + 1))
            stats.padding += pad
        out.append(current)

    for doc in docs:
        stats.samples += 1
        for ids, mask in _fit(doc, seq_len, too_long, stats):
            n_supervised = sum(mask[1:])
            if n_supervised == 0:  # nothing to learn from; never emit it
                stats.unsupervised += 1
                continue
            if len(ids) - 1 > seq_len - len(current):
                close()
                current = PackedSequence()
            current.add(ids, mask)
            stats.tokens += len(ids) - 1
            stats.supervised += n_supervised
    if len(current):
        close()
    stats.sequences = len(out)
    return out, stats


def collate(sequences: Sequence[PackedSequence]) -> Batch:
    """Concatenate packed sequences into one flat Batch; documents stay separate in cu_seqlens."""
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    doc_lens = [n for s in sequences for n in s.doc_lens]
    cu_seqlens = torch.zeros(len(doc_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(doc_lens, dtype=torch.int32), 0)

    def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([x for s in sequences for x in getattr(s, name)], dtype=dtype)

    return Batch(
        tokens=cat("tokens", torch.int64),
        targets=cat("targets", torch.int64),
        loss_mask=cat("loss_mask", torch.bool),
        positions=cat("positions", torch.int64),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(doc_lens),
    )
