"""mft-generate end to end (subprocess): a tiny base saved with save_consolidated and a saved
adapter in a run dir, in prompt, batch and chat mode; and the errors a user sees."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import build, tiny_args

from mft.checkpoint.adapter import save_adapter
from mft.checkpoint.consolidated import save_consolidated
from mft.data.tokenizer import load_tokenizer
from mft.generate.chat import ChatFormat
from mft.generate.decode import GenerationSettings, Generator
from mft.generate.load import load_model, resolve_source
from mft.peft.lora import LoRASettings, apply_lora, lora_modules

# vocab 32768: the real v3 tokenizer
ARGS = tiny_args(hidden_dim=128, vocab_size=32768, rope_theta=1e6, sliding_window=16)


def mft_generate(*args, cwd, stdin=None):
    exe = shutil.which("mft-generate")
    cmd = [exe] if exe else [sys.executable, "-m", "mft.generate"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, env=env, input=stdin)


@pytest.fixture(scope="module")
def gen_run_dir(tmp_path_factory):
    """A run dir as mft-train leaves it: base_model/, checkpoints/step_N/ (adapter), resolved_config.yaml."""
    run = tmp_path_factory.mktemp("cli") / "run"
    torch.manual_seed(0)
    model = build(ARGS, device="cpu", dtype=torch.float32)
    base = save_consolidated(model, run / "base_model")
    settings = LoRASettings(r=4, alpha=8)
    apply_lora(model, settings)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(std=0.05)
    describe = {"name": "tiny", "checkpoint": str(base), "tokenizer": "v3", "args": asdict(ARGS)}
    save_adapter(model, run / "checkpoints" / "step_000002", settings, describe, step=2)
    (run / "resolved_config.yaml").write_text("model:\n  name: tiny\n  tokenizer: v3\n")
    return run


def reference_answer(run, user, n):
    """The same greedy answer through the library: what the CLI must print."""
    model = load_model(resolve_source(run_dir=str(run)), device="cpu", dtype=torch.float32)
    fmt = ChatFormat(load_tokenizer("v3"))
    ids = fmt.encode([{"role": "user", "content": user}])
    tokens = Generator(model).generate([ids], GenerationSettings(max_new_tokens=n, stop_token_ids=[fmt.tokenizer.eos_id]))
    return fmt.decode(tokens[0].tokens)


def test_prompt_mode_streams_the_answer(gen_run_dir, tmp_path):
    result = mft_generate(f"run_dir={gen_run_dir}", "prompt=Hello there", "max_new_tokens=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == reference_answer(gen_run_dir, "Hello there", 8) + "\n"
    assert "step_000002" in result.stderr and "8 generated" in result.stderr
    assert not list(tmp_path.iterdir())  # no run dir, no log file, no .hydra


def test_batch_mode_jsonl_in_jsonl_out(gen_run_dir, tmp_path):
    requests = [
        {"prompt": "Hello there", "id": "a"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]},
        {"text": "Once upon a time"},
        {"messages": [{"role": "user", "content": "An anagram of listen?"}], "tools": [{"type": "function", "function": {
            "name": "generate_anagram", "description": "Generate an anagram of a given word",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    result = mft_generate(f"base={gen_run_dir}", "input=in.jsonl", "output=out.jsonl", "max_new_tokens=8",
                          "batch_size=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and rows[0]["id"] == "a"
    assert rows[0]["output"] == reference_answer(gen_run_dir, "Hello there", 8)  # batched rows = single rows
    assert all(r["completion_tokens"] <= 8 and r["finish_reason"] in ("length", "stop_token") for r in rows)
    assert rows[2]["prompt_tokens"] == len(load_tokenizer("v3").encode_text("Once upon a time", eos=False))
    assert rows[3]["prompt_tokens"] > 40  # the tool definitions are part of the prompt


def test_bad_request_lines_are_named_by_line(gen_run_dir, tmp_path):
    lines = ['{"prompt": "fine"}', "[" * 100_000, '{"messages": [{"role": "user"}]}', '{"messages": 5}']
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    result = mft_generate(f"base={gen_run_dir}", "input=in.jsonl", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(f"in.jsonl:{n}:" in result.stderr for n in (2, 3, 4)) and "in.jsonl:1:" not in result.stderr
    result = mft_generate(f"base={gen_run_dir}", "input=latin1.jsonl", cwd=tmp_path)
    assert result.returncode == 1 and "latin1.jsonl:2: not UTF-8" in result.stderr, result.stderr[-3000:]


def test_chat_mode_reads_turns_from_stdin(gen_run_dir, tmp_path):
    result = mft_generate(f"run_dir={gen_run_dir}", "max_new_tokens=4", "stream=false", "system=Be brief.",
                          cwd=tmp_path, stdin="Hello\n/reset\nAgain\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("assistant> ") == 2 and "(conversation cleared)" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["run_dir={run}", "temprature=1"], "temprature"),
    (["base=/no/such/model", "prompt=x"], "/no/such/model does not exist"),
    (["run_dir={run}", "mode=speak"], "mode=speak"),  # Hydra: one of auto, prompt, chat, batch
    (["run_dir={run}", "input=missing.jsonl"], "missing.jsonl"),
    (["run_dir={run}", "prompt=x", "tools=missing.json"], "missing.json"),
    (["run_dir={run}", "prompt=x", "prompt_file=p.txt"], "not both"),
    (["run_dir={run}", "prompt_file=missing.txt"], "prompt_file=missing.txt: cannot read it"),
])
def test_errors_are_one_clear_message(gen_run_dir, tmp_path, args, expected):
    result = mft_generate(*(a.format(run=gen_run_dir) for a in args), cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 12, result.stderr


# Text Hydra's override grammar cannot parse: each must reach the model as written.
NASTY_PROMPTS = [
    "What's the weather in Oslo?",
    "Hello, how are you",
    "Translate: bonjour (hello)",
    'She said "hi" [twice] {maybe}',
    "a=b, c=d",
    "line one\nline two\n\n  indented",
    "Ünïcödé: 日本語, emoji 🙂, Ελληνικά",
    "${oc.env:HOME} \\ backslash $PATH ~tilde 'quoted' * ? |pipe| #hash",
    "  leading and trailing spaces  ",
    "",
]


def prompt_tokens(user: str) -> int:
    return len(ChatFormat(load_tokenizer("v3")).encode([{"role": "user", "content": user}]))


@pytest.mark.parametrize("prompt", NASTY_PROMPTS)
def test_any_text_is_a_prompt(gen_run_dir, tmp_path, monkeypatch, capsys, caplog, prompt):
    """The real CLI (in process): `prompt=<any text>` answers as the library does for that exact text."""
    from mft.generate.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mft-generate", f"run_dir={gen_run_dir}", f"prompt={prompt}",
                                      "max_new_tokens=4", "stream=false"])
    with caplog.at_level("INFO", logger="mft.generate"):
        main()
    assert f"{prompt_tokens(prompt)} prompt tokens" in caplog.text
    answer = reference_answer(gen_run_dir, prompt, 4)
    assert capsys.readouterr().out == (answer + "\n" if answer else "")


def test_text_overrides_are_taken_verbatim():
    from mft.generate.cli import split_text_overrides

    argv = ["run_dir=r", "prompt=a=b, (c): 'd'", "system=Be \"brief\".", "max_new_tokens=4", "prompt=last wins"]
    rest, texts = split_text_overrides(argv)
    assert rest == ["run_dir=r", "max_new_tokens=4"]
    assert texts == {"prompt": "last wins", "system": 'Be "brief".'}


def test_prompt_file_and_standard_input(gen_run_dir, tmp_path, monkeypatch, capsys):
    """prompt_file=PATH reads UTF-8 text (one final line break dropped); prompt_file=- reads stdin."""
    from mft.generate.cli import main

    prompt = "What's the weather in Oslo?\nHello, how are you\nTranslate: bonjour (hello) 🙂"
    expected = reference_answer(gen_run_dir, prompt, 4) + "\n"
    piped = mft_generate(f"run_dir={gen_run_dir}", "prompt_file=-", "max_new_tokens=4", cwd=tmp_path,
                         stdin=prompt + "\n")
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert piped.stdout == expected and f"{prompt_tokens(prompt)} prompt tokens" in piped.stderr

    (tmp_path / "prompt.txt").write_bytes((prompt + "\r\n").encode())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mft-generate", f"run_dir={gen_run_dir}", "prompt_file=prompt.txt",
                                      "max_new_tokens=4", "stream=false"])
    main()
    assert capsys.readouterr().out == expected

    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    monkeypatch.setattr(sys, "argv", ["mft-generate", f"run_dir={gen_run_dir}", "prompt_file=latin1.txt"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    assert "prompt_file=latin1.txt: not UTF-8 text (byte 3" in capsys.readouterr().err
