"""mft-validate-data: every defect at its true line, --fix output validates clean, statistics; the
examples users copy from Mistral's docs pass validate -> train; the recipes run on the tiny model."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mft.compose import compose, to_dataclass
from mft.config import register_configs
from mft.data.validate import main
from mft.train.loop import train

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = ["persona_chat.jsonl", "medical_json_extraction.jsonl", "text_to_sql.jsonl", "function_calling_anagram.jsonl"]
TINY = ["max_steps=2", "eval_every=0", "eval_batches=1", "progress=false", "data.seq_len=256", "batch_size=2",
        "grad_accum=1", "epochs=null"]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_each_defect_is_reported_at_its_true_line(capsys):
    expected = json.loads((FIXTURES / "defects_expected.json").read_text())
    assert len({e["code"] for e in expected}) >= 18
    path = FIXTURES / "defects.jsonl"
    code, out, _ = _run(capsys, path, "--seq-len", 256)
    assert code == 1
    reported = [line for line in out.splitlines() if re.match(rf"{re.escape(str(path))}:\d+: ", line)]
    assert [int(line.split(":")[1]) for line in reported] == [e["line"] for e in expected]
    assert f"{len(expected)} defects (" in out
    for code_, n in Counter(e["code"] for e in expected).items():
        assert f"{code_} {n}" in out, code_


def test_fix_writes_a_copy_that_validates_clean(capsys, tmp_path):
    path = tmp_path / "defects.jsonl"
    shutil.copy(FIXTURES / "defects.jsonl", path)
    before = path.read_bytes()
    code, out, _ = _run(capsys, path, "--seq-len", 256, "--fix")
    assert code == 1 and path.read_bytes() == before  # the input is never touched
    fixed = tmp_path / "defects.fixed.jsonl"
    expected = json.loads((FIXTURES / "defects_expected.json").read_text())
    for e in expected:
        verb = "repaired" if e["fixable"] else "removed"
        assert f"{path}:{e['line']}: {verb}" in out, (e, out)
    assert f"{sum(e['fixable'] for e in expected)} repaired" in out
    code, out, _ = _run(capsys, fixed, "--seq-len", 256)
    assert code == 0 and out.rstrip().endswith("all rows valid")


def test_statistics_and_config_mode(capsys):
    code, out, _ = _run(capsys, "+experiment=chat_sft", "max_steps=40", "--tflops", 2000)
    assert code == 0
    assert "tiny_chat_train.jsonl: 2000 rows, 2000 samples, 0 defects" in out
    assert "[tiny_chat_train.jsonl 75%, tiny_alpaca.jsonl 25%]" in out  # share per source (weights 3:1)
    assert "40 steps = " in out and "(model tiny)" in out and "at 2000 TFLOP/s (--tflops)" in out
    code, _, err = _run(capsys, "/no/such.jsonl")
    assert code == 2 and "not found" in err


@pytest.fixture(scope="module")
def composed():
    register_configs()

    def make(*overrides):
        return to_dataclass(compose("train", overrides))

    return make


def test_mistral_doc_examples_validate_then_train(capsys, composed, tmp_path):
    files = [FIXTURES / name for name in EXAMPLES]
    code, out, _ = _run(capsys, *files, "--seq-len", 512)
    assert code == 0, out
    # Train on all four at once, plus the defects file with on_error=skip: skips are counted.
    entries = ",".join(f"{{file: '{f}', weight: 1}}" for f in files + [FIXTURES / "defects.jsonl"])
    cfg = composed(*TINY, f"data.train_files=[{entries}]", "data.valid_files=[]", "data.valid_fraction=0.1",
                   "data.on_error=skip", "data.seq_len=512", f"data.cache_dir={tmp_path / 'cache'}")
    result = train(cfg, tmp_path / "run")
    data = result.metrics["train_data"]
    expected = json.loads((FIXTURES / "defects_expected.json").read_text())
    invalid = sum(e["code"] != "too_long" for e in expected)  # the long chats fit 512
    assert data["skipped_rows"] == invalid and data["truncated"] == 0
    assert [s["skipped_rows"] for s in data["sources"]] == [0, 0, 0, 0, invalid]
    (state,) = json.loads((result.checkpoint / "train_state" / "trainer.json").read_text())["data"]  # one rank
    assert state["position"] == 2 and state["epoch"] == 0
    summary = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["summary"] and summary["train_data"]["skipped_rows"] == invalid


@pytest.mark.parametrize("recipe", ["alpaca_autotrain", "chat_sft", "function_calling"])
def test_recipes_run_on_the_tiny_model(composed, recipe, tmp_path):
    seq_len = 512 if recipe == "function_calling" else 256  # tool conversations with their specs are long
    cfg = composed(f"+experiment={recipe}", *TINY, f"data.seq_len={seq_len}", f"data.cache_dir={tmp_path / 'cache'}")
    assert cfg.eval_every == 0
    result = train(cfg, tmp_path / "run")
    assert result.metrics["step"] == 2 and result.metrics["train_data"]["sequences"] > 0
    full = composed(f"+experiment={recipe}")
    if recipe == "alpaca_autotrain":
        assert (full.optim.lr, full.epochs, full.batch_size, full.grad_accum, full.data.seq_len) == (2e-4, 4, 1, 4, 1024)
        assert (full.optim.warmup_ratio, full.optim.weight_decay) == (0.1, 0.01)
        assert (full.peft.r, full.peft.alpha, full.peft.dropout) == (16, 32, 0.045)
    else:
        assert full.eval_every == full.max_steps // 10 == full.logger.log_every
