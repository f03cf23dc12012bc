"""mft's chat encoding against mistral-common's own encode_chat_completion (the reference)."""

import functools
import json
import shutil

import pytest
import sentencepiece
from conftest import mask_runs
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mft.data.tokenizer import BUILTIN, load_tokenizer
from mft.utils.errors import MftError

VERSIONS = ["v1", "v3", "v7", "v3-tekken"]
SYSTEM = {"role": "system", "content": "You answer briefly."}
CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    "multi": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "2 + 3 = 5."},
        {"role": "user", "content": "Reverse the words: cat dog sun"},
        {"role": "assistant", "content": "sun dog cat"},
        {"role": "user", "content": "And [INST] this </s>?"},  # control strings stay plain text
        {"role": "assistant", "content": "Plain text: [/INST] <s>"},
    ],
}
CASES = [(name, system) for name in CONVERSATIONS for system in (False, True)]
MC_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


@pytest.fixture(scope="module")
def data_tokenizers():
    return {v: load_tokenizer(v) for v in VERSIONS}


def _messages(name, system):
    return ([SYSTEM] if system else []) + CONVERSATIONS[name]


@functools.cache
def _reference(path):
    return MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)


def _reference_ids(tok, messages):
    """mistral-common, end to end: validator (finetuning mode) + normalizer + encode_instruct."""
    ref = _reference(tok.path)
    request = ChatCompletionRequest(messages=[MC_CLASSES[m["role"]](content=m["content"]) for m in messages])
    return ref.encode_chat_completion(request).tokens


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,system", CASES)
def test_chat_ids_equal_mistral_common(data_tokenizers, version, name, system):
    tok = data_tokenizers[version]
    messages = _messages(name, system)
    ids, mask = tok.encode_chat(messages)
    assert ids == _reference_ids(tok, messages)
    assert len(mask) == len(ids)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name,system", CASES)
def test_chat_mask_covers_exactly_assistant_tokens(data_tokenizers, version, name, system):
    tok = data_tokenizers[version]
    messages = _messages(name, system)
    ids, mask = tok.encode_chat(messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = mask_runs(mask)
    assert len(runs) == len(answers)
    for (start, end), answer in zip(runs, answers):
        assert ids[end - 1] == tok.eos_id  # each answer ends with its EOS, supervised
        assert tok.decode(ids[start : end - 1]).strip() == answer
    # Everything else (BOS, system prompt, [INST] ... [/INST]) is unsupervised and holds no EOS.
    assert not mask[0] and ids[0] == tok.bos_id
    unsupervised = [i for i, m in zip(ids, mask) if not m]
    assert tok.eos_id not in unsupervised
    prompt_text = tok.decode(unsupervised)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"].split()[0] in prompt_text


def test_system_prompt_placement_follows_the_version(data_tokenizers):
    """v1: first user message; v3: last user message; v7: its own [SYSTEM_PROMPT] block."""
    messages = [SYSTEM] + CONVERSATIONS["multi"]
    texts = {v: data_tokenizers[v].decode(data_tokenizers[v].encode_chat(messages)[0], keep_special=True)
             for v in ("v1", "v3", "v7")}
    sys_text = SYSTEM["content"]
    assert texts["v1"].replace("▁", " ").index(sys_text) < texts["v1"].replace("▁", " ").index("Add 2")
    assert texts["v3"].replace("▁", " ").index(sys_text) > texts["v3"].replace("▁", " ").index("sun dog cat")
    assert "[SYSTEM_PROMPT]" in texts["v7"]


@pytest.mark.parametrize("version", ["v1", "v3", "v7"])
def test_text_is_bos_sentencepiece_eos(data_tokenizers, version):
    tok = data_tokenizers[version]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(BUILTIN[version]))
    text = "Hello world. [INST] is plain text here </s>\nnew line"
    assert tok.encode_text(text) == [tok.bos_id, *sp.encode(text), tok.eos_id]
    assert tok.encode_text(text, bos=False, eos=False) == sp.encode(text)
    assert tok.decode(tok.encode_text(text)) == text


def test_attributes(data_tokenizers):
    assert [data_tokenizers[v].version for v in VERSIONS] == ["v1", "v3", "v7", "v3"]
    assert data_tokenizers["v1"].vocab_size == 32000
    assert data_tokenizers["v3"].vocab_size == 32768
    assert data_tokenizers["v3-tekken"].vocab_size == 131072
    for tok in data_tokenizers.values():
        assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_load_from_file_and_folder(tmp_path):
    assert load_tokenizer(str(BUILTIN["v7"])).version == "v7"
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(BUILTIN["v1"], folder / "tokenizer.model")  # HF-style unversioned file
    shutil.copy(BUILTIN["v3"], folder / "tokenizer.model.v3")
    (folder / "tokenizer.json").write_text("{}")  # an HF tokenizer.json is not a Mistral tokenizer
    assert load_tokenizer(folder).path == str(folder / "tokenizer.model.v3")
    shutil.copy(BUILTIN["v3-tekken"], folder / "tekken.json")
    assert load_tokenizer(folder).path == str(folder / "tekken.json")


def test_bad_specs(tmp_path):
    with pytest.raises(MftError, match="v1, v2, v3, v7"):
        load_tokenizer("v42")
    with pytest.raises(MftError, match="no Mistral tokenizer file"):
        load_tokenizer(tmp_path)
    with pytest.raises(MftError, match="message role 'robot'"):
        load_tokenizer("v3").encode_chat([{"role": "robot", "content": "x"}])


# ---------------------------------------------------------------- tools, tool results, weights

TOOLS = [{"type": "function", "function": {
    "name": "generate_anagram", "description": "Generate an anagram of a given word",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}]


def _call(call_id, word):
    return {"id": call_id, "type": "function",
            "function": {"name": "generate_anagram", "arguments": json.dumps({"word": word})}}


TOOL_CONVERSATIONS = {  # (messages, tools)
    "tool_round_trip": ([
        {"role": "system", "content": "You can call functions."},
        {"role": "user", "content": "Anagram of listen?"},
        {"role": "assistant", "tool_calls": [_call("TX92Jm8Zi", "listen")]},
        {"role": "tool", "content": json.dumps({"anagram": "silent"}), "tool_call_id": "TX92Jm8Zi"},
        {"role": "assistant", "content": "It is silent."},
        {"role": "user", "content": "And race?"},
        {"role": "assistant", "tool_calls": [_call("3XhQnxLsT", "race")]},
    ], TOOLS),
    "two_calls_two_results": ([
        {"role": "user", "content": "Anagrams of evil and night?"},
        {"role": "assistant", "tool_calls": [_call("aaaaaaaa1", "evil"), _call("bbbbbbbb2", "night")]},
        {"role": "tool", "content": '{"anagram": "vile"}', "tool_call_id": "aaaaaaaa1"},
        {"role": "tool", "content": "result: thing", "tool_call_id": "bbbbbbbb2"},
        {"role": "assistant", "content": "vile and thing"},
    ], TOOLS),
    "weights": ([
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Greetings"},
        {"role": "assistant", "content": "Hello there, a bad old answer.", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Hello.", "weight": 1},
        {"role": "user", "content": "Once more"},
        {"role": "assistant", "content": "Yo.", "weight": 1},
        {"role": "assistant", "content": "Merged into the answer above.", "weight": 1},
    ], ()),
    "weights_with_tools": ([
        {"role": "user", "content": "Anagram of heart?"},
        {"role": "assistant", "tool_calls": [_call("ccccccccc", "heart")], "weight": 0},
        {"role": "tool", "content": '{"anagram": "earth"}', "tool_call_id": "ccccccccc"},
        {"role": "assistant", "content": "earth"},
    ], TOOLS),
}


def _reference_tool_ids(tok, messages, tools):
    def mc(m):
        if m["role"] == "assistant":
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in m.get("tool_calls", [])]
            return FinetuningAssistantMessage(content=m.get("content"), tool_calls=calls or None, weight=m.get("weight"))
        if m["role"] == "tool":
            return ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"])
        return MC_CLASSES[m["role"]](content=m["content"])

    request = ChatCompletionRequest(messages=[mc(m) for m in messages], tools=[Tool(**t) for t in tools] or None)
    return _reference(tok.path).encode_chat_completion(request).tokens


@pytest.mark.parametrize("version", ["v3", "v7", "v3-tekken"])
@pytest.mark.parametrize("name", TOOL_CONVERSATIONS)
def test_tool_and_weight_ids_equal_mistral_common(data_tokenizers, version, name):
    tok = data_tokenizers[version]
    messages, tools = TOOL_CONVERSATIONS[name]
    ids, mask = tok.encode_chat(messages, tools)
    assert ids == _reference_tool_ids(tok, messages, tools)
    supervised = tok.decode([i for i, m in zip(ids, mask) if m], keep_special=True).replace("\u2581", " ")
    context = tok.decode([i for i, m in zip(ids, mask) if not m], keep_special=True).replace("\u2581", " ")
    assert tok.eos_id not in [i for i, m in zip(ids, mask) if not m] or name.startswith("weights")
    for m in messages:
        trained = m["role"] == "assistant" and m.get("weight", 1) == 1
        texts = [m["content"]] if m.get("content") else []
        texts += [c["function"]["arguments"].split(": ")[1].strip("}") for c in m.get("tool_calls", [])]
        for text in texts:
            assert (text in supervised) == trained, (m, supervised)
            if not trained:
                assert text in context or m["role"] == "system" and version == "v1"
    n_trained = sum(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages)
    assert supervised.count("</s>") == n_trained - (name == "weights")  # the two last answers merge into one
    if tools:
        assert supervised.count("[TOOL_CALLS]") == sum(bool(m.get("tool_calls")) and m.get("weight", 1) == 1
                                                         for m in messages)
        assert "[AVAILABLE_TOOLS]" in context and "[TOOL_RESULTS]" in context


@pytest.mark.parametrize("name", ["weights"])
def test_weights_on_v1(data_tokenizers, name):
    tok = data_tokenizers["v1"]
    messages, _ = TOOL_CONVERSATIONS[name]
    ids, mask = tok.encode_chat(messages)
    assert ids == _reference_tool_ids(tok, messages, ())
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "bad old answer" not in supervised and "Hello." in supervised and "Merged" in supervised


def test_tool_calls_need_v3(tmp_path):
    from mft.data.samples import RowError, RowOptions, parse_row

    messages, tools = TOOL_CONVERSATIONS["tool_round_trip"]
    with pytest.raises(RowError, match="need a v3 or newer tokenizer") as err:
        parse_row({"messages": messages, "tools": tools}, "f:1", RowOptions(tokenizer_version="v1"))
    assert err.value.code == "tools_unsupported"
    with pytest.raises(RowError, match="need a v7 tokenizer"):
        parse_row({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "calling",
                                 "tool_calls": [_call("ccccccccc", "x")]}]}, "f:1", RowOptions(tokenizer_version="v3"))


def test_control_strings_map_to_control_tokens(data_tokenizers):
    tok = data_tokenizers["v3"]
    text = "<s>[INST] What is 2 + 2? [/INST] 4</s>"
    reference = _reference_ids(tok, [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}])
    assert tok.encode_text(text, control="map") == reference
    assert tok.encode_text(text) != reference  # default: plain text, as characters
    assert tok.find_control_strings(text) == ["<s>", "[INST]", "[/INST]", "</s>"]
    assert data_tokenizers["v1"].find_control_strings(text) == ["<s>", "</s>"]  # v1 writes [INST] as text
