"""Packing: every supervised target of every kept document exactly once per epoch, documents never
mix, and packed logits equal per-document logits."""

import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import build, tiny_args

from mft.data.batch import Batch
from mft.data.dataset import PackedDataset, Part
from mft.data.encode import Encoded
from mft.data.packing import pack
from mft.data.store import TokenStore

PAD = 0


def _random_docs(rng, n, max_len):
    """Documents whose ids say (doc, position), so every target can be traced back."""
    docs = []
    for d in range(n):
        length = rng.randint(1, max_len)
        ids = [(d + 1) * 10_000 + p for p in range(length)]
        is_text = rng.random() < 0.3
        mask = [False] + [True] * (length - 1) if is_text else [rng.random() < 0.4 for _ in range(length)]
        docs.append(Encoded(ids, mask, f"doc{d}", is_text=is_text))
    return docs


def _expected_targets(docs, seq_len, too_long):
    """The supervised targets that must appear exactly once, per the packing rules."""
    out = Counter()
    for doc in docs:
        ids, mask = doc.ids, doc.mask
        if len(ids) > seq_len + 1 and not doc.is_text:
            if too_long == "drop":
                continue
            if too_long == "truncate":
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        out.update(i for i, m in zip(ids[1:], mask[1:]) if m)
    return out


def _check_sequences(seqs, seq_len):
    for s in seqs:
        assert len(s) == seq_len and sum(s.doc_lens) == seq_len
        assert any(s.loss_mask), "a sequence without supervised tokens"
        start = 0
        for n in s.doc_lens:
            assert s.positions[start : start + n] == list(range(n))  # positions restart per document
            assert s.tokens[start + 1 : start + n] == s.targets[start : start + n - 1]  # one document
            docs = {t // 10_000 for t in s.tokens[start : start + n] + s.targets[start : start + n] if t != PAD}
            assert len(docs) <= 1, "two documents in one cu_seqlens segment"
            start += n
        for tok, tgt, m in zip(s.tokens, s.targets, s.loss_mask):
            if tok == PAD:
                assert tgt == PAD and not m  # padding is never supervised


@pytest.mark.parametrize("too_long", ["truncate", "drop", "split"])
@pytest.mark.parametrize("trial", range(12))
def test_every_supervised_target_once(trial, too_long):
    rng = random.Random(trial * 7 + len(too_long))
    seq_len = rng.randint(3, 40)
    docs = _random_docs(rng, rng.randint(1, 60), max_len=3 * seq_len)
    seqs, stats = pack(docs, seq_len, PAD, too_long)
    _check_sequences(seqs, seq_len)
    got = Counter(t for s in seqs for t, m in zip(s.targets, s.loss_mask) if m)
    assert got == _expected_targets(docs, seq_len, too_long)
    assert stats.supervised == sum(got.values())
    assert stats.sequences == len(seqs)
    assert stats.tokens + stats.padding == seq_len * len(seqs)
    long_chats = sum(len(d.ids) > seq_len + 1 and not d.is_text for d in docs)
    assert {"truncate": stats.truncated, "drop": stats.dropped, "split": long_chats}[too_long] == long_chats
    # Texts fill what is left of a sequence: padding only ever follows a chat that did not fit.
    if all(d.is_text for d in docs):
        assert stats.padding < seq_len


def test_texts_continue_into_the_next_sequence():
    text = Encoded(list(range(1, 12)), [False] + [True] * 10, is_text=True)  # 10 positions
    chat = Encoded([50, 51, 52], [False, False, True])  # 2 positions
    seqs, stats = pack([chat, text], 4, PAD)
    assert [s.doc_lens for s in seqs] == [[2, 2], [4], [4]]
    assert seqs[0].tokens == [50, 51, 1, 2] and seqs[1].tokens == [3, 4, 5, 6] and seqs[2].tokens == [7, 8, 9, 10]
    assert seqs[2].targets[-1] == 11 and stats.split == 1 and stats.padding == 0


def test_truncate_drop_split_and_unsupervised_are_counted():
    seq_len = 8
    long_chat = Encoded(list(range(1, 21)), [False] * 12 + [True] * 8)  # answer after position 9
    short_chat = Encoded([1, 2, 3, 4], [False, False, True, True])
    _, stats = pack([long_chat, short_chat], seq_len, PAD, "truncate")
    assert (stats.truncated, stats.unsupervised, stats.supervised) == (1, 1, 2)
    _, stats = pack([long_chat, short_chat], seq_len, PAD, "drop")
    assert (stats.truncated, stats.dropped, stats.unsupervised, stats.sequences) == (0, 1, 0, 1)
    seqs, stats = pack([long_chat, short_chat], seq_len, PAD, "split")
    assert (stats.split, stats.unsupervised, stats.supervised) == (1, 1, 8 + 2)  # the prompt-only piece is skipped
    assert all(any(s.loss_mask) for s in seqs)


def test_split_fills_every_sequence_with_chats_that_fit():
    """Chats of 0.5-0.95 x seq_len rarely pair up: truncate pads a third of the positions, split
    continues a chat's tail in the next sequence instead, keeping every supervised target once, and
    never cuts off a head with nothing to learn from."""
    rng = random.Random(3)
    seq_len = 100
    docs = [Encoded(ids, [False] * 3 + [True] * (len(ids) - 3))
            for ids in ([1000 * d + i for i in range(rng.randint(50, 95))] for d in range(1, 60))]
    _, padded = pack(docs, seq_len, PAD, "truncate")
    seqs, stats = pack(docs, seq_len, PAD, "split")
    assert padded.padding > 0.2 * seq_len * padded.sequences and padded.split == 0
    # Only gaps no head can learn from (up to the 2-position prompt) and the last sequence's end stay.
    assert stats.padding < seq_len + 2 * stats.sequences and stats.unsupervised == 0
    assert stats.split > 20 and stats.sequences < padded.sequences
    got = Counter(t for s in seqs for t, m in zip(s.targets, s.loss_mask) if m)
    assert got == _expected_targets(docs, seq_len, "split")
    _check_sequences(seqs, seq_len)


def _store(docs):
    ids = np.concatenate([np.asarray(d.ids, dtype=np.uint32) for d in docs])
    mask = np.concatenate([np.asarray(d.mask, dtype=np.bool_) for d in docs])
    offsets = np.concatenate([[0], np.cumsum([len(d.ids) for d in docs])]).astype(np.int64)
    return TokenStore("mem", ids, mask, offsets, np.arange(1, len(docs) + 1), np.array([d.num_supervised for d in docs]),
                      np.array([d.is_text for d in docs]), {"errors": [], "key": None})


def test_dataset_epochs_keep_every_supervised_target_once():
    rng = random.Random(5)
    docs = _random_docs(rng, 80, max_len=30)
    ds = PackedDataset([Part(_store(docs), np.arange(len(docs)))], 16, PAD, "split", seed=3)
    expected = _expected_targets(docs, 16, "split")
    orders = []
    for epoch in range(3):
        batches = list(ds.batches(batch_size=3, epoch=epoch))
        got = Counter(t for b in batches for t in b.targets[b.loss_mask].tolist())
        assert got == expected
        orders.append(torch.cat([b.tokens for b in batches]))
    assert not torch.equal(orders[0][:100], orders[1][:100])  # reshuffled


ARGS = tiny_args(dim=32, head_dim=8, hidden_dim=64, vocab_size=97, sliding_window=5)


def test_packed_logits_equal_per_document_logits():
    torch.manual_seed(0)
    model = build(ARGS, device="cpu", dtype=torch.float32).eval()
    rng = random.Random(1)
    docs = []
    for _ in range(9):
        n = rng.randint(2, 12)
        docs.append(Encoded([rng.randint(1, 96) for _ in range(n)], [False] + [True] * (n - 1)))
    seqs, _ = pack(docs, 16, PAD, "truncate")  # every doc fits: none is split
    with torch.no_grad():
        for s in seqs:
            t = lambda x: torch.tensor(x)  # noqa: E731
            cu = torch.tensor([0] + np.cumsum(s.doc_lens).tolist(), dtype=torch.int32)
            packed = model.output(model.hidden_states(t(s.tokens), t(s.positions), cu, max(s.doc_lens)))
            start = 0
            for n in s.doc_lens:
                alone = model.output(model.hidden_states(
                    t(s.tokens[start : start + n]), torch.arange(n), torch.tensor([0, n], dtype=torch.int32), n))
                torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-5, atol=1e-5)
                start += n


def test_collated_batch_is_a_batch():
    docs = [Encoded([5, 6, 7, 8], [False, True, True, True]), Encoded([9, 10, 11], [False, False, True])]
    ds = PackedDataset([Part(_store(docs), np.arange(2))], 5, PAD, shuffle=False)
    (batch,) = ds.batches(4)
    assert isinstance(batch, Batch) and batch.cu_seqlens.dtype == torch.int32
    assert batch.tokens.tolist() == [5, 6, 7, 9, 10] and batch.positions.tolist() == [0, 1, 2, 0, 1]


def test_batches_count_their_padding_positions():
    """Batch.padding is the packing padding of its sequences: what real_tokens_per_s leaves out."""
    from mft.data.encode import Encoded
    from mft.data.packing import collate_plan, plan_packing

    docs = [Encoded(ids=list(range(1, 11)), mask=[False] + [True] * 9), Encoded(ids=list(range(1, 8)), mask=[True] * 7),
            Encoded(ids=list(range(1, 5)), mask=[True] * 4)]
    plan = plan_packing([len(d.ids) for d in docs], [d.num_supervised for d in docs], [False] * 3, 12, "truncate",
                        lambda k: np.asarray(docs[k].mask))
    fetch = lambda k: (np.asarray(docs[k].ids), np.asarray(docs[k].mask))  # noqa: E731
    batch = collate_plan(plan, 0, plan.num_sequences, fetch, pad_id=0)
    assert batch.padding == plan.stats.padding > 0
    assert batch.num_real_tokens == plan.stats.tokens == batch.num_tokens - batch.padding


@pytest.mark.parametrize("too_long", ["truncate", "split", "drop"])
def test_best_fit_wastes_less_and_places_everything_once(too_long):
    """Open sequences to choose among (best fit) leave less padding than greedy packing in order,
    on long and short chats mixed with texts, and still place every supervised target exactly
    once, in sequences of seq_len positions, with the same fate for every chat."""
    from mft.data.packing import plan_packing

    rng = np.random.default_rng(0)
    seq_len = 64
    lengths = [int(x) for x in rng.choice([5, 9, 20, 33, 50, 61, 90], size=400)]
    is_text = [bool(x) for x in rng.random(400) < 0.1]
    masks = [np.array([False] + [bool(b) for b in rng.random(n - 1) < 0.7]) for n in lengths]
    supervised = [int(m[1:].sum()) for m in masks]
    plans = {buffer: plan_packing(lengths, supervised, is_text, seq_len, too_long, lambda k: masks[k], buffer)
             for buffer in (1, 8, 64)}
    if too_long == "split":  # any chat may fill a gap: padding only ends the plan
        assert all(plan.stats.padding < seq_len for plan in plans.values())
    else:
        assert plans[64].stats.padding <= plans[8].stats.padding < plans[1].stats.padding
    # Where a text or (split) a chat that fits lands decides whether it is cut; a longer chat's fate is its own.
    own_fate = ~np.array(is_text) & ((np.array(lengths) - 1 > seq_len) | (too_long != "split"))
    for plan in plans.values():
        assert np.array_equal(plan.fate[own_fate], plans[1].fate[own_fate])
        assert plan.stats.supervised == plans[1].stats.supervised
        for i in range(plan.num_sequences):
            a, b = plan.seq[i], plan.seq[i + 1]
            assert int((plan.end[a:b] - plan.start[a:b] - 1).sum()) == seq_len  # full: pieces + padding
        placed = sorted((int(k), int(s), int(e)) for k, s, e in zip(plan.doc, plan.start, plan.end) if k >= 0)
        assert len(placed) == len(set(placed))  # no piece twice
