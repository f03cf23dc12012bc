"""Rows -> validated samples that remember their source `file:line`.

A row is one decoded record of a data file (a JSONL line, a CSV row, a Parquet row). It becomes
one of two samples:

- `TextSample`: raw text (pretraining, or an AutoTrain-style `text` column, or an Alpaca row
  rendered with the classic prompt template): BOS + text + EOS, every token trained on.
- `ChatSample`: a conversation in the Mistral fine-tuning format: roles system, user,
  assistant, tool; top-level `tools` (function specs); assistant `tool_calls`; tool results
  with `tool_call_id`; per-assistant-message `weight` 0 or 1. `content` is a string or a list
  of chunks: {"type": "text", "text": ...} anywhere, and the reasoning of Magistral-style models,
  {"type": "thinking", "thinking": ..., "closed": true}, in assistant (and v13 system) messages.
  A v15 chat may name its `reasoning_effort`. Alpaca rows can map here too.

Every defect raises `RowError(code, message)`; callers add the `file:line`. The codes name the
kind of defect (for counts in reports); the messages say what is wrong and what was expected.
The rules are at least as strict as mistral-common's finetuning validator, so a row that passes
here encodes there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "text", "chat", "alpaca")
ALPACA_STYLES = ("chat", "prompt")
# Keys a chat row may carry besides its data; anything else is a mistake we report (a misspelt
# "tool" for "tools" would otherwise drop the function specs without a word).
_CHAT_META_KEYS = {"id", "metadata", "source"}
_CHAT_KEYS = {"messages", "tools", "reasoning_effort"}
_MESSAGE_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", "weight"},
    "tool": {"role", "content", "tool_call_id", "name"},
}
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # function names (mistral-common's rule)
TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # tool call ids of tokenizers v3 to v11 (v13 encodes none)
NULL_ID = "null"  # allowed only on the final assistant message (mistral-common's finetuning rule), before v13
CHUNK_TYPES = ("text", "thinking")  # a chunk {"type": t, t: "..."} keeps its string under its type's name

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the Mistral format carries it


@dataclass(frozen=True)
class Chunk:
    """One piece of a message's content: plain text, or reasoning ("thinking", in [THINK] ... [/THINK])."""

    type: str  # "text" | "thinking"
    text: str
    closed: bool = True  # thinking only: False leaves the [THINK] block open (no [/THINK])


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str | tuple[Chunk, ...] | None = None  # None only for an assistant message that only calls tools
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # tool results
    name: str | None = None  # tool results (optional function name)
    weight: int | None = None  # assistant messages: 0 = context only, 1 or None = trained on

    def texts(self) -> list[str]:
        """Every string the content holds (text and thinking), for scans of a row's text."""
        if self.content is None:
            return []
        return [self.content] if isinstance(self.content, str) else [c.text for c in self.content]


@dataclass(frozen=True)
class TextSample:
    """Raw text for pretraining-style training: every token is supervised."""

    text: str
    source: str  # "path:line"


@dataclass(frozen=True)
class ChatSample:
    """A conversation ending with an assistant message: assistant tokens are supervised."""

    messages: tuple[Message, ...]
    source: str  # "path:line"
    tools: tuple[Any, ...] = field(default=(), compare=False)  # function specs ({"type", "function"})
    reasoning_effort: str | None = None  # v15 tokenizers: encoded in [MODEL_SETTINGS]; None: the file's default


Sample = TextSample | ChatSample


class RowError(ValueError):
    """Why one row is invalid: a short code (the kind of defect) and a message for the user."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RowOptions:
    """How rows of one source become samples (per file, from the data config)."""

    format: str = "auto"  # auto | text | chat | alpaca
    text_column: str = "text"
    alpaca: str = "chat"  # chat: user = instruction (+ input), assistant = output | prompt: classic template
    tokenizer_version: str = "v3"  # decides which tool, system and thinking features are allowed


def row_kind(row: Mapping[str, Any], opts: RowOptions) -> str:
    """The kind of a row: "chat", "alpaca" or "text" (format=auto looks at its keys)."""
    if opts.format != "auto":
        return opts.format
    if "messages" in row:
        if opts.text_column in row:
            raise RowError("ambiguous", f"expected one of 'messages' or '{opts.text_column}', got both")
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if opts.text_column in row:
        return "text"
    raise RowError(
        "unknown_format",
        f"expected 'messages' (chat), '{opts.text_column}' (text) or 'instruction' + 'output' (Alpaca), "
        f"got keys {_show(sorted(row), 200)}",
    )


def column_problem(columns: list[str], opts: RowOptions) -> str | None:
    """Why no row of a table with these columns (a CSV header, a Parquet schema) can be read with
    these options, or None: said once for the file rather than once per row."""
    have, text = set(columns), opts.text_column
    alpaca = {"instruction", "output"} <= have
    missing = {
        "text": None if text in have else f"no column '{text}' (data.text_column / --text-column)",
        "chat": None if "messages" in have else "no column 'messages'",
        "alpaca": None if alpaca else "Alpaca rows need the columns 'instruction' and 'output'",
        "auto": None if text in have or "messages" in have or alpaca
        else f"no column '{text}' (data.text_column / --text-column), 'messages', or 'instruction' + 'output'",
    }.get(opts.format)
    return f"{missing}; its columns are {', '.join(map(repr, columns))}" if missing else None


def parse_row(row: Any, source: str, opts: RowOptions = RowOptions()) -> Sample:
    """One decoded row -> a Sample, or RowError saying what is wrong with it."""
    if not isinstance(row, Mapping):
        raise RowError("not_object", f"expected a JSON object, got {_type(row)}")
    kind = row_kind(row, opts)
    if kind == "text":
        text = row.get(opts.text_column)
        if opts.text_column not in row:
            raise RowError("missing_key", f"missing '{opts.text_column}' (data.text_column), got keys {_show(sorted(row), 200)}")
        if not isinstance(text, str):
            raise RowError("wrong_type", f"'{opts.text_column}' must be a string, got {_type(text)}")
        if not text.strip():
            raise RowError("empty_content", f"'{opts.text_column}' is empty")
        return TextSample(text=text, source=source)
    if kind == "alpaca":
        return _parse_alpaca(row, source, opts)
    if kind == "chat":
        return _parse_chat(row, source, opts.tokenizer_version)
    raise RowError("bad_format", f"format {kind!r}: expected one of {', '.join(FORMATS)}")


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any, limit: int = 80) -> str:
    """A value quoted into a message, cut short: a row may hold megabytes where a name belongs."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


# ---------------------------------------------------------------- Alpaca


def _parse_alpaca(row: Mapping[str, Any], source: str, opts: RowOptions) -> Sample:
    fields_ = {}
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = row.get(key)
        if value is None and not required:
            value = ""
        if value is None:
            raise RowError("missing_key", f"Alpaca row: missing '{key}'")
        if not isinstance(value, str):
            raise RowError("wrong_type", f"Alpaca row: '{key}' must be a string, got {_type(value)}")
        if required and not value.strip():
            raise RowError("empty_content", f"Alpaca row: '{key}' is empty")
        fields_[key] = value
    if opts.alpaca == "prompt":
        template = ALPACA_PROMPT_WITH_INPUT if fields_["input"].strip() else ALPACA_PROMPT
        return TextSample(template.format(**fields_), source)
    if opts.alpaca != "chat":
        raise RowError("bad_format", f"alpaca={opts.alpaca!r}: expected one of {', '.join(ALPACA_STYLES)}")
    user = fields_["instruction"] + (f"\n\n{fields_['input']}" if fields_["input"].strip() else "")
    return ChatSample((Message("user", user), Message("assistant", fields_["output"])), source)


# ---------------------------------------------------------------- chat


def version_number(version: str) -> int:
    """A tokenizer version as a number ("v13" -> 13), to compare versions."""
    return int(version.removeprefix("v"))


def _parse_chat(row: Mapping[str, Any], source: str, version: str) -> ChatSample:
    if extra := sorted(set(row) - _CHAT_KEYS - _CHAT_META_KEYS):
        raise RowError("unknown_key", f"unsupported key(s) {extra} (expected 'messages' and optional 'tools', "
                                      "'reasoning_effort')")
    raw_tools = row.get("tools")
    tools: tuple[Any, ...] = ()
    if raw_tools is not None:
        tools = _parse_tools(raw_tools, version)
    effort = row.get("reasoning_effort")
    if effort is not None:
        if version_number(version) < 15:
            raise RowError("reasoning_effort_unsupported", f"'reasoning_effort' needs a v15 tokenizer; model.tokenizer is {version}")
        if not isinstance(effort, str):
            raise RowError("wrong_type", f"'reasoning_effort' must be a string (e.g. \"high\" or \"none\"), got {_type(effort)}")
    messages = _parse_messages(row.get("messages"), version)
    _check_structure(messages, {t["function"]["name"] for t in tools} if tools else None, version)
    return ChatSample(messages, source, tools, effort)


def _needs_tools_support(version: str, what: str) -> None:
    if version == "v1":
        raise RowError(
            "tools_unsupported",
            f"{what} need a v3 or newer tokenizer; model.tokenizer is v1 (use v3 or v7, e.g. Mistral-7B-v0.3)",
        )


def _parse_tools(raw: Any, version: str) -> tuple[Any, ...]:
    if not isinstance(raw, list):
        raise RowError("bad_tool_schema", f"'tools' must be a list of function specs, got {_type(raw)}")
    if not raw:
        return ()
    _needs_tools_support(version, "tool definitions")
    names = set()
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise RowError("bad_tool_schema", f"{where}: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        if tool.get("type", "function") != "function" or set(tool) - {"type", "function"}:
            raise RowError("bad_tool_schema", f"{where}: only keys 'type' (= \"function\") and 'function' are allowed")
        fn = tool["function"]
        if extra := sorted(set(fn) - {"name", "description", "parameters", "strict"}):
            raise RowError("bad_tool_schema", f"{where}.function: unsupported key(s) {extra}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RowError("bad_tool_schema", f"{where}.function.name {_show(name)}: expected 1-64 of a-z A-Z 0-9 _ -")
        if name in names:
            raise RowError("bad_tool_schema", f"{where}: function {_show(name)} is defined twice")
        names.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise RowError("bad_tool_schema", f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if not isinstance(params, dict):
            raise RowError("bad_tool_schema", f"{where}.function.parameters must be a JSON schema object, got {_type(params)}")
        problem = _schema_problem(params)
        if problem:
            raise RowError("bad_tool_schema", f"{where}.function.parameters is not a valid JSON schema: {problem}")
    return tuple(raw)


def _schema_problem(schema: dict) -> str | None:
    import jsonschema  # a dependency of mistral-common; imported here to keep plain rows fast

    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        return e.message
    return None


def _parse_messages(raw: Any, version: str) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise RowError("wrong_type", f"'messages' must be a non-empty list, got {_type(raw) if not isinstance(raw, list) else 'an empty list'}")
    messages = []
    for i, m in enumerate(raw):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{where}: expected an object with 'role' and 'content', got {_type(m)}")
        role = m.get("role")
        if role is None:
            raise RowError("unknown_role", f"{where}: missing 'role' (expected one of {', '.join(ROLES)})")
        if not isinstance(role, str) or role not in _MESSAGE_KEYS:
            raise RowError("unknown_role", f"{where}: unknown role {_show(role)} (expected one of {', '.join(ROLES)})")
        if extra := sorted(set(m) - _MESSAGE_KEYS[role]):
            raise RowError("unknown_key", f"{where} ({role}): unsupported key(s) {extra}")
        where = f"{where} ({role})"
        if role == "assistant":
            messages.append(_parse_assistant(m, where, version, is_last=i == len(raw) - 1))
            continue
        content = _parse_content(m.get("content"), where, role, version)
        if role == "tool":
            _needs_tools_support(version, "tool results")
            call_id, name = m.get("tool_call_id"), m.get("name")
            if not isinstance(call_id, str) or not call_id:
                raise RowError("bad_tool_call_id", f"{where}: 'tool_call_id' must name the tool call it answers")
            if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
                raise RowError("wrong_type", f"{where}: 'name' {_show(name)}: expected 1-64 of a-z A-Z 0-9 _ -")
            messages.append(Message("tool", content, tool_call_id=call_id, name=name))
        else:
            messages.append(Message(role, content))
    return tuple(messages)


def _check_content(content: Any, where: str) -> None:
    if not isinstance(content, str):
        if content is None:
            raise RowError("empty_content", f"{where}: 'content' is missing")
        raise RowError("wrong_type", f"{where}: 'content' must be a string or a list of chunks, got {_type(content)}")
    if not content.strip():
        raise RowError("empty_content", f"{where}: 'content' is empty")


def _parse_content(content: Any, where: str, role: str, version: str) -> str | tuple[Chunk, ...]:
    """A string, or a list of text (and, where the role and tokenizer allow, thinking) chunks."""
    if not isinstance(content, list):
        _check_content(content, where)
        return content
    if not content:
        raise RowError("empty_content", f"{where}: 'content' is an empty list")
    chunks = []
    for k, chunk in enumerate(content):
        here = f"{where} content[{k}]"
        kind = chunk.get("type") if isinstance(chunk, dict) else None
        if kind not in CHUNK_TYPES:
            raise RowError("bad_chunk", f"{here}: expected {{\"type\": \"text\", \"text\": \"...\"}} or "
                                        f"{{\"type\": \"thinking\", \"thinking\": \"...\"}}, got {_show(chunk)}")
        if extra := sorted(set(chunk) - {"type", kind} - ({"closed"} if kind == "thinking" else set())):
            raise RowError("unknown_key", f"{here} ({kind}): unsupported key(s) {extra}")
        if kind == "thinking":
            _check_thinking_allowed(role, version, here)
        text, closed = chunk.get(kind), chunk.get("closed", True)
        if not isinstance(text, str):
            raise RowError("wrong_type" if text is not None else "empty_content",
                           f"{here}: '{kind}' must be a string, got {_type(text)}")
        if not text.strip():
            raise RowError("empty_content", f"{here}: '{kind}' is empty")
        if not isinstance(closed, bool):
            raise RowError("wrong_type", f"{here}: 'closed' must be true or false, got {_show(closed)}")
        chunks.append(Chunk(kind, text, closed))
    return tuple(chunks)


def _check_thinking_allowed(role: str, version: str, where: str) -> None:
    """mistral-common encodes thinking from v13 on, in assistant messages, and in system messages
    of v13 only (v15 refuses them there); user and tool messages never hold it."""
    if role not in ("assistant", "system"):
        raise RowError("bad_chunk", f"{where}: thinking chunks belong to assistant messages, not {role} messages")
    if version_number(version) < 13:
        raise RowError("thinking_unsupported", f"{where}: thinking chunks need a v13 or newer tokenizer with [THINK] "
                                               f"tokens (Magistral and later); model.tokenizer is {version}")
    if role == "system" and version_number(version) >= 15:
        raise RowError("thinking_unsupported", f"{where}: {version} tokenizers take no thinking in system messages")


def _parse_assistant(m: dict, where: str, version: str, is_last: bool) -> Message:
    content, raw_calls, weight = m.get("content"), m.get("tool_calls"), m.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise RowError("bad_weight", f"{where}: 'weight' must be 0 or 1, got {_show(weight)}")
    calls: tuple[ToolCall, ...] = ()
    if raw_calls is not None:
        calls = _parse_tool_calls(raw_calls, where, version, is_last)
    if not calls:
        content = _parse_content(content, where, "assistant", version)
    elif content is not None and content != "":
        content = _parse_content(content, where, "assistant", version)
        if version_number(version) < 7:
            raise RowError(
                "content_and_tool_calls",
                f"{where}: 'content' and 'tool_calls' in one message need a v7 tokenizer; split them in two messages",
            )
    else:
        content = None
    return Message("assistant", content, tool_calls=calls, weight=None if weight is None else int(weight))


def _parse_tool_calls(raw: Any, where: str, version: str, is_last: bool) -> tuple[ToolCall, ...]:
    if not isinstance(raw, list):
        raise RowError("wrong_type", f"{where}: 'tool_calls' must be a list, got {_type(raw)}")
    if not raw:
        return ()
    _needs_tools_support(version, "tool calls")
    calls = []
    for j, call in enumerate(raw):
        here = f"{where} tool_calls[{j}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise RowError("wrong_type", f"{here}: expected {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
        if extra := sorted(set(call) - {"id", "type", "function"}):
            raise RowError("unknown_key", f"{here}: unsupported key(s) {extra}")
        if call.get("type", "function") != "function":
            raise RowError("wrong_type", f"{here}: 'type' must be \"function\", got {_show(call.get('type'))}")
        fn = call["function"]
        if extra := sorted(set(fn) - {"name", "arguments"}):
            raise RowError("unknown_key", f"{here}.function: unsupported key(s) {extra}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise RowError("bad_tool_call", f"{here}: function name {_show(name)}: expected 1-64 of a-z A-Z 0-9 _ -")
        args = fn.get("arguments")
        if isinstance(args, dict):
            args = json.dumps(args)  # what mistral-common's FunctionCall does with an object
        elif isinstance(args, str):
            try:
                parsed = json.loads(args)
            except json.JSONDecodeError as e:
                raise RowError("bad_tool_call", f"{here}: 'arguments' is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(parsed, dict):
                raise RowError("bad_tool_call", f"{here}: 'arguments' must be a JSON object, got {_type(parsed)}")
        else:
            raise RowError("wrong_type", f"{here}: 'arguments' must be a JSON object or a JSON string, got {_type(args)}")
        call_id = call.get("id", NULL_ID)
        _check_call_id(call_id, here, version, is_last)
        calls.append(ToolCall(call_id, name, args))
    return tuple(calls)


def _check_call_id(call_id: Any, where: str, version: str, is_last: bool) -> None:
    """v3 to v11 encode ids of 9 letters and digits, which only the final message may omit; v13 encodes
    none but pairs calls with results by id, so every call needs one, of any form."""
    if not isinstance(call_id, str):
        raise RowError("bad_tool_call_id", f"{where}: 'id' must be a string, got {_type(call_id)}")
    if version_number(version) >= 13:
        if not call_id.strip() or call_id == NULL_ID:
            raise RowError("bad_tool_call_id", f"{where}: missing 'id' ({version} tokenizers need one on every tool call)")
        return
    if call_id == NULL_ID and not is_last:
        raise RowError("bad_tool_call_id", f"{where}: missing 'id' (only the final assistant message may omit it)")
    if call_id != NULL_ID and not TOOL_CALL_ID.match(call_id):
        raise RowError("bad_tool_call_id", f"{where}: id {_show(call_id)} must be 9 characters of a-z, A-Z, 0-9")


def _check_structure(messages: tuple[Message, ...], tool_names: set[str] | None, version: str) -> None:
    """Order rules: system first, then a user turn; tool results answer the calls just made; the
    conversation ends with an assistant message and trains on at least one of them."""
    roles = [m.role for m in messages]
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise RowError("bad_order", f"message {i}: a system message may only be the first message")
    first = 1 if roles[0] == "system" else 0
    if first == len(roles):
        raise RowError("no_assistant", "no assistant message: nothing to train on")
    if roles[first] != "user":
        raise RowError("bad_order", f"message {first}: the first message (after an optional system message) must be from the user, got {roles[first]!r}")
    if "assistant" not in roles:
        raise RowError("no_assistant", "no assistant message: nothing to train on")
    if roles[-1] != "assistant":
        raise RowError("last_not_assistant", f"the last message must be from the assistant, got {roles[-1]!r}")
    if all(m.weight == 0 for m in messages if m.role == "assistant"):
        raise RowError("no_assistant", "every assistant message has weight 0: nothing to train on")

    pending: dict[str, str] = {}  # call id -> function name, awaiting a result
    pending_at = -1
    for i, m in enumerate(messages):
        if m.role == "tool":
            if m.tool_call_id not in pending:
                if roles[i - 1] not in ("assistant", "tool") or pending_at < 0:
                    raise RowError("orphan_tool_result", f"message {i} (tool): a tool result must follow an assistant message with tool_calls")
                raise RowError("bad_tool_call_id", f"message {i} (tool): tool_call_id {_show(m.tool_call_id)} answers no open tool call of message {pending_at}")
            del pending[m.tool_call_id]
            continue
        if pending:
            raise RowError(
                "tool_call_without_result",
                f"message {pending_at}: tool call(s) {sorted(pending)} have no tool result before message {i}",
            )
        pending_at = -1
        if m.role == "assistant" and m.tool_calls:
            ids = [c.id for c in m.tool_calls]
            if len(set(ids)) != len(ids):
                raise RowError("bad_tool_call_id", f"message {i}: tool call ids repeat: {ids}")
            for c in m.tool_calls:
                if tool_names is not None and c.name not in tool_names:
                    raise RowError("bad_tool_call", f"message {i}: calls {_show(c.name)}, which 'tools' does not define (defined: {sorted(tool_names)})")
            pending, pending_at = {c.id: c.name for c in m.tool_calls}, i
    # The final assistant message may end on tool calls without results (train on the call).
    if version == "v2":
        _check_v2_results(roles)


def _check_v2_results(roles: list[str]) -> None:
    """v2 encodes the tool results after the last user message as one list per assistant turn, and
    mistral-common refuses more than one result in such a turn."""
    last_user = len(roles) - 1 - roles[::-1].index("user")
    run = 0
    for i in range(last_user + 1, len(roles)):
        run = run + 1 if roles[i] == "tool" else 0
        if run > 1:
            raise RowError("tools_unsupported", f"message {i} (tool): a v2 tokenizer takes one tool result per "
                                                "assistant turn after the last user message; use v3 or newer")
