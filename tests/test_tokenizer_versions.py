"""Every tokenizer version mistral-common encodes, against mistral-common itself.

For each version (SentencePiece v1, v2, v3, v7, v7-mm; tekken v3, v3-mm, and v7, v11, v13, v15
files built by tests/tekken_files.py) and each chat (the project's fixtures and hand-written chats
for every tool-call format, thinking, unicode), mft's ids must equal mistral-common's
`encode_chat_completion` in finetuning mode on a request built here from the raw row, and the
mask must cover exactly the assistant output: each supervised run, decoded, must read as that
message's output written out by hand from the version's documented format below.
"""

import json
from pathlib import Path

import pytest
from conftest import TEKKEN_VERSIONS, mask_runs
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Tool
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tekken_files import tekken_json, write_tekken

from mft.data.encode import encode_sample
from mft.data.samples import ChatSample, RowError, RowOptions, parse_row, version_number
from mft.data.tokenizer import BUILTIN, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_FILES = ["function_calling_anagram.jsonl", "medical_json_extraction.jsonl", "persona_chat.jsonl",
                 "text_to_sql.jsonl"]
SENTENCEPIECE = ["v1", "v2", "v3", "v7", "v7-mm"]
VERSIONS = SENTENCEPIECE + ["v3-tekken", "v3-tekken-mm", *TEKKEN_VERSIONS]


@pytest.fixture(scope="module")
def loaded(tekken_files):
    """name -> (mft Tokenizer, the MistralTokenizer that mistral-common's from_file made of the same
    file in finetuning mode: the reference, whose encode_chat_completion mft never calls)."""
    out = {}
    for name in VERSIONS:
        path = tekken_files.get(name) or BUILTIN[name]
        tok = load_tokenizer(path)
        assert tok.mistral.mode == ValidationMode.finetuning
        assert tok.mistral.instruct_tokenizer.tokenizer.file_path == Path(path)
        out[name] = (tok, tok.mistral)
    return out


# ---------------------------------------------------------------- the reference


def reference_request(row):
    """The raw row as mistral-common's own message objects (its from_openai readers)."""
    messages = []
    for m in row["messages"]:
        if m["role"] == "assistant":
            base = AssistantMessage.from_openai({k: v for k, v in m.items() if k != "weight"})
            messages.append(FinetuningAssistantMessage(content=base.content, tool_calls=base.tool_calls,
                                                       weight=m.get("weight")))
        else:
            messages.append({"system": SystemMessage, "user": UserMessage, "tool": ToolMessage}[m["role"]].from_openai(m))
    tools = [Tool.from_openai(t) for t in row.get("tools", [])] or None
    return ChatCompletionRequest(messages=messages, tools=tools, reasoning_effort=row.get("reasoning_effort"))


def expected_output(m, version):
    """An assistant message's output as each version's format writes it: thinking in [THINK] ...
    [/THINK], text chunks joined by a blank line (v15: nothing), then tool calls as a JSON list
    after [TOOL_CALLS] (v2 without ids, v3/v7 with them), or per call [TOOL_CALLS]name[CALL_ID]id
    [ARGS]json (v11; no [CALL_ID] for a "null" id) or [TOOL_CALLS]name[ARGS]json (v13+); then </s>."""
    out, texts = "", []
    content = m.get("content") or []
    for chunk in [{"type": "text", "text": content}] if isinstance(content, str) else content:
        if chunk["type"] == "text":
            texts.append(chunk["text"])
            continue
        out += ("" if version >= 15 else "\n\n").join(texts)
        texts = []
        out += "[THINK]" + chunk["thinking"] + ("[/THINK]" if chunk.get("closed", True) else "")
    out += ("" if version >= 15 else "\n\n").join(texts)
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"]), c.get("id", "null"))
             for c in m.get("tool_calls") or []]
    if calls and version < 11:
        listed = [{"name": n, "arguments": a} | ({"id": i} if version >= 3 and i != "null" else {})
                  for n, a, i in calls]
        out += "[TOOL_CALLS]" + json.dumps(listed, ensure_ascii=False)
    for name, args, call_id in calls if version >= 11 else []:
        with_id = f"[CALL_ID]{call_id}" if version == 11 and call_id != "null" else ""
        out += f"[TOOL_CALLS]{name}{with_id}[ARGS]" + json.dumps(args, ensure_ascii=False)
    return out + "</s>"


def render(reference, ids):
    """ids as text, control tokens by name: SentencePiece's KEEP decoding would also spell out
    byte pieces (<0x0A>), so only the special ids are named and the rest decoded as text."""
    raw = reference.instruct_tokenizer.tokenizer
    out, span = "", []
    for i in ids:
        if raw.is_special(i):
            out += raw.decode(span) + raw.id_to_piece(i)
            span = []
        else:
            span.append(i)
    return out + raw.decode(span)


def _squeeze(text):
    """SentencePiece pieces carry the spaces around control tokens differently: compare without them."""
    return "".join(text.replace("\u2581", " ").split())


def check_chat(name, loaded, row):
    """ids equal to mistral-common's; supervised runs equal to the hand-written outputs of the
    trained assistant messages; everything else is context and holds every other text."""
    tok, reference = loaded[name]
    sample = parse_row(row, "chat:1", RowOptions(tokenizer_version=tok.version))
    enc = encode_sample(sample, tok)
    assert enc.ids == reference.encode_chat_completion(reference_request(row)).tokens
    version, messages = version_number(tok.version), row["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    # v2 drops the tool calls (and results) before the last user message from the encoding.
    trained = [m for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) == 1
               and not (version == 2 and m.get("tool_calls") and i < last_user)]
    runs = [render(reference, enc.ids[a:b]) for a, b in mask_runs(enc.mask)]
    expected = [expected_output(m, version) for m in trained]
    if name in SENTENCEPIECE:
        runs, expected = [_squeeze(r) for r in runs], [_squeeze(e) for e in expected]
    assert runs == expected
    context = [i for i, m in zip(enc.ids, enc.mask) if not m]
    assert tok.eos_id not in context or any(m.get("weight") == 0 for m in messages)
    context_text = _squeeze(render(reference, context))
    for i, m in enumerate(messages):
        if m["role"] in ("user", "system") or m["role"] == "tool" and not (version == 2 and i < last_user):
            for text in sample.messages[i].texts():
                assert _squeeze(text) in context_text, (m, context_text)


# ---------------------------------------------------------------- chats


def call(call_id, name, **args):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "convert", "description": "Convert a temperature",
                                      "parameters": {"type": "object", "properties": {"celsius": {"type": "number"}}}}},
]
PLAIN = {"messages": [
    {"role": "system", "content": "Réponds brièvement. 简短回答。"},
    {"role": "user", "content": "Quelle est la capitale de la France ? 🇫🇷"},
    {"role": "assistant", "content": "Paris — « la Ville Lumière »."},
    {"role": "user", "content": [{"type": "text", "text": "Et du Japon ?"}, {"type": "text", "text": "日本の首都"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "東京 (Tokyo)."}]},
]}
ONE_CALL_PER_TURN = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "You may call functions."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [call("aB3dE5gH7", "get_weather", city="Paris")]},
    {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "aB3dE5gH7"},
    {"role": "assistant", "content": "21 °C in Paris."},
    {"role": "user", "content": "In Fahrenheit?"},
    {"role": "assistant", "tool_calls": [call("Zz9Yy8Xx7", "convert", celsius=21)], "weight": 0},
    {"role": "tool", "content": "69.8", "tool_call_id": "Zz9Yy8Xx7"},
    {"role": "assistant", "content": "69.8 °F."},
]}
PARALLEL_CALLS = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Oslo and Köln?"},
    {"role": "assistant", "tool_calls": [call("OsloCall1", "get_weather", city="Oslo"),
                                         call("KolnCall2", "get_weather", city="Köln")]},
    {"role": "tool", "content": '{"celsius": 3}', "tool_call_id": "OsloCall1"},
    {"role": "tool", "content": "Köln: 12 °C", "tool_call_id": "KolnCall2"},
    {"role": "assistant", "content": "Oslo 3 °C, Köln 12 °C."},
    {"role": "user", "content": "And Rome?"},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                           "arguments": '{"city": "Rome"}'}}]},
]}
CONTENT_AND_CALL = {"tools": TOOLS, "messages": [
    {"role": "system", "content": [{"type": "text", "text": "Be helpful."}, {"type": "text", "text": "Use tools."}]},
    {"role": "user", "content": "Weather in Lima?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [call("LimaCall1", "get_weather", city="Lima")]},
    {"role": "tool", "content": "18", "tool_call_id": "LimaCall1"},
    {"role": "assistant", "content": "18 °C in Lima."},
]}
THINKING = {"tools": TOOLS, "messages": [
    {"role": "system", "content": [{"type": "text", "text": "Think first."},
                                   {"type": "thinking", "thinking": "a scratch pad in the system prompt"}]},
    {"role": "user", "content": "What is 17 * 23?"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391."},
                                      {"type": "text", "text": "391"}]},
    {"role": "user", "content": "Weather in Nice?"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "I need the weather tool."}],
     "tool_calls": [call("call_nice", "get_weather", city="Nice")]},
    {"role": "tool", "content": "24", "tool_call_id": "call_nice"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "Not closed", "closed": False},
                                      {"type": "text", "text": "24 °C, sunny."}]},
]}
# v13+: ids of any form, none encoded; results reordered by mistral-common to the calls' order.
FREE_IDS = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Rome and Bern?"},
    {"role": "assistant", "tool_calls": [call("call_rome", "get_weather", city="Rome"),
                                         call("b", "get_weather", city="Bern")]},
    {"role": "tool", "content": "Bern 9", "tool_call_id": "b"},
    {"role": "tool", "content": "Rome 20", "tool_call_id": "call_rome"},
    {"role": "assistant", "content": "Rome 20 °C, Bern 9 °C.", "weight": 1},
]}


def chats_for(version, think):
    """The hand-written chats a version can encode."""
    chats = {"plain": PLAIN}
    if version >= 2:
        chats["one_call_per_turn"] = ONE_CALL_PER_TURN
    if 3 <= version < 13:
        chats["parallel_calls"] = PARALLEL_CALLS
    if version >= 7:
        chats["content_and_call"] = CONTENT_AND_CALL
    if version >= 13:
        chats["free_ids"] = FREE_IDS
    if version == 13 and think:
        chats["thinking"] = THINKING
    if version >= 15:  # thinking, but not in the system prompt, and the chat's own reasoning effort
        chats["thinking"] = {**THINKING, "messages": [{"role": "system", "content": "Think first."}, *THINKING["messages"][1:]],
                             "reasoning_effort": "none"}
    return chats


@pytest.mark.parametrize("name", VERSIONS)
def test_chats_equal_mistral_common_with_exact_masks(loaded, name):
    tok = loaded[name][0]
    think = TEKKEN_VERSIONS.get(name, ("", True))[1]
    for chat, row in chats_for(version_number(tok.version), think).items():
        try:
            check_chat(name, loaded, row)
        except AssertionError as e:
            raise AssertionError(f"{name} / {chat}: {e}") from e


@pytest.mark.parametrize("name", VERSIONS)
def test_fixture_chats_equal_mistral_common_with_exact_masks(loaded, name):
    tok = loaded[name][0]
    encoded = 0
    for file in FIXTURE_FILES:
        for line, text in enumerate((FIXTURES / file).read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(text)
            if tok.version == "v1" and row.get("tools"):
                with pytest.raises(RowError, match="need a v3 or newer tokenizer"):
                    parse_row(row, f"{file}:{line}", RowOptions(tokenizer_version="v1"))
                continue
            check_chat(name, loaded, row)
            encoded += 1
    assert encoded >= 18


# ---------------------------------------------------------------- versions of files


@pytest.mark.parametrize("name", list(TEKKEN_VERSIONS))
def test_version_is_read_from_the_tekken_file(loaded, tekken_files, name):
    version, think = TEKKEN_VERSIONS[name]
    tok = loaded[name][0]
    assert json.loads(tekken_files[name].read_text())["config"]["version"] == version
    assert tok.version == version
    assert load_tokenizer(tekken_files[name].parent).version == version  # the model folder
    assert tok.has_thinking == (think and version_number(version) >= 13)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (131072, 1, 2)


def test_builtin_names_load_every_shipped_file(loaded):
    shipped = {p.name for p in BUILTIN["v1"].parent.iterdir() if p.is_file()}
    assert {p.name for p in BUILTIN.values()} == shipped
    assert {name: loaded[name][0].version for name in BUILTIN} == {
        "v1": "v1", "v2": "v2", "v3": "v3", "v7": "v7", "v7-mm": "v7", "v3-tekken": "v3", "v3-tekken-mm": "v3"}


def test_a_version_mistral_common_does_not_know_is_a_clear_error(tmp_path):
    data = tekken_json("v7")
    data["config"]["version"] = "v99"
    (tmp_path / "tekken.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="damaged or not a Mistral tokenizer.*Unknown version: v99"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- per-version rules


def test_v13_places_tools_after_the_system_prompt_v11_before_the_last_user_message(loaded):
    texts = {}
    for name in ("v11-tekken", "v13-tekken"):
        tok = loaded[name][0]
        ids, _ = tok.encode_chat(parse_row(ONE_CALL_PER_TURN, "x:1", RowOptions(tokenizer_version=tok.version)).messages,
                                 TOOLS)
        texts[name] = tok.decode(ids, keep_special=True)
    assert texts["v13-tekken"].index("[AVAILABLE_TOOLS]") == texts["v13-tekken"].index("[/SYSTEM_PROMPT]") + len("[/SYSTEM_PROMPT]")
    assert texts["v11-tekken"].index("[AVAILABLE_TOOLS]") > texts["v11-tekken"].index("21 °C in Paris.")
    assert "[CALL_ID]aB3dE5gH7[ARGS]" in texts["v11-tekken"] and "[TOOL_RESULTS]aB3dE5gH7[TOOL_CONTENT]" in texts["v11-tekken"]
    assert "aB3dE5gH7" not in texts["v13-tekken"] and '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}' in texts["v13-tekken"]


def test_thinking_needs_v13_with_think_tokens(loaded):
    for version in ("v3", "v7", "v11"):
        with pytest.raises(RowError, match="thinking chunks need a v13 or newer tokenizer") as err:
            parse_row(THINKING, "f.jsonl:4", RowOptions(tokenizer_version=version))
        assert err.value.code == "thinking_unsupported"
    tok = loaded["v13-tekken-nothink"][0]
    sample = parse_row(THINKING, "f.jsonl:4", RowOptions(tokenizer_version="v13"))
    with pytest.raises(RowError, match=r"\[THINK\] and \[/THINK\] tokens; tekken.json \(v13\) has none"):
        encode_sample(sample, tok)
    with pytest.raises(RowError, match="v15 tokenizers take no thinking in system messages"):
        parse_row(THINKING, "f.jsonl:4", RowOptions(tokenizer_version="v15"))
    user_thinking = {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]},
                                  {"role": "assistant", "content": "y"}]}
    with pytest.raises(RowError, match=r"message 0 \(user\) content\[0\]: thinking chunks belong to assistant"):
        parse_row(user_thinking, "f.jsonl:4", RowOptions(tokenizer_version="v13"))


@pytest.mark.parametrize("chunk,match", [
    ({"type": "image_url", "image_url": "x"}, r"content\[1\]: expected \{\"type\": \"text\""),
    ({"type": "text", "text": " "}, r"content\[1\]: 'text' is empty"),
    ({"type": "text", "txt": "a"}, r"content\[1\] \(text\): unsupported key\(s\) \['txt'\]"),
    ({"type": "thinking", "thinking": "a", "closed": "yes"}, r"content\[1\]: 'closed' must be true or false"),
    ({"type": "thinking", "thinking": ["a"]}, r"content\[1\]: 'thinking' must be a string, got list"),
])
def test_bad_chunks_name_the_message_and_chunk(chunk, match):
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": [{"type": "text", "text": "a"}, chunk]}]}
    with pytest.raises(RowError, match=r"message 1 \(assistant\) " + match):
        parse_row(row, "f.jsonl:2", RowOptions(tokenizer_version="v13"))


def test_tool_call_ids_follow_the_version(loaded):
    """v3-v11: 9 letters and digits, "null" only on the final message; v13: any id, always one."""
    with pytest.raises(RowError, match="must be 9 characters"):
        parse_row(FREE_IDS, "f:1", RowOptions(tokenizer_version="v11"))
    final_without_id = {"tools": TOOLS, "messages": PARALLEL_CALLS["messages"]}
    with pytest.raises(RowError, match=r"message 6 \(assistant\) tool_calls\[0\]: missing 'id' \(v13 tokenizers need one"):
        parse_row(final_without_id, "f:1", RowOptions(tokenizer_version="v13"))
    ref = loaded["v13-tekken"][1]
    with pytest.raises(Exception, match="Tool call id must be a non-empty string"):
        ref.encode_chat_completion(reference_request(final_without_id))  # mistral-common refuses it too


def test_v2_takes_one_tool_result_per_turn_after_the_last_user(loaded):
    row = {"tools": TOOLS, "messages": PARALLEL_CALLS["messages"][:5]}
    with pytest.raises(RowError, match=r"message 3 \(tool\): a v2 tokenizer takes one tool result per assistant turn"):
        parse_row(row, "f:1", RowOptions(tokenizer_version="v2"))
    with pytest.raises(Exception, match="does not support multiple tool results"):
        loaded["v2"][1].encode_chat_completion(reference_request(row))  # mistral-common's own rule


def test_v15_reasoning_effort(loaded):
    tok, reference = loaded["v15-tekken"]
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    for effort, written in ((None, "high"), ("none", "none")):
        sample = parse_row({**row, "reasoning_effort": effort} if effort else row, "f:1", RowOptions(tokenizer_version="v15"))
        enc = encode_sample(sample, tok)
        assert enc.ids == reference.encode_chat_completion(reference_request({**row, "reasoning_effort": effort})).tokens
        context = tok.decode([i for i, m in zip(enc.ids, enc.mask) if not m], keep_special=True)
        assert context == f'<s>[MODEL_SETTINGS]{{"reasoning_effort": "{written}"}}[/MODEL_SETTINGS][INST]Hi[/INST]'
    with pytest.raises(RowError, match="'reasoning_effort' needs a v15 tokenizer; model.tokenizer is v13"):
        parse_row({**row, "reasoning_effort": "high"}, "f:1", RowOptions(tokenizer_version="v13"))
    with pytest.raises(Exception, match="reasoning_effort should be one of"):
        encode_sample(parse_row({**row, "reasoning_effort": "max"}, "f:1", RowOptions(tokenizer_version="v15")), tok)


def test_a_chat_sample_of_chunks_keeps_them(loaded):
    sample = parse_row(THINKING, "f:1", RowOptions(tokenizer_version="v13"))
    assert isinstance(sample, ChatSample)
    think, text = sample.messages[2].content
    assert (think.type, think.closed, text.type, text.text) == ("thinking", True, "text", "391")
    assert sample.messages[-1].content[0].closed is False
    assert sample.messages[2].texts() == ["17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391.", "391"]


def test_write_tekken_writes_a_file_mistral_common_reads(tmp_path):
    path = write_tekken(tmp_path / "model", "v11")
    reference = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
    assert type(reference.instruct_tokenizer).__name__ == "InstructTokenizerV11"


# ---------------------------------------------------------------- a model folder's own tokenizer


def test_model_tokenizer_resolver_prefers_the_checkpoint_folder(tmp_path, tekken_files):
    from mft.data.tokenizer_files import model_tokenizer

    empty = tmp_path / "weights-only"
    empty.mkdir()
    (empty / "tokenizer.json").write_text("{}")  # a Hugging Face tokenizer is not a Mistral one
    folder = tekken_files["v13-tekken"].parent
    assert model_tokenizer(str(folder), "v3") == str(folder)
    assert model_tokenizer(str(empty), "v3") == "v3"
    assert model_tokenizer(None, "v1") == "v1"
    assert model_tokenizer(str(tmp_path / "missing"), "v3") == "v3"
    spm = tmp_path / "spm"
    spm.mkdir()
    (spm / "tokenizer.model.v3").write_bytes(BUILTIN["v3"].read_bytes())
    assert model_tokenizer(str(spm), "v1") == str(spm)


def test_presets_default_to_the_checkpoints_tokenizer_and_an_explicit_one_wins(tekken_files, tmp_path):
    from mft.compose import compose, to_dataclass
    from mft.config import register_configs

    register_configs()
    folder = str(tekken_files["v7-tekken"].parent)
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()

    def tokenizer(*overrides):
        return to_dataclass(compose("train", list(overrides))).model.tokenizer

    assert tokenizer("model=mistral-7b-v0.3", f"model.checkpoint={folder}") == folder
    assert tokenizer("model=mistral-7b-v0.1", f"model.checkpoint={folder}") == folder
    assert tokenizer("model=mistral-7b-v0.3", f"model.checkpoint={empty}") == "v3"
    assert tokenizer("model=mistral-7b-v0.1") == "v1"
    assert tokenizer("model=mistral-7b-v0.3") == "v3"
    assert tokenizer("model=mistral-7b-v0.3", f"model.checkpoint={folder}", "model.tokenizer=v7") == "v7"
    assert load_tokenizer(tokenizer("model=mistral-7b-v0.3", f"model.checkpoint={folder}")).version == "v7"


# ---------------------------------------------------------------- data files with thinking


def test_validate_data_reports_thinking_rows_at_their_lines(tmp_path, tekken_files, capsys):
    from mft.data.validate import main

    data = tmp_path / "reasoning.jsonl"
    rows = [THINKING, {"messages": [{"role": "user", "content": "2 + 2?"},
                                    {"role": "assistant", "content": [{"type": "thinking", "thinking": ""},
                                                                      {"type": "text", "text": "4"}]}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main([str(data), "--tokenizer", str(tekken_files["v13-tekken"].parent), "--seq-len", "512"]) == 1
    out = capsys.readouterr().out
    assert f"{data}:2: message 1 (assistant) content[0]: 'thinking' is empty" in out
    assert f"{data}:1:" not in out
    assert main([str(data), "--tokenizer", str(tekken_files["v13-tekken-nothink"]), "--seq-len", "512"]) == 1
    assert f"{data}:1: thinking chunks need a tokenizer with [THINK] and [/THINK] tokens" in capsys.readouterr().out
    assert main([str(data), "--tokenizer", "v7", "--seq-len", "512"]) == 1
    assert (f"{data}:1: message 0 (system) content[1]: thinking chunks need a v13 or newer tokenizer"
            in capsys.readouterr().out)
