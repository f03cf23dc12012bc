"""mft-generate's chat format with every tokenizer version: prompts equal to mistral-common's own
(inference mode) encoding, and answers in each version's tool-call format parsed back into calls."""

import functools
import io
import json

import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import (
    Function,
    FunctionCall,
    Tool,
    ToolCall,
)
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mft.data.tokenizer import BUILTIN, load_tokenizer
from mft.generate.chat import ChatFormat, ChatSession, TextStreamer

VERSIONS = ["v1", "v2", "v3", "v7", "v3-tekken", "v11-tekken", "v13-tekken", "v15-tekken"]
SYSTEM = "You answer in one short sentence."
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def formats(tekken_files):
    return {name: ChatFormat(load_tokenizer(tekken_files.get(name) or BUILTIN[name])) for name in VERSIONS}


def text_ids(fmt, text):
    return fmt.tokenizer.encode_text(text, bos=False, eos=False)


def call_answer(fmt, version, name, arguments, call_id):
    """A tool call as the model writes it in each version: a JSON list after [TOOL_CALLS] (v2-v7),
    name [CALL_ID] id [ARGS] json (v11), name [ARGS] json (v13+)."""
    if version < 11:
        return [fmt.tool_calls_id, *text_ids(fmt, json.dumps([{"name": name, "arguments": arguments, "id": call_id}]))]
    with_id = [fmt.call_id_id, *text_ids(fmt, call_id)] if version == 11 else []
    return [fmt.tool_calls_id, *text_ids(fmt, name), *with_id, fmt.args_id, *text_ids(fmt, json.dumps(arguments))]


@functools.cache
def reference(path):
    return MistralTokenizer.from_file(path, mode=ValidationMode.test)


def reference_prompt(fmt, messages, tools):
    """mistral-common, inference mode, on the conversation built from its own message classes."""
    return reference(fmt.tokenizer.path).encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens


@pytest.mark.parametrize("name", VERSIONS)
def test_prompts_equal_mistral_common_and_calls_round_trip(formats, name):
    fmt = formats[name]
    version = int(fmt.tokenizer.version[1:])
    tools = [TOOL] if version >= 2 else None
    call_id = "aB3dE5gH7"
    answers = [text_ids(fmt, "Rain, 12 degrees.")]
    if tools:
        answers.insert(0, call_answer(fmt, version, "get_weather", {"city": "Köln"}, call_id))
    prompts = []

    def model(prompt):
        prompts.append(prompt)
        return answers[len(prompts) - 1]

    session = ChatSession(fmt, system=SYSTEM, tools=tools)
    session.add_user("Weather in Köln?")
    reply = session.respond(model)
    history = [SystemMessage(content=SYSTEM), UserMessage(content="Weather in Köln?")]
    mc_tools = [Tool(function=Function(**TOOL["function"]))] if tools else None
    assert prompts[0] == reference_prompt(fmt, history, mc_tools)
    if tools:
        assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Köln"})]
        if version >= 13:  # the model writes no id; one is made up for the result to name
            call_id = reply.tool_calls[0].id
        assert reply.tool_calls[0].id == call_id and len(call_id) == 9
        session.add_tool_result(reply.tool_calls[0], {"celsius": 12, "sky": "rain"})
        reply = session.respond(model)
        history += [AssistantMessage(tool_calls=[ToolCall(id=call_id, function=FunctionCall(
                        name="get_weather", arguments='{"city": "Köln"}'))]),
                    ToolMessage(tool_call_id=call_id, name="get_weather", content='{"celsius": 12, "sky": "rain"}')]
        assert prompts[1] == reference_prompt(fmt, history, mc_tools)
    assert reply.content == "Rain, 12 degrees." and not reply.tool_calls
    # Where the system prompt goes: its own block from v7 on, inside the user turn before.
    text = "".join(fmt.tokenizer.decode(prompts[-1], keep_special=True).replace("\u2581", " ").split())
    assert (f"[SYSTEM_PROMPT]{''.join(SYSTEM.split())}[/SYSTEM_PROMPT]" in text) == (version >= 7)


def test_reasoning_answers_keep_thinking_apart(formats):
    fmt = formats["v13-tekken"]
    begin, end = fmt.think_ids
    thought = text_ids(fmt, "The user wants Köln; call the tool.")
    ids = [begin, *thought, end, *call_answer(fmt, 13, "get_weather", {"city": "Köln"}, "unused")]
    reply = fmt.parse(ids)
    assert reply.thinking == "The user wants Köln; call the tool." and reply.content == ""
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", {"city": "Köln"})]
    assert len(reply.tool_calls[0].id) == 9  # v13 writes no id: one is made up for the result
    answer = [begin, *thought, end, *text_ids(fmt, "It rains.")]
    assert (fmt.parse(answer).thinking, fmt.parse(answer).content) == ("The user wants Köln; call the tool.", "It rains.")
    assert "thinking" not in fmt.parse(answer).to_message()
    out = io.StringIO()
    streamer = TextStreamer(fmt, out)
    for token in answer:
        streamer(0, token)
    streamer.finish()
    assert out.getvalue() == "It rains."  # the thinking is not printed as the answer


def test_v11_calls_with_ids_and_unparsable_calls(formats):
    fmt = formats["v11-tekken"]
    two = [*call_answer(fmt, 11, "get_weather", {"city": "Oslo"}, "OsloCall1"),
           *call_answer(fmt, 11, "get_weather", {"city": "Rome"}, "RomeCall2")]
    assert [(c.arguments["city"], c.id) for c in fmt.parse(two).tool_calls] == [("Oslo", "OsloCall1"), ("Rome", "RomeCall2")]
    broken = [fmt.tool_calls_id, *text_ids(fmt, "get_weather"), fmt.args_id, *text_ids(fmt, "{not json")]
    reply = fmt.parse(broken)
    assert not reply.tool_calls and "get_weather" in reply.content  # kept as text, nothing lost
