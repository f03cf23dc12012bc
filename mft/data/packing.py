"""Pack documents into sequences of seq_len positions, and collate sequences into a Batch.

A document of L ids gives L-1 positions: inputs ids[:-1], targets ids[1:], mask[1:]. Documents
are taken in the order given, with up to `buffer` sequences open at once (data.pack_buffer);
each placed piece is a document of its own in cu_seqlens (positions restart at 0, attention
never crosses it):

- A chat that fits a sequence goes into the open sequence it fills best (best fit: the least
  room that holds it); when none has room it opens a new one, closing the fullest first when
  `buffer` are open. A closed sequence's left-over tail becomes a padding document (pad id,
  never supervised). buffer=1 is greedy packing in order.
- A text document fills what is left of the newest open sequence and continues into new ones: no padding, and
  the chunks overlap by one id (the last target of a chunk is the first input of the next), so
  every target is trained on exactly once.
- A chat longer than seq_len follows too_long: "truncate" keeps its first seq_len positions,
  "drop" skips it, "split" continues it like a text. Each case is counted.
- A piece with no supervised target is never placed (counted as unsupervised), so no emitted
  sequence is without a supervised token.

Planning looks only at lengths and supervised counts (cheap, so an epoch is planned up front and
a resumed run can jump to any batch); the ids are read when a batch is collated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from mft.data.batch import Batch
from mft.data.encode import Encoded
from mft.utils.errors import MftError

TOO_LONG = ("truncate", "drop", "split")
# What became of each document (PackPlan.fate): mft-validate-data reports these very values, so its
# verdict on a row is what training does with it.
PACKED, TRUNCATED, DROPPED, SPLIT, UNSUPERVISED = range(5)


@dataclass
class PackStats:
    """What the packer did; every document it was given is accounted for."""

    samples: int = 0  # documents given to the packer
    sequences: int = 0  # packed sequences emitted
    tokens: int = 0  # real (non-padding) input positions
    supervised: int = 0  # supervised targets
    padding: int = 0  # padding positions
    truncated: int = 0  # chats cut to seq_len positions (too_long="truncate")
    dropped: int = 0  # chats longer than seq_len positions, dropped (too_long="drop")
    split: int = 0  # documents continued across sequences (texts; chats with too_long="split")
    unsupervised: int = 0  # documents (or pieces of split ones) skipped: no supervised target

    def __add__(self, other: PackStats) -> PackStats:
        return PackStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass
class PackPlan:
    """Where every piece goes. Piece j is ids[start[j]:end[j]] of document doc[j] (doc -1 is
    padding of end[j] - start[j] - 1 positions); sequence i holds pieces seq[i]:seq[i + 1].
    fate[k] is what became of document k: PACKED, TRUNCATED, DROPPED, SPLIT or UNSUPERVISED."""

    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    seq: np.ndarray
    stats: PackStats
    fate: np.ndarray

    @property
    def num_sequences(self) -> int:
        return len(self.seq) - 1


def check_too_long(too_long: str) -> None:
    if too_long not in TOO_LONG:
        raise MftError(f"too_long={too_long!r}: expected one of {', '.join(TOO_LONG)}")


def plan_packing(
    lengths: Sequence[int],
    supervised: Sequence[int],
    is_text: Sequence[bool],
    seq_len: int,
    too_long: str,
    mask_of: Callable[[int], np.ndarray],
    buffer: int = 1,
) -> PackPlan:
    """Place documents 0..n-1 into sequences; mask_of(k) is read only for split/truncated chats.

    Up to `buffer` sequences stay open. A chat that fits goes into the open sequence it fills
    best (the least room that holds it: best fit); one that fits none opens a new sequence,
    first closing the fullest open one when `buffer` are open, or with too_long="split" fills the
    fullest open one and continues in the best fitting or a new one (so does a chat over seq_len).
    Texts fill the newest open sequence and continue in new ones. A sequence is emitted when it is closed (full,
    or pushed out); what is open at the end is emitted in the order it was opened. buffer=1 is the
    greedy placement in order (one sequence open at a time).
    """
    check_too_long(too_long)
    if seq_len < 1:
        raise MftError(f"seq_len={seq_len}: expected a positive number of tokens")
    if buffer < 1:
        raise MftError(f"pack_buffer={buffer}: expected a positive number of open sequences")
    stats = PackStats(samples=len(lengths))
    doc, start, end, seq = [], [], [], [0]
    fate = np.full(len(lengths), PACKED, dtype=np.int8)
    bins: list[_Bin] = []  # the open sequences, oldest first

    def emit(b: _Bin) -> None:
        bins.remove(b)
        if not b.pieces:
            return  # opened for pieces that turned out unsupervised: nothing to emit
        for k, a, e in b.pieces:
            doc.append(k), start.append(a), end.append(e)
        if b.room:
            doc.append(-1), start.append(0), end.append(b.room + 1)
            stats.padding += b.room
        seq.append(len(doc))

    def open_bin() -> _Bin:
        if len(bins) == buffer:
            emit(min(bins, key=lambda b: b.room))  # the fullest: the least left to gain
        bins.append(_Bin(seq_len))
        return bins[-1]

    def place(b: _Bin, k: int, a: int, e: int, n_sup: int) -> None:
        b.pieces.append((k, a, e))
        b.room -= e - a - 1
        stats.tokens += e - a - 1
        stats.supervised += n_sup
        if b.room == 0:
            emit(b)

    def newest_with_room() -> _Bin:
        return bins[-1] if bins else open_bin()

    def place_chat_pieces(k: int, n: int, mask: np.ndarray) -> int:
        """Chat k's n positions from the fullest open sequence its head can fill with something to
        learn on, each rest into the open sequence it fits best or a new one; a piece with nothing
        to learn is skipped. Returns pieces placed."""
        # A head of `room` positions has a target when room > the first supervised position: a gap
        # shorter than the prompt stays for a chat (or text) that can use it, not for a skipped piece.
        first_target = int(np.argmax(mask[1 : n + 1]))
        usable = [b for b in bins if b.room > first_target]
        b = min(usable, key=lambda b: b.room) if usable else open_bin()
        pos, pieces = 0, 0
        while pos < n:
            take = min(b.room, n - pos)
            n_sup = int(mask[pos + 1 : pos + take + 1].sum())
            if n_sup:
                place(b, k, pos, pos + take + 1, n_sup)
                pieces += 1
            else:
                stats.unsupervised += 1
            pos += take
            if pos < n:
                fitting = [c for c in bins if c.room >= n - pos]
                b = min(fitting, key=lambda c: c.room) if fitting else open_bin()
        return pieces

    lengths = lengths.tolist() if isinstance(lengths, np.ndarray) else lengths
    supervised = supervised.tolist() if isinstance(supervised, np.ndarray) else supervised
    is_text = is_text.tolist() if isinstance(is_text, np.ndarray) else is_text
    for k in range(len(lengths)):
        n, text = lengths[k] - 1, is_text[k]
        if n < 1 or supervised[k] == 0:
            stats.unsupervised += 1
            fate[k] = UNSUPERVISED
            continue
        if not text and n <= seq_len:  # a chat that fits a sequence: the best open one, or a new one
            fitting = [b for b in bins if b.room >= n]
            if fitting or too_long != "split" or not bins:
                place(min(fitting, key=lambda b: b.room) if fitting else open_bin(), k, 0, n + 1, supervised[k])
                continue
        if text:
            pos, pieces = 0, 0
            while pos < n:
                b = newest_with_room()
                take = min(b.room, n - pos)
                place(b, k, pos, pos + take + 1, take)
                pieces += 1
                pos += take
            stats.split += pieces > 1
            if pieces > 1:
                fate[k] = SPLIT
        elif too_long == "split":
            pieces = place_chat_pieces(k, n, np.asarray(mask_of(k)))
            stats.split += pieces > 1
            if pieces > 1 or n > seq_len:  # a chat over seq_len is cut into pieces, even if only one has an answer
                fate[k] = SPLIT
        elif too_long == "truncate":
            n_sup = int(np.asarray(mask_of(k))[1 : seq_len + 1].sum())
            stats.truncated += 1
            if n_sup == 0:  # nothing to learn from what truncation keeps: left out, like any unsupervised piece
                stats.unsupervised += 1
                fate[k] = UNSUPERVISED
                continue
            place(open_bin(), k, 0, seq_len + 1, n_sup)
            fate[k] = TRUNCATED
        else:
            stats.dropped += 1
            fate[k] = DROPPED
    while bins:
        emit(bins[0])
    stats.sequences = len(seq) - 1
    as_array = lambda x: np.array(x, dtype=np.int64)  # noqa: E731
    return PackPlan(as_array(doc), as_array(start), as_array(end), as_array(seq), stats, fate)


@dataclass
class _Bin:
    """An open sequence: its pieces (document, start, end) and the positions left."""

    room: int
    pieces: list[tuple[int, int, int]] = field(default_factory=list)


def collate_plan(
    plan: PackPlan, first: int, last: int, fetch: Callable[[int], tuple[np.ndarray, np.ndarray]], pad_id: int
) -> Batch:
    """Sequences first..last-1 of a plan as one flat Batch; fetch(k) gives document k's (ids, mask)."""
    a, b = int(plan.seq[first]), int(plan.seq[last])
    tokens, targets, masks = [], [], []
    doc_lens = (plan.end[a:b] - plan.start[a:b] - 1).astype(np.int64)
    for k, s, e in zip(plan.doc[a:b].tolist(), plan.start[a:b].tolist(), plan.end[a:b].tolist()):
        if k < 0:
            tokens.append(np.full(e - s - 1, pad_id, dtype=np.int64))
            targets.append(tokens[-1])
            masks.append(np.zeros(e - s - 1, dtype=np.bool_))
            continue
        ids, mask = fetch(k)
        tokens.append(ids[s : e - 1])
        targets.append(ids[s + 1 : e])
        masks.append(mask[s + 1 : e])
    total = int(doc_lens.sum())
    cu = np.zeros(len(doc_lens) + 1, dtype=np.int64)
    np.cumsum(doc_lens, out=cu[1:])
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], doc_lens)
    return Batch(
        tokens=torch.from_numpy(np.concatenate(tokens).astype(np.int64)),
        targets=torch.from_numpy(np.concatenate(targets).astype(np.int64)),
        loss_mask=torch.from_numpy(np.concatenate(masks).astype(np.bool_)),
        positions=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(doc_lens.max()),
        padding=int(doc_lens[plan.doc[a:b] < 0].sum()),
    )


# ---------------------------------------------------------------- list API (tests, tools)


@dataclass
class PackedSequence:
    """seq_len positions as Python lists: real documents then (maybe) one padding document."""

    tokens: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    doc_lens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def pack(
    docs: Iterable[Encoded], seq_len: int, pad_id: int, too_long: str = "truncate"
) -> tuple[list[PackedSequence], PackStats]:
    """Pack in-memory documents; the same plan as the datasets use, returned as lists."""
    docs = list(docs)
    check_too_long(too_long)
    plan = plan_packing(
        [len(d.ids) for d in docs], [d.num_supervised for d in docs], [d.is_text for d in docs],
        seq_len, too_long, lambda k: np.asarray(docs[k].mask),
    )
    fetch = lambda k: (np.asarray(docs[k].ids, dtype=np.int64), np.asarray(docs[k].mask, dtype=np.bool_))  # noqa: E731
    out = []
    for i in range(plan.num_sequences):
        b = collate_plan(plan, i, i + 1, fetch, pad_id)
        lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        out.append(PackedSequence(b.tokens.tolist(), b.targets.tolist(), b.loss_mask.tolist(), b.positions.tolist(), lens))
    return out, plan.stats


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
