"""JSONL rows -> validated samples that remember their source `file:line`.

Two kinds of row: `{"text": str}` (pretraining) and `{"messages": [{"role", "content"}, ...]}`
(instruct). Every bad row is reported at its own line, all in one MftError, so a user fixes a
file in one pass instead of one error per run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mft.errors import MftError

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 10
_MESSAGE_KEYS = {"role", "content"}
_NOT_YET = {"tools": "tool definitions are not supported yet"}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


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


Sample = TextSample | ChatSample


class _RowError(ValueError):
    """Why one row is invalid; read_samples adds the file:line."""


def parse_row(row: Any, source: str) -> Sample:
    """One decoded JSON value -> a Sample, or _RowError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise _RowError(f"expected a JSON object, got {type(row).__name__}")
    for key, why in _NOT_YET.items():
        if key in row:
            raise _RowError(f"key {key!r}: {why}")
    has_text, has_messages = "text" in row, "messages" in row
    if has_text == has_messages:
        raise _RowError(
            "expected exactly one of 'text' or 'messages', got "
            + ("both" if has_text else f"neither (keys: {sorted(row)})")
        )
    if has_text:
        text = row["text"]
        if not isinstance(text, str) or not text:
            raise _RowError("'text' must be a non-empty string")
        return TextSample(text=text, source=source)
    return ChatSample(messages=_parse_messages(row["messages"]), source=source)


def _parse_messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise _RowError("'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise _RowError(f"{where}: expected an object with 'role' and 'content'")
        if extra := sorted(set(m) - _MESSAGE_KEYS):
            raise _RowError(f"{where}: unsupported key(s) {extra} (expected 'role' and 'content')")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _RowError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise _RowError(f"{where} ({role}): 'content' must be a non-empty string")
        if role == "system" and i != 0:
            raise _RowError(f"{where}: a system message may only be the first message")
        messages.append(Message(role, content))
    roles = [m.role for m in messages]
    if "assistant" not in roles:
        raise _RowError("no assistant message: nothing to train on")
    if roles[-1] != "assistant":
        raise _RowError(f"the last message must be from the assistant, got {roles[-1]!r}")
    if roles[1 if roles[0] == "system" else 0] != "user":
        raise _RowError("the first message (after an optional system message) must be from the user")
    return tuple(messages)


def read_jsonl(path: str | Path, errors: list[str]) -> list[Sample]:
    """Read one JSONL file; append `file:line: reason` to `errors` for each bad row."""
    path = Path(path)
    if not path.is_file():
        raise MftError(f"data file not found: {path}")
    samples: list[Sample] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                samples.append(parse_row(json.loads(line), source))
            except json.JSONDecodeError as e:
                errors.append(f"{source}: invalid JSON ({e.msg} at column {e.colno})")
            except _RowError as e:
                errors.append(f"{source}: {e}")
    return samples


def read_samples(paths: Iterable[str | Path]) -> list[Sample]:
    """Read and validate every file; raise one MftError listing the first bad rows of all."""
    errors: list[str] = []
    samples = [s for p in paths for s in read_jsonl(p, errors)]
    if errors:
        shown = "; ".join(errors[:MAX_REPORTED])
        more = f" (first {MAX_REPORTED} shown)" if len(errors) > MAX_REPORTED else ""
        raise MftError(f"{len(errors)} invalid data row(s){more}: {shown}")
    return samples
