"""The order of documents in an epoch, drawn from several sources by weight.

Source i holds n_i documents. An epoch draws N = sum(n_i) documents: c_i from source i, with
c_i = n_i when no weights are given (every document once per epoch) and c_i = round(N * w_i /
sum(w)) otherwise (like the Mistral API's training_files weights). Source i is read as an endless
stream of passes, each pass a fresh permutation of its documents, and epoch e takes positions
[e * c_i, (e + 1) * c_i) of that stream; the drawn documents are then interleaved by one more
permutation. Every permutation is seeded by (seed, epoch) or (seed, source, pass), so the order
of any epoch is a pure function of the seed: nothing but (epoch, position) needs saving to resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mft.utils.errors import MftError


def draws_per_epoch(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    if weights is None:
        return list(sizes)
    if len(weights) != len(sizes):
        raise ValueError("one weight per source")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MftError(f"data weights {list(weights)}: expected non-negative numbers, at least one positive")
    total, wsum = sum(sizes), float(sum(weights))
    return [0 if w == 0 or n == 0 else max(1, round(total * w / wsum)) for n, w in zip(sizes, weights)]


def epoch_order(
    sizes: Sequence[int], weights: Sequence[float] | None, seed: int, epoch: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(source index, document index) of every document of epoch `epoch`, in training order."""
    counts = draws_per_epoch(sizes, weights)
    src_parts, doc_parts = [], []
    for i, (n, c) in enumerate(zip(sizes, counts)):
        if c == 0:
            continue
        stream = np.arange(epoch * c, (epoch + 1) * c, dtype=np.int64)
        passes, within = np.divmod(stream, n)
        docs = np.empty(c, dtype=np.int64)
        for p in np.unique(passes).tolist():
            sel = passes == p
            perm = np.random.default_rng([seed, 1, i, p]).permutation(n) if shuffle else np.arange(n)
            docs[sel] = perm[within[sel]]
        src_parts.append(np.full(c, i, dtype=np.int64))
        doc_parts.append(docs)
    if not src_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    src, doc = np.concatenate(src_parts), np.concatenate(doc_parts)
    if shuffle:
        order = np.random.default_rng([seed, 0, epoch]).permutation(len(src))
        src, doc = src[order], doc[order]
    return src, doc
