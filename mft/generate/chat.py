"""Chat in the Mistral instruct format: prompts for generation, tool-call parsing, streaming text.

Conversations are lists of OpenAI-style message dicts (roles system, user, assistant, tool;
assistant `tool_calls`, tool `tool_call_id`) plus tool definitions
({"type": "function", "function": {...}}). mistral-common encodes them, in its inference
("test") validation mode, with the tokenizer file's own version: the conversation ends with a
user message or tool results and the prompt stops where the assistant's answer starts. A
generated answer is text, possibly after a [THINK] ... [/THINK] block (reasoning models, v13+),
possibly followed by tool calls, which `ChatFormat.parse` turns into ToolCalls: [TOOL_CALLS] and a
JSON list (v2 to v7), or [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} per call (v11) and
[TOOL_CALLS]name[ARGS]{...} (v13 on).
"""

from __future__ import annotations

import json
import random
import string
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, TextIO

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mft.data.tokenizer import Tokenizer
from mft.utils.errors import MftError


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class Reply:
    """One assistant answer: its text, and the tool calls it makes (then the text is usually empty)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    thinking: str = ""  # the [THINK] block of a reasoning model, without its markers

    def to_message(self) -> dict[str, Any]:
        """The answer as the next prompt's history: content and tool calls. The thinking stays out
        (shorter prompts; the next answer reasons afresh)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return message


_CALL_IDS = random.Random()


def new_call_id() -> str:
    """Nine letters and digits: the call id format of Mistral's v3+ tokenizers."""
    return "".join(_CALL_IDS.choices(string.ascii_letters + string.digits, k=9))


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first stop string in it (the stop string excluded)."""
    cuts = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


class ChatFormat:
    """Encode conversations for generation and parse answers, with one Mistral tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # The same tokenizer file in mistral-common's inference mode (no trailing assistant message).
        self._mistral = MistralTokenizer.from_file(tokenizer.path, mode=ValidationMode.test)
        self._raw = self._mistral.instruct_tokenizer.tokenizer
        self.tool_calls_id = self._special("[TOOL_CALLS]")
        self.args_id = self._special("[ARGS]")  # v11+: a call is name [CALL_ID] id [ARGS] json
        self.call_id_id = self._special("[CALL_ID]")
        self.think_ids = (self._special("[THINK]"), self._special("[/THINK]"))

    def _special(self, text: str) -> Optional[int]:
        try:
            token = self._raw.get_special_token(text)
        except Exception:  # noqa: BLE001 - tekken raises for a token it lacks, sentencepiece may too
            return None
        return None if token == self._raw.unk_id else token

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_id]

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Mapping[str, Any]]] = None) -> list[int]:
        """Prompt ids for the assistant's next answer (BOS, tools, [INST] ... [/INST] or tool results)."""
        try:
            request = ChatCompletionRequest.from_openai([dict(m) for m in messages], tools=list(tools) if tools else None)
            return self._mistral.encode_chat_completion(request).tokens
        except MftError:
            raise
        except Exception as e:  # noqa: BLE001 - pydantic and mistral-common validation errors
            raise MftError(f"cannot encode the conversation: {e}") from None

    def encode_text(self, text: str) -> list[int]:
        """A plain completion prompt: BOS + text, no instruct format."""
        return self.tokenizer.encode_text(text, bos=True, eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._raw.decode(list(ids), special_token_policy=SpecialTokenPolicy.IGNORE)

    def parse(self, ids: Sequence[int], stop_strings: Sequence[str] = ()) -> Reply:
        """Split a generated answer into thinking, text and tool calls.

        A call without an id gets a fresh one (the next prompt must name it). Output after
        [TOOL_CALLS] that is not a call in the tokenizer's format stays text, so nothing the
        model wrote is lost.
        """
        generated = list(ids)
        thinking, ids = self._split_thinking(generated)
        if self.tool_calls_id is None or self.tool_calls_id not in ids:
            return Reply(cut_at_stop(self.decode(ids), stop_strings), [], generated, thinking)
        cut = ids.index(self.tool_calls_id)
        content = self.decode(ids[:cut]).strip()
        # v11+ put [TOOL_CALLS] before each call; a JSON-list model may repeat it too.
        parts, current = [], []
        for token in ids[cut + 1:]:
            if token == self.tool_calls_id:
                parts.append(current)
                current = []
            else:
                current.append(token)
        parts.append(current)
        calls: list[ToolCall] = []
        for part in parts:
            if not self.decode(part).strip():
                continue
            parsed = self._parse_named_call(part) if self.args_id in part else _parse_calls(self.decode(part).strip())
            if parsed is None:
                return Reply(cut_at_stop(self.decode(ids), stop_strings), [], generated, thinking)
            calls.extend(parsed)
        return Reply(content, calls, generated, thinking)

    def _split_thinking(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text of a [THINK] ... [/THINK] block (unclosed: to the end), and the ids without it."""
        begin, end = self.think_ids
        if begin is None or begin not in ids:
            return "", ids
        start = ids.index(begin)
        stop = ids.index(end, start) if end in ids[start:] else len(ids)
        return self.decode(ids[start + 1:stop]).strip(), ids[:start] + ids[stop + 1:]

    def _parse_named_call(self, part: list[int]) -> Optional[list[ToolCall]]:
        """One v11+ call: name [CALL_ID] id [ARGS] json (v11) or name [ARGS] json (v13 on)."""
        k = part.index(self.args_id)
        head, call_id = part[:k], ""
        if self.call_id_id is not None and self.call_id_id in head:
            j = head.index(self.call_id_id)
            head, call_id = head[:j], self.decode(head[j + 1:]).strip()
        name = self.decode(head).strip()
        try:
            arguments = json.loads(self.decode(part[k + 1:]))
        except json.JSONDecodeError:
            return None
        if not name or not isinstance(arguments, dict):
            return None
        return [ToolCall(name, arguments, call_id or new_call_id())]


def _parse_calls(text: str) -> Optional[list[ToolCall]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        call_id = item.get("id")
        calls.append(ToolCall(item["name"], arguments, call_id if isinstance(call_id, str) and call_id else new_call_id()))
    return calls


GenerateFn = Callable[[list[int]], list[int]]  # prompt ids -> generated ids (without the stop token)


class ChatSession:
    """A multi-turn conversation: system prompt, tools, and the messages so far."""

    def __init__(
        self,
        fmt: ChatFormat,
        system: Optional[str] = None,
        tools: Optional[Sequence[Mapping]] = None,
        stop_strings: Sequence[str] = (),
    ):
        self.fmt = fmt
        self.system = system
        self.stop_strings = list(stop_strings)
        self.tools = list(tools) if tools else None
        self.messages: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.messages = []

    def all_messages(self) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt(self) -> list[int]:
        return self.fmt.encode(self.all_messages(), self.tools)

    def add_user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def add_tool_result(self, call: ToolCall, result: Any) -> None:
        content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})

    def respond(self, generate: GenerateFn) -> Reply:
        """Generate the assistant's next answer and append it to the conversation."""
        reply = self.fmt.parse(generate(self.prompt()), self.stop_strings)
        self.messages.append(reply.to_message())
        return reply


ToolRunner = Callable[[ToolCall], Any]  # runs a call, returns its result (any JSON value or text)


def chat_loop(
    session: ChatSession,
    generate: GenerateFn,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    run_tool: Optional[ToolRunner] = None,
    streaming: bool = False,
) -> None:
    """The interactive chat: read a user turn, answer, repeat; /reset clears, /exit or EOF ends.

    A tool-call answer is printed as JSON, one call a line; each call's result comes from
    `run_tool`, or else is read from the user ("tool <name>> "), and is fed back so the model
    answers with it. With `streaming`, `generate` prints the answer text itself (a full line).
    """
    while True:
        try:
            text = read("user> ")
        except EOFError:
            break
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            print("(conversation cleared)", file=out)
            continue
        if not command:
            continue
        session.add_user(text)
        reply = session.respond(generate)
        while reply.tool_calls:
            for call in reply.tool_calls:
                print(json.dumps({"tool_call": call.to_json()}, ensure_ascii=False), file=out, flush=True)
                try:
                    result = run_tool(call) if run_tool else read(f"tool {call.name}> ")
                except EOFError:
                    return
                session.add_tool_result(call, result)
            reply = session.respond(generate)
        if not streaming:
            print(f"assistant> {reply.content}", file=out, flush=True)


class TextStreamer:
    """Print row 0's text as its tokens arrive, up to a stop string or a [TOOL_CALLS] token; a
    [THINK] ... [/THINK] block is not printed (Reply.thinking has it).

    Decodes the whole answer so far and prints what is new, so multi-token characters and
    SentencePiece's leading spaces come out right. Holds back a trailing incomplete character
    and, with stop strings, the last len(longest stop) - 1 characters, which could start one;
    `finish()` prints what is held back (cut at the first stop string).
    """

    def __init__(self, fmt: ChatFormat, out: TextIO = sys.stdout, prefix: str = "", stop_strings: Sequence[str] = ()):
        self.fmt, self.out, self.prefix = fmt, out, prefix
        self.stop_strings = [s for s in stop_strings if s]
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.tokens: list[int] = []
        self.printed = 0  # characters of the text written so far
        self.stopped = False
        self.thinking = False  # inside [THINK] ... [/THINK]

    def _write(self, text: str) -> None:
        if text:
            if self.printed == 0 and self.prefix:
                self.out.write(self.prefix)
            self.out.write(text)
            self.out.flush()
            self.printed += len(text)

    def _text(self) -> str:
        return cut_at_stop(self.fmt.decode(self.tokens), self.stop_strings)

    def __call__(self, row: int, token: int) -> None:
        if row != 0 or self.stopped:
            return
        if token == self.fmt.tool_calls_id:
            self.stopped = True
            return
        if token in self.fmt.think_ids:
            self.thinking = token == self.fmt.think_ids[0]
            return
        if self.thinking:
            return
        self.tokens.append(token)
        full = self.fmt.decode(self.tokens)
        text = cut_at_stop(full, self.stop_strings)
        if len(text) < len(full):  # a stop string appeared: print up to it, then nothing more
            self._write(text[self.printed:])
            self.stopped = True
            return
        end = len(text) - self.hold
        if text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        if end > self.printed:
            self._write(text[self.printed:end])

    def finish(self) -> None:
        """Print the held-back end of the text."""
        if self.tokens:
            text = self._text()
            self._write(text[self.printed:])
        self.stopped = True
