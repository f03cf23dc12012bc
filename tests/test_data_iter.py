"""Mixing by weight, the train iterator's exact resume, and per-rank shards."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from mft.data.dataset import build_datasets
from mft.data.mixing import draws_per_epoch, epoch_order
from mft.data.tokenizer import load_tokenizer
from mft.utils.errors import MftError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("v3")


def _write(path, n, tag):
    rows = [{"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                          {"role": "assistant", "content": f"{tag} answer {i} " + "x " * (i % 7)}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    return _write(d / "a.jsonl", 90, "alpha"), _write(d / "b.jsonl", 30, "beta")


def _key(batch):
    return tuple(batch.tokens.tolist())


def test_epoch_order_draws_by_weight():
    assert draws_per_epoch([90, 30], None) == [90, 30]
    assert draws_per_epoch([90, 30], [1, 1]) == [60, 60]
    assert draws_per_epoch([90, 30], [3, 1]) == [90, 30]
    assert draws_per_epoch([90, 30], [1, 0]) == [120, 0]
    src, doc = epoch_order([90, 30], [1, 1], seed=0, epoch=0)
    assert Counter(src.tolist()) == {0: 60, 1: 60}
    # The small source is read in passes: two full passes of 30 per epoch, each a permutation.
    assert sorted(doc[src == 1].tolist()) == sorted(list(range(30)) * 2)
    # Over epochs 0..2 the big source is read 60 + 60 + 60 = 180 = 2 full passes, each doc twice.
    big = np.concatenate([(lambda s, d: d[s == 0])(*epoch_order([90, 30], [1, 1], 0, e)) for e in range(3)])
    assert Counter(big.tolist()) == {i: 2 for i in range(90)}
    again = epoch_order([90, 30], [1, 1], seed=0, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(again, epoch_order([90, 30], [1, 1], 0, 1)))
    with pytest.raises(MftError):
        draws_per_epoch([3], [-1])


def test_weighted_files_in_the_config(files, tok):
    a, b = files
    cfg = {"train_files": [{"file": a, "weight": 1}, {"file": b, "weight": 1}], "seq_len": 64}
    train, _ = build_datasets(cfg, tok, cache_dir=None)
    assert train.report()["sources"][1]["per_epoch"] == 60 and train.num_samples == 120
    text = " ".join(tok.decode(b.tokens.tolist()) for b in train.batches(16))
    assert text.count("beta question") == 60 and text.count("alpha question") == 60
    with pytest.raises(MftError, match="every file a weight or none"):
        build_datasets({**cfg, "train_files": [{"file": a, "weight": 1}, b]}, tok, cache_dir=None)
    with pytest.raises(MftError, match="unknown key"):
        build_datasets({**cfg, "train_files": [{"file": a, "wieght": 1}]}, tok, cache_dir=None)


def test_resumed_iterator_sees_exactly_the_uninterrupted_batches(files, tok, tmp_path):
    a, b = files
    cfg = {"train_files": [{"file": a, "weight": 2}, {"file": b, "weight": 1}], "seq_len": 48, "seed": 5}
    train, _ = build_datasets(cfg, tok, cache_dir=str(tmp_path / "cache"))
    per_epoch = train.num_batches(3)
    it = train.iterator(3)
    reference = [_key(next(it)) for _ in range(2 * per_epoch + 5)]  # crosses two epoch boundaries
    for k in (0, 1, per_epoch - 1, per_epoch, per_epoch + 3):
        stopped = train.iterator(3)
        for _ in range(k):
            next(stopped)
        saved = json.dumps(stopped.state_dict())  # what the loop writes next to a checkpoint
        fresh, _ = build_datasets(cfg, tok, cache_dir=str(tmp_path / "cache"))  # a new process, from the cache
        resumed = fresh.iterator(3)
        resumed.load_state_dict(json.loads(saved))
        assert [_key(next(resumed)) for _ in range(len(reference) - k)] == reference[k:], k
    other, _ = build_datasets({**cfg, "seed": 6}, tok, cache_dir=None)
    with pytest.raises(MftError, match="other data or settings"):
        other.iterator(3).load_state_dict(json.loads(saved))


def test_a_split_position_saved_before_split_filled_sequences_is_refused_with_why(files, tok):
    train, _ = build_datasets({"train_files": list(files), "seq_len": 48, "too_long": "split"}, tok, cache_dir=None)
    saved = {**train.iterator(3).state_dict(), "fingerprint": train.fingerprint(split_before_fill=True)}
    with pytest.raises(MftError, match="older mft, which did not cut chats to fill sequences"):
        train.iterator(3).load_state_dict(saved)
    train.iterator(3).load_state_dict(train.iterator(3).state_dict())  # its own position resumes


def test_ranks_partition_the_batches(files, tok):
    train, _ = build_datasets({"train_files": list(files), "seq_len": 48}, tok, cache_dir=None)
    per_epoch = [train.num_batches(2, epoch) for epoch in (0, 1)]  # a reshuffled epoch may pack into more or fewer
    n = per_epoch[0]
    single = train.iterator(2)
    everything = [_key(next(single)) for _ in range(sum(per_epoch))]  # two epochs
    world = 3
    shards = []
    for rank in range(world):
        it = train.iterator(2, rank=rank, world_size=world)
        count = sum(len(range(rank, batches, world)) for batches in per_epoch)
        shards.append([_key(next(it)) for _ in range(count)])
    assert sorted(k for s in shards for k in s) == sorted(everything)
    assert len({k for s in shards for k in s}) == len(set(everything))
    for rank in range(world):
        assert shards[rank][: len(range(rank, n, world))] == everything[rank:n:world]


def test_every_supervised_token_once_per_epoch_through_the_iterator(files, tok):
    train, _ = build_datasets({"train_files": list(files), "seq_len": 40, "too_long": "split"}, tok, cache_dir=None)
    it = train.iterator(4)
    # Each epoch plans its own order, so its own number of sequences (split pieces differ).
    supervised = [sum(int(b.loss_mask.sum()) for b in (next(it) for _ in range(train.num_batches(4, epoch))))
                  for epoch in range(2)]
    assert supervised == [train.stats.supervised] * 2
    assert train.stats.supervised == int(sum(p.store.supervised.sum() for p in train.parts))
    assert torch.is_tensor(next(it).tokens)
