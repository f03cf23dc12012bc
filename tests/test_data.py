"""Samples validation, packing invariants, datasets and the bundled tiny_chat files."""

import json
import random
from collections import Counter

import pytest
import torch

from mft.data.bundled import bundled_path
from mft.data.dataset import build_datasets
from mft.data.encode import Encoded, encode_sample
from mft.data.packing import collate, pack
from mft.data.readers import read_samples
from mft.data.samples import ChatSample, TextSample, parse_row
from mft.data.tokenizer import load_tokenizer
from mft.utils.errors import MftError

PAD = 0


@pytest.fixture(scope="module")
def data_tok():
    return load_tokenizer("v3")


def _chat(*pairs, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def _write(path, rows):
    """rows: dicts (dumped as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- samples


BAD_ROWS = [  # (row, words the error must contain)
    ("{not json", "invalid JSON"),
    ({"foo": 1}, "expected 'messages'"),
    ({"text": "a", "messages": []}, "got both"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "is empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": _chat(("q", "a"))["messages"] + [{"role": "user", "content": "more"}]},
     "last message must be from the assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system message may only be the first"),
    ({"text": ""}, "is empty"),
    ([1, 2], "expected a JSON object"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "must be from the user"),
    ({"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}]},
     "unsupported key"),
]


def _errors_of(path):
    with pytest.raises(MftError) as err:
        read_samples([path])
    message = str(err.value)
    assert "\n" not in message  # printed as one paragraph
    return message


@pytest.mark.parametrize("chunk", [slice(0, 10), slice(10, None)])
def test_each_error_is_reported_at_its_line(tmp_path, chunk):
    rows, expected = [], []
    for row, words in BAD_ROWS[chunk]:
        rows += [_chat(("q", "a")), "", row]  # a good row, an empty line (skipped), a bad row
        expected.append((len(rows), words))
    path = _write(tmp_path / "bad.jsonl", rows)
    message = _errors_of(path)
    assert message.startswith(f"{len(expected)} invalid data row(s): ")
    reported = message.split(": ", 1)[1].split("; ")
    assert len(reported) == len(expected)
    for line, (lineno, words) in zip(reported, expected):
        assert line.startswith(f"{path}:{lineno}: "), line
        assert words in line, (line, words)


def test_only_the_first_errors_are_listed(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])
    message = _errors_of(path)
    assert message.startswith(f"{len(BAD_ROWS)} invalid data row(s) (first 10 shown): ")
    assert f"{path}:10: " in message and f"{path}:11: " not in message


def test_good_rows_keep_their_source(tmp_path):
    path = _write(tmp_path / "ok.jsonl", [_chat(("q", "a"), system="s"), "", "  ", {"text": "hello"}])
    chat, text = read_samples([path])
    assert isinstance(chat, ChatSample) and chat.source == f"{path}:1"
    assert [m.role for m in chat.messages] == ["system", "user", "assistant"]
    assert isinstance(text, TextSample) and text.source == f"{path}:4"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MftError, match="nope.jsonl"):
        read_samples([str(tmp_path / "nope.jsonl")])


def test_encode_text_and_chat(data_tok):
    text = encode_sample(TextSample("hello world", "f:1"), data_tok)
    assert text.ids == data_tok.encode_text("hello world") and text.is_text
    assert text.mask == [False] + [True] * (len(text.ids) - 1)
    chat = encode_sample(parse_row(_chat(("q", "a")), "f:2"), data_tok)
    assert (chat.ids, chat.mask) == data_tok.encode_chat(_chat(("q", "a"))["messages"])


# ---------------------------------------------------------------- packing (more in test_packing.py)


def test_collate_flat_batch():
    docs = [Encoded([5, 6, 7, 8], [False, True, True, True]), Encoded([9, 10, 11], [False, False, True])]
    seqs, _ = pack(docs, 5, PAD)  # both fit: one sequence of documents [3, 2]
    seqs2, _ = pack(docs[::-1], 4, PAD)  # [2, pad 2] then [3, pad 1]
    batch = collate(seqs + seqs2)
    assert batch.tokens.tolist() == [5, 6, 7, 9, 10, 9, 10, PAD, PAD, 5, 6, 7, PAD]
    assert batch.targets.tolist() == [6, 7, 8, 10, 11, 10, 11, PAD, PAD, 6, 7, 8, PAD]
    assert batch.loss_mask.tolist() == [1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    assert batch.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 0, 1, 2, 0]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 7, 9, 12, 13]
    assert batch.max_seqlen == 3 and batch.num_tokens == 13


# ---------------------------------------------------------------- datasets


def _cfg(train, valid=(), fraction=0.0, seq_len=64, seed=0, **more):
    return {"train_files": list(train), "valid_files": list(valid), "valid_fraction": fraction,
            "seq_len": seq_len, "too_long": "truncate", "seed": seed, "cache_dir": None, **more}


@pytest.fixture
def data_files(tmp_path):
    rng = random.Random(0)
    rows = [_chat((f"What is {a} + {b}?", f"{a + b}")) for a, b in
            ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(120))]
    rows += [{"text": f"plain text number {i}"} for i in range(20)]
    return _write(tmp_path / "train.jsonl", rows)


def _sources(ds):
    return ds.sources()


def test_holdout_split_is_deterministic_and_disjoint(data_tok, data_files):
    train, valid = build_datasets(_cfg([data_files], fraction=0.1, seed=1), data_tok)
    train2, valid2 = build_datasets(_cfg([data_files], fraction=0.1, seed=7), data_tok)
    assert _sources(valid) == _sources(valid2)  # independent of the training seed
    assert valid.num_samples == 14 and train.num_samples == 126
    assert not set(_sources(train)) & set(_sources(valid))
    _, tiny = build_datasets(_cfg([data_files], fraction=0.001), data_tok)
    assert tiny.num_samples == 1  # at least one sample
    assert build_datasets(_cfg([data_files]), data_tok)[1] is None
    with pytest.raises(MftError, match="valid_fraction"):
        build_datasets(_cfg([data_files], fraction=1.0), data_tok)


def test_epochs_reshuffle_and_keep_every_target(data_tok, data_files):
    train, _ = build_datasets(_cfg([data_files], seq_len=48), data_tok)
    epochs = []
    for epoch in (0, 1):
        batches = list(train.batches(batch_size=3, epoch=epoch))
        assert sum(b.num_tokens for b in batches) == 48 * len(train.sequences(epoch))
        assert batches[-1].num_tokens <= 3 * 48  # the last, partial batch is kept
        epochs.append(torch.cat([b.tokens for b in batches]))
        supervised = sum(int(b.loss_mask.sum()) for b in batches)
        assert supervised == train.stats.supervised
    assert not torch.equal(epochs[0][:200], epochs[1][:200])
    again = torch.cat([b.tokens for b in train.batches(batch_size=3, epoch=1)])
    assert torch.equal(epochs[1], again)
    assert len(train) == len(train.sequences(0))
    assert train.summary().startswith("train: 140 samples")


def test_valid_files_are_not_shuffled(data_tok, data_files, tmp_path):
    _, valid = build_datasets(_cfg([data_files], valid=[data_files]), data_tok)
    a = [b.tokens for b in valid.batches(4, epoch=0)]
    b = [b.tokens for b in valid.batches(4, epoch=3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(MftError, match="missing key 'seq_len'"):
        build_datasets({"train_files": [data_files]}, data_tok)


# ---------------------------------------------------------------- bundled data


def test_bundled_tiny_chat_is_clean(data_tok):
    train_path, valid_path = bundled_path("tiny_chat_train.jsonl"), bundled_path("tiny_chat_valid")
    train, valid = read_samples([train_path]), read_samples([valid_path])
    assert len(train) == 2000 and len(valid) == 200
    key = lambda s: tuple(s.messages)  # noqa: E731
    assert len({key(s) for s in train}) == 2000
    assert not {key(s) for s in train} & {key(s) for s in valid}
    lengths = sorted(len(encode_sample(s, data_tok).ids) for s in train)
    assert lengths[int(0.9 * len(lengths))] < 120
    with pytest.raises(MftError, match="tiny_chat_train.jsonl"):
        bundled_path("nope")


def test_bundled_builds_datasets(data_tok):
    cfg = _cfg([bundled_path("tiny_chat_train")], valid=[bundled_path("tiny_chat_valid")], seq_len=256)
    train, valid = build_datasets(cfg, data_tok)
    assert train.stats.truncated == train.stats.dropped == train.stats.unsupervised == 0
    assert train.stats.samples == 2000 and valid.stats.samples == 200
    batch = next(train.batches(batch_size=2))
    assert batch.num_tokens == 512 and int(batch.cu_seqlens[-1]) == 512


def test_the_summary_states_the_padding_share_of_the_planned_sequences(data_tok, data_files):
    train, valid = build_datasets(_cfg([data_files], fraction=0.2, seq_len=48), data_tok)
    for dataset in (train, valid):
        batches = list(dataset.batches(batch_size=4, epoch=0))
        padding, positions = sum(b.padding for b in batches), sum(b.num_tokens for b in batches)
        assert 0 < padding < positions  # short chats that do not fill their sequences
        assert f"padding {padding / positions:.1%} of positions" in dataset.summary()


def test_a_long_chat_split_over_sequences_keeps_every_supervised_token_once(data_tok, tmp_path):
    """too_long=split against the same chats packed whole into long sequences."""
    rows = [_chat(("tell me a story", "once upon a time " * 12), ("and then?", "they lived happily " * 9)),
            _chat(("short", "yes"))]
    path = _write(tmp_path / "long.jsonl", rows)

    def supervised_targets(seq_len: int, too_long: str):
        dataset, _ = build_datasets({**_cfg([path], seq_len=seq_len), "too_long": too_long}, data_tok)
        batches = list(dataset.batches(batch_size=2, epoch=0))
        return Counter(t for b in batches for t in b.targets[b.loss_mask].tolist()), dataset.stats

    whole, whole_stats = supervised_targets(512, "truncate")
    split, split_stats = supervised_targets(24, "split")
    assert whole_stats.truncated == 0 and split_stats.split == 1 and split_stats.sequences > 3
    assert split == whole and split_stats.supervised == whole_stats.supervised == sum(whole.values())
