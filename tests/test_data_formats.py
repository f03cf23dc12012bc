"""File formats (JSONL, JSON arrays, CSV/TSV, Parquet), Alpaca mappings, control strings, bad rows
during training (raise / skip), and the tokenized cache."""

import csv
import json
import logging

import numpy as np
import pytest

from mft.data.dataset import build_datasets
from mft.data.readers import iter_records, read_samples
from mft.data.samples import (
    ALPACA_PROMPT_WITH_INPUT,
    ChatSample,
    RowOptions,
    TextSample,
)
from mft.data.store import EncodeSettings, build_store
from mft.data.tokenizer import load_tokenizer
from mft.utils.errors import MftError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("v3")


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def test_csv_text_column_and_line_numbers(tmp_path):
    path = _csv(tmp_path / "train.csv", ["id", "body"],
                [["1", "first text"], ["2", "a text\nover two lines"], ["3", ""], ["4", "last"]])
    with pytest.raises(MftError) as err:
        read_samples([path], RowOptions(text_column="body"))
    assert f"{path}:5: 'body' is empty" in str(err.value)  # the record starting on line 5 (header is line 1)
    _csv(tmp_path / "ok.tsv", ["body"], [["one"], ["two"]], delimiter="\t")
    samples = read_samples([str(tmp_path / "ok.tsv")], RowOptions(text_column="body"))
    assert [s.text for s in samples] == ["one", "two"] and samples[1].source.endswith("ok.tsv:3")
    with pytest.raises(MftError, match="expected 'messages' .chat., 'text'"):
        read_samples([path])  # the default column "text" is not there


def test_alpaca_as_prompt_or_chat(tmp_path):
    rows = [["Translate to French.", "cat", "chat"], ["Name a colour.", "", "Blue."]]
    path = _csv(tmp_path / "alpaca.csv", ["instruction", "input", "output"], rows)
    prompt = read_samples([path], RowOptions(alpaca="prompt"))
    assert all(isinstance(s, TextSample) for s in prompt)
    assert prompt[0].text == ALPACA_PROMPT_WITH_INPUT.format(instruction="Translate to French.", input="cat", output="chat")
    assert prompt[1].text.startswith("Below is an instruction that describes a task. Write")
    assert prompt[1].text.endswith("### Instruction:\nName a colour.\n\n### Response:\nBlue.")
    chat = read_samples([path])
    assert isinstance(chat[0], ChatSample)
    assert [(m.role, m.content) for m in chat[0].messages] == [("user", "Translate to French.\n\ncat"), ("assistant", "chat")]
    assert [m.content for m in chat[1].messages] == ["Name a colour.", "Blue."]
    with pytest.raises(MftError, match="'output' is empty"):
        read_samples([_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": " "}])])


def test_json_array_keeps_lines_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"text": "one"},\n  {"text":\n "two"},\n  {"text": ""}\n]\n')
    assert [r.line for r in iter_records(tmp_path / "a.json")] == [2, 3, 5]
    with pytest.raises(MftError, match=r"a.json:5: 'text' is empty"):
        read_samples([str(tmp_path / "a.json")])
    (tmp_path / "lines.json").write_text(json.dumps(CHAT) + "\n")  # JSON lines named .json
    assert isinstance(read_samples([str(tmp_path / "lines.json")])[0], ChatSample)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["Say hi.", "Count to 2."], "input": ["", ""], "output": ["hi", "1, 2"]}),
                   tmp_path / "a.parquet")
    samples = read_samples([str(tmp_path / "a.parquet")])
    assert [s.messages[1].content for s in samples] == ["hi", "1, 2"] and samples[1].source.endswith("a.parquet:2")
    with pytest.raises(MftError, match="unknown data file type"):
        read_samples([_jsonl(tmp_path / "x.txt", ["hello"])])


def test_control_strings_are_counted_and_mapped(tmp_path, tok, caplog):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "<s>[INST] What is 2 + 2? [/INST] 4</s>"}, {"text": "plain"}, CHAT])
    with caplog.at_level(logging.WARNING, logger="mft.data"):
        train, _ = build_datasets({"train_files": [path], "seq_len": 64}, tok, cache_dir=None)
    assert "1 samples hold literal control strings (</s> x1, <s> x1, [/INST] x1, [INST] x1)" in caplog.text
    assert f"{path}:1" in caplog.text and "data.control_tokens=map" in caplog.text
    plain = build_store(path, tok, EncodeSettings(control="warn"))
    mapped = build_store(path, tok, EncodeSettings(control="map"))
    chat_ids = tok.encode_chat([{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}])[0]
    assert mapped.doc(0)[0].tolist() == chat_ids
    assert plain.doc(0)[0].tolist() == tok.encode_text("<s>[INST] What is 2 + 2? [/INST] 4</s>")
    assert plain.meta["control_rows"] == mapped.meta["control_rows"] == 1


def test_bad_rows_raise_before_training_or_are_skipped_and_counted(tmp_path, tok, caplog):
    rows = [CHAT, "{broken", CHAT, {"messages": [{"role": "user", "content": "only a question"}]}, CHAT]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = {"train_files": [path], "seq_len": 64}
    with pytest.raises(MftError) as err:
        build_datasets(cfg, tok, cache_dir=None)
    assert str(err.value).startswith("2 invalid data row(s) in train_files: ")
    assert f"{path}:2: invalid JSON" in str(err.value) and f"{path}:4: no assistant message" in str(err.value)
    assert "data.on_error=skip" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="mft.data"):
        train, _ = build_datasets({**cfg, "on_error": "skip"}, tok, cache_dir=None)
    assert f"skipped {path}:2: invalid JSON" in caplog.text and f"skipped {path}:4: no assistant" in caplog.text
    assert train.skipped == 2 and train.num_samples == 3
    assert train.report()["skipped_rows"] == 2 and "skipped invalid rows 2" in train.summary()
    with pytest.raises(MftError, match="on_error"):
        build_datasets({**cfg, "on_error": "ignore"}, tok, cache_dir=None)


def test_cache_keyed_by_content_tokenizer_and_settings(tmp_path, tok):
    path = _jsonl(tmp_path / "train.jsonl", [CHAT, {"text": "some text"}])
    cache = tmp_path / "cache"
    first = build_store(path, tok, EncodeSettings(), cache)
    again = build_store(path, tok, EncodeSettings(), cache)
    assert not first.cached and again.cached
    assert again.ids.tolist() == first.ids.tolist() and again.mask.tolist() == first.mask.tolist()
    assert isinstance(again.ids, np.memmap)
    assert not build_store(path, tok, EncodeSettings(control="map"), cache).cached  # other settings
    assert not build_store(path, load_tokenizer("v7"), EncodeSettings(), cache).cached  # other tokenizer
    _jsonl(tmp_path / "train.jsonl", [CHAT, {"text": "other text"}])  # new content
    changed = build_store(path, tok, EncodeSettings(), cache)
    assert not changed.cached and changed.ids.tolist() != first.ids.tolist()
    entries = [p for p in cache.iterdir() if p.is_dir() and p.name != "stat"]
    assert len(entries) == 4


def test_worker_processes_give_the_same_store(tmp_path, tok):
    rows = [CHAT if i % 3 else {"text": f"text number {i}"} for i in range(600)] + ["{bad"]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    alone = build_store(path, tok, EncodeSettings(), None, workers=0)
    pooled = build_store(path, tok, EncodeSettings(), tmp_path / "cache", workers=2)
    for key in ("offsets", "lines", "supervised", "is_text"):
        assert np.array_equal(getattr(alone, key), getattr(pooled, key))
    assert np.array_equal(alone.ids, pooled.ids) and np.array_equal(alone.mask, pooled.mask)
    assert alone.errors == pooled.errors == [(601, "invalid_json", alone.errors[0][2])]
