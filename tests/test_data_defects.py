"""Bad input is a defect of its row, reported at its line by training and by mft-validate-data
alike: deep nesting, bytes that are not UTF-8, lone surrogates, duplicate keys; a BOM is fine; an
empty file fails both; what the validator says of a long chat is what the packer does with it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mft.data.dataset import build_datasets
from mft.data.mixing import epoch_order
from mft.data.validate import main
from mft.utils.errors import MftError

REPO = Path(__file__).resolve().parents[1]
CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})


def _validate(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _reported(out: str, path) -> dict[int, str]:
    """line -> message of the `file:line: message` lines the validator printed."""
    found = {}
    for line in out.splitlines():
        if m := re.match(rf"{re.escape(str(path))}:(\d+): (.*)", line):
            found[int(m[1])] = m[2]
    return found


def _datasets(path, tmp_path, seq_len=256, **data):
    cfg = {"train_files": [str(path)], "seq_len": seq_len, "cache_dir": str(tmp_path / "cache"), **data}
    return build_datasets(cfg, _tokenizer())


def _tokenizer():
    from mft.data.tokenizer import load_tokenizer

    return load_tokenizer("v3")


def _skipped(path, tmp_path) -> dict[int, str]:
    """line -> message of every row training skips with on_error=skip."""
    train, _ = _datasets(path, tmp_path, on_error="skip")
    (source,) = {id(p.store): p.store for p in train.parts}.values()
    return {line: message for line, _, message in source.errors}


# ---------------------------------------------------------------- item 5: one message, not a traceback


def test_deep_nesting_is_a_defect_of_its_line(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    too_deep_for_python = "[" * 5000 + "]" * 5000  # json's decoder raises RecursionError
    deeper_than_allowed = json.dumps({"messages": [{"role": "user", "content": "x", "k": json.loads("[" * 80 + "]" * 80)}]})
    path.write_text(f"{CHAT}\n{too_deep_for_python}\n{CHAT}\n{deeper_than_allowed}\n{CHAT}\n")
    skipped = _skipped(path, tmp_path)
    assert sorted(skipped) == [2, 4] and all("nested deeper than 64 levels" in m for m in skipped.values())
    with pytest.raises(MftError, match=rf"{re.escape(str(path))}:2: JSON nested deeper"):
        _datasets(path, tmp_path)
    code, out, _ = _validate(capsys, path)
    assert code == 1 and sorted(_reported(out, path)) == [2, 4]


def test_bad_bytes_and_lone_surrogates_are_defects_of_their_line(tmp_path, capsys):
    path = tmp_path / "bytes.jsonl"
    surrogate = '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "yo"}]}'
    path.write_bytes(b"\n".join([CHAT.encode(), CHAT.encode().replace(b"Hi?", b"Hi\xff\xfe"), surrogate.encode(), CHAT.encode()]) + b"\n")
    skipped = _skipped(path, tmp_path)
    assert skipped == {
        2: "not valid UTF-8 (byte 0xff at column 46); save the file as UTF-8",
        3: "'messages[0].content' holds a lone surrogate '\\ud800' (half of a UTF-16 pair, from a JSON \\u escape); "
           "text must be valid Unicode",
    }
    code, out, _ = _validate(capsys, path)
    assert code == 1 and _reported(out, path) == skipped
    table = tmp_path / "bytes.csv"
    table.write_bytes(b"text,label\nfine,1\nnot \xe9 utf-8,2\nfine too,3\n")
    assert _skipped(table, tmp_path) == {3: "column 'text' is not valid UTF-8 (byte 0xe9); save the file as UTF-8"}


def test_mft_train_reports_bad_rows_without_a_traceback(tmp_path):
    """The public command, on the defects fixture: one paragraph naming file:line, exit 1."""
    fixture = REPO / "tests" / "fixtures" / "defects.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "mft.train", f"data.train_files=[{fixture}]", "data.seq_len=256",
         "data.cache_dir=null", f"hydra.run.dir={tmp_path / 'run'}"],
        check=False, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'launch'}"},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.startswith("mft-train: error: ") and f"{fixture}:3: invalid JSON" in result.stderr


# ---------------------------------------------------------------- item 7: data edge cases


def test_a_utf8_bom_is_accepted(tmp_path, capsys):
    jsonl, table = tmp_path / "bom.jsonl", tmp_path / "bom.csv"
    jsonl.write_bytes(b"\xef\xbb\xbf" + f"{CHAT}\n{CHAT}\n".encode())
    table.write_bytes(b"\xef\xbb\xbftext,label\nhello there,1\n")
    for path, samples in ((jsonl, 2), (table, 1)):
        train, _ = _datasets(path, tmp_path)
        assert train.num_samples == samples and train.skipped == 0
        code, out, _ = _validate(capsys, path)
        assert code == 0 and out.rstrip().endswith("all rows valid"), out


def test_duplicate_keys_are_a_defect(tmp_path, capsys):
    path = tmp_path / "dup.jsonl"
    twice = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages": []}'
    nested = '{"messages": [{"role": "user", "role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path.write_text(f"{CHAT}\n{twice}\n{nested}\n")
    skipped = _skipped(path, tmp_path)
    assert sorted(skipped) == [2, 3]
    assert skipped[2].startswith("key 'messages' appears twice in one object") and "'role' appears twice" in skipped[3]
    code, out, _ = _validate(capsys, path)
    assert code == 1 and _reported(out, path) == skipped and "duplicate_key 2" in out


def test_tables_and_json_arrays(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\nfine,1\ntoo,many,fields\n\nfine again,2\n")
    assert _skipped(ragged, tmp_path) == {3: "3 fields, the header has 2"}
    twice = tmp_path / "twice.csv"
    twice.write_text("text,label,text\na,1,b\n")
    with pytest.raises(MftError, match=rf"{re.escape(str(twice))}:1: the header names column\(s\) \['text'\] more than once"):
        _datasets(twice, tmp_path)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes(f"{CHAT}\n".encode("utf-16"))
    with pytest.raises(MftError, match=rf"{re.escape(str(utf16))}: the file is UTF-16"):
        _datasets(utf16, tmp_path)
    array = tmp_path / "rows.json"
    array.write_text(f'[\n{CHAT},\n{{"text": "a",\n "text": "b"}},\n{CHAT}\n]\n')
    assert _skipped(array, tmp_path) == {3: "key 'text' appears twice in one object; JSON readers silently keep only the last one"}
    array.write_text(f'[\n{CHAT},\n' + "[" * 5000 + "]" * 5000 + "\n]\n")
    with pytest.raises(MftError, match=rf"{re.escape(str(array))}:3: this element of the JSON array is nested too deeply"):
        _datasets(array, tmp_path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(MftError, match=rf"{re.escape(str(broken))}: not a readable Parquet file"):
        _datasets(broken, tmp_path)
    stray_cr = tmp_path / "cr.jsonl"  # lines are counted as grep -n counts them: at "\n" only
    stray_cr.write_bytes(b'{"text": "a"}\r\n{"text":\r "b"}\r\n{"x": 1}\r\n')
    assert list(_skipped(stray_cr, tmp_path)) == [3]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_an_empty_file_fails_validation_and_training(tmp_path, capsys, content, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(content)
    with pytest.raises(MftError, match=rf"{re.escape(str(path))}: no rows: the file is empty"):
        _datasets(path, tmp_path)
    code, out, _ = _validate(capsys, path)
    assert code == 1 and f"{path}: no rows: the file is empty" in out and "all rows valid" not in out
    valid = tmp_path / "valid.jsonl"
    valid.write_text(CHAT + "\n")
    with pytest.raises(MftError, match="no rows"):  # a validation file too
        _datasets(valid, tmp_path, valid_files=[str(path)])


def _chat(prompt_words: int, answer_words: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "word " * prompt_words},
                                    {"role": "assistant", "content": "word " * answer_words}]})


@pytest.mark.parametrize("too_long", ["truncate", "drop", "split"])
def test_validator_verdicts_are_what_training_does(tmp_path, capsys, too_long):
    """Every row over seq_len: the validator's verdict equals what the packer did with it."""
    seq_len = 64
    path = tmp_path / "long.jsonl"
    rows = [_chat(5, 5), _chat(5, 200), _chat(200, 5), _chat(30, 30), _chat(100, 100), _chat(5, 5)]
    path.write_text("\n".join(rows) + "\n")
    train, _ = _datasets(path, tmp_path, seq_len=seq_len, too_long=too_long)
    (part,) = train.parts
    # What training did, read from the pieces the packer placed in epoch 0.
    _, loc = epoch_order(train.sizes, train.weights, train.seed, 0, train.shuffle)
    plan = train.plan(0)
    pieces: dict[int, list[tuple[int, int]]] = {}
    for k, a, b in zip(plan.doc.tolist(), plan.start.tolist(), plan.end.tolist()):
        if k >= 0:
            doc = int(part.indices[loc[k]])
            pieces.setdefault(int(part.store.lines[doc]), []).append((a, b))
    lengths = dict(zip(part.store.lines.tolist(), np.diff(part.store.offsets).tolist()))
    trained = {}
    for line, length in lengths.items():
        placed = pieces.get(line, [])
        trained[line] = ("drop" if not placed else "split" if len(placed) > 1 or placed[0][0] > 0
                         else "truncate" if placed[0][1] < length else "keep")
    _, out, _ = _validate(capsys, path, "--seq-len", seq_len, "--too-long", too_long)
    verdicts = {line: re.search(r"training would (\w+) it", message)[1] for line, message in _reported(out, path).items()}
    said = {line: verdicts.get(line, "keep") for line in lengths}
    fits = {line for line, length in lengths.items() if length - 1 <= seq_len}
    assert {line: v for line, v in said.items() if line not in fits} == {
        line: v for line, v in trained.items() if line not in fits}
    # A row that fits is kept whole, or with split may be cut to fill a sequence: not a defect.
    assert all(said[line] == "keep" and trained[line] in ("keep", "split" if too_long == "split" else "keep")
               for line in fits)
    assert set(said.values()) - {"keep"}  # the fixture does have rows over seq_len
    if too_long == "truncate":  # a long prompt leaves nothing to train on in the first seq_len tokens
        assert said[3] == "drop" and said[2] == "truncate"


# ---------------------------------------------------------------- item 11: mft-validate-data


def test_valid_files_are_reported_apart(tmp_path, capsys):
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text(f"{CHAT}\n" * 3)
    valid.write_text(f"{CHAT}\n{{bad\n")
    code, out, _ = _validate(capsys, train, "--valid", valid)
    assert code == 1 and _reported(out, valid) == {2: "invalid JSON (Expecting property name enclosed in double quotes at column 2)"}
    files = out[out.index("training files:"):]
    assert files.index(str(train)) < files.index("validation files:") < files.index(str(valid))
    assert "train: 3 samples" in out and "valid: 1 samples" in out


def test_eta_comes_from_the_model_flops_and_the_stated_speed(tmp_path, capsys):
    from conftest import TINY, build

    from mft.data.validate import flop_parameters
    from mft.model.args import ModelArgs

    # The parameters a token is multiplied by: all but the input embedding, counted on a real model.
    model = build(TINY)
    assert flop_parameters(TINY) == sum(p.numel() for n, p in model.named_parameters()
                                        if p.dim() == 2 and not n.startswith("tok_embeddings"))
    assert flop_parameters(ModelArgs(vocab_size=32768)) == 7_113_539_584  # Mistral-7B-v0.3
    # Mixtral 8x7B: the 12.9B a token uses (mft.train.routing's count), less the embedding and norms.
    from mft.model.args import MoeArgs
    from mft.train.routing import parameter_counts

    mixtral = ModelArgs(vocab_size=32000, rope_theta=1e6, moe=MoeArgs(8, 2))
    norms = (2 * mixtral.n_layers + 1) * mixtral.dim
    assert flop_parameters(mixtral) == parameter_counts(mixtral)[1] - mixtral.vocab_size * mixtral.dim - norms
    path = tmp_path / "data.jsonl"
    path.write_text(f"{CHAT}\n")
    args = (path, "--seq-len", 1024, "--batch-size", 1000, "--max-steps", 100)  # 100 x 1000 x 1024 tokens
    _, out, _ = _validate(capsys, *args)
    assert "at 300 TFLOP/s (the default" in out
    _, out, _ = _validate(capsys, *args, "--tflops", 100)
    assert "ETA 12 h 08 min: 6 x 7.11B parameters (model mistral-7b-v0.3) x 102,400,000 tokens = 4.37e+18 FLOPs " \
           "at 100 TFLOP/s (--tflops)" in out
    _, out, _ = _validate(capsys, *args, "--tflops", 100, "--model", "tiny")
    assert "(model tiny)" in out and "ETA 12 h" not in out


def test_invalid_json_messages_read_once(tmp_path, capsys):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"messages": "unterminated\n{"a": 1,}\n')
    code, out, _ = _validate(capsys, path)
    assert code == 1 and _reported(out, path) == {1: "invalid JSON (Unterminated string starting at column 14)",
                                    2: "invalid JSON (Expecting property name enclosed in double quotes at column 9)"}


def test_a_missing_text_column_lists_the_columns_once(tmp_path, capsys):
    path = tmp_path / "table.csv"
    path.write_text("body,label\n" + "some text,1\n" * 5)
    code, out, err = _validate(capsys, path, "--text-column", "content")
    assert code == 2 and out == ""
    assert err.count("its columns are 'body', 'label'") == 1 and "no column 'content'" in err
    with pytest.raises(MftError, match="no column 'content'.*its columns are 'body', 'label'"):
        _datasets(path, tmp_path, text_column="content", format="text")
