"""Mistral tokenizers: a thin wrapper over mistral-common that also says which tokens to train on.

mistral-common is the reference encoder. `Tokenizer.encode_chat` runs mistral-common's own request
normalizer and its own per-message encoders, in the order `encode_instruct` uses them, so the ids
are exactly what mistral-common produces for the same conversation; walking the messages ourselves
is what tells us which span each message produced, hence the supervision mask.

Every version mistral-common encodes works the same way, because the encoders are the version's
own: SentencePiece v1, v2, v3, v7 and tekken v3, v7, v11, v13, v15 (the version is the file's:
tekken.json's "config"."version", the SentencePiece file's .model.vN suffix). What differs by
version (where the system prompt and the tool definitions go, the tool-call layout, [THINK]
blocks, v15's [MODEL_SETTINGS]) is mistral-common's business, not ours.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mistral_common
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    UATS,
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import (
    ChatCompletionRequest,
    InstructRequest,
)
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import is_tekken

from mft.data.samples import RowError
from mft.data.tokenizer_files import find_tokenizer_file
from mft.utils.errors import MftError

_DATA = Path(mistral_common.__file__).parent / "data"
# Named tokenizers: every file the mistral-common wheel carries, so no network is needed. The
# "-mm" files are the same vocabularies with an image encoder (Pixtral); text encodes the same.
BUILTIN = {
    "v1": _DATA / "tokenizer.model.v1",
    "v2": _DATA / "mistral_instruct_tokenizer_240216.model.v2",
    "v3": _DATA / "mistral_instruct_tokenizer_240323.model.v3",
    "v7": _DATA / "mistral_instruct_tokenizer_241114.model.v7",
    "v7-mm": _DATA / "mistral_instruct_tokenizer_241114.model.v7m1",
    "v3-tekken": _DATA / "tekken_240718.json",
    "v3-tekken-mm": _DATA / "tekken_240911.json",
}
# Literal strings users paste into text that look like control tokens. Which of them really are
# control tokens depends on the tokenizer (v1 writes "[INST]" as plain text in its own format).
CONTROL_STRINGS = ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
                   "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]")


class Tokenizer:
    """A loaded Mistral tokenizer: text and chat encoding with a per-token supervision mask."""

    def __init__(self, mistral: MistralTokenizer, path: str):
        self.mistral = mistral  # the underlying mistral-common object (finetuning validation mode)
        self.path = path
        self._instruct = mistral.instruct_tokenizer
        self._raw = mistral.instruct_tokenizer.tokenizer
        # mistral-common's own normalizer for this version, built to keep FinetuningAssistantMessage
        # (and so each assistant message's weight) through its merging of consecutive messages. v15
        # builds its [MODEL_SETTINGS] (reasoning effort) with the file's model_settings_builder.
        settings_builder = self._raw.model_settings_builder
        default = get_normalizer(self._raw.version, settings_builder)
        self._normalizer = type(default)(
            UserMessage, FinetuningAssistantMessage, ToolMessage, SystemMessage, InstructRequest[UATS, Tool],
            settings_builder,
        )
        self.control_ids = _control_ids(self._raw)
        self.has_thinking = {"[THINK]", "[/THINK]"} <= set(self.control_ids)
        self._control_re = re.compile("|".join(re.escape(s) for s in sorted(self.control_ids, key=len, reverse=True)))

    @property
    def vocab_size(self) -> int:
        return self._raw.n_words

    @property
    def bos_id(self) -> int:
        return self._raw.bos_id

    @property
    def eos_id(self) -> int:
        return self._raw.eos_id

    @property
    def version(self) -> str:
        return self._raw.version.value

    def __repr__(self) -> str:
        return f"Tokenizer({self.version}, vocab={self.vocab_size}, path={self.path!r})"

    def encode_text(self, text: str, bos: bool = True, eos: bool = True, control: str = "warn") -> list[int]:
        """Encode raw text. control="warn" (default): strings such as "[INST]" stay plain text;
        control="map": each literal control string becomes its control token (see encode_mapped)."""
        if control == "map":
            return self.encode_mapped(text, bos, eos)
        return self._raw.encode(text, bos=bos, eos=eos)

    def find_control_strings(self, text: str) -> list[str]:
        """The literal control strings in `text` that this tokenizer has real control tokens for."""
        return self._control_re.findall(text) if self.control_ids else []

    def encode_mapped(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Text with literal control strings mapped to the real control tokens.

        The text between control strings is encoded piece by piece with the spaces that touch a
        control string removed, which is how mistral-common lays out its own chat format
        ("<s>[INST] hi [/INST] ok</s>" -> the ids of a user "hi" / assistant "ok" conversation).
        A leading "<s>" replaces the BOS that would be added, a trailing "</s>" the EOS.
        """
        parts = self._control_re.split(text)
        controls = self._control_re.findall(text)
        has_bos = bool(controls) and controls[0] == "<s>" and not parts[0].strip(" ")
        has_eos = bool(controls) and controls[-1] == "</s>" and not parts[-1].strip(" ")
        ids: list[int] = [self.bos_id] if bos and not has_bos else []
        for i, part in enumerate(parts):
            part = part.strip(" ")
            if part:
                ids.extend(self._raw.encode(part, bos=False, eos=False))
            if i < len(controls):
                ids.append(self.control_ids[controls[i]])
        if eos and not has_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        policy = SpecialTokenPolicy.KEEP if keep_special else SpecialTokenPolicy.IGNORE
        return self._raw.decode(list(ids), special_token_policy=policy)

    def encode_chat(
        self, messages: Sequence[Any], tools: Sequence[Any] = (), reasoning_effort: str | None = None
    ) -> tuple[list[int], list[bool]]:
        """Encode a conversation exactly as mistral-common does, with its supervision mask.

        `messages`: mft.data.samples.Message objects or mappings in the Mistral fine-tuning format
        (roles system, user, assistant, tool; content a string or a list of text / thinking chunks;
        assistant `tool_calls` and `weight`; tool `tool_call_id`). `tools`: the function specs
        ({"type": "function", "function": {...}}). `reasoning_effort`: v15 only (None: the file's
        default). The mask is True on the tokens of assistant messages (thinking, content, tool
        calls and EOS) whose weight is not 0; system prompts, tool definitions, model settings,
        prompts and tool results are context. Validate samples first (mft.data.samples):
        mistral-common asserts on malformed input.
        """
        converted = [_to_mistral(m) for m in messages]
        if not self.has_thinking and any(_has_thinking(m) for m in converted):
            raise RowError("thinking_unsupported", f"thinking chunks need a tokenizer with [THINK] and [/THINK] "
                                                   f"tokens; {Path(self.path).name} ({self.version}) has none")
        request = ChatCompletionRequest(
            messages=converted,
            tools=[Tool.model_validate(t) for t in tools] or None,
            reasoning_effort=reasoning_effort,
        )
        instruct = self._normalizer.from_chat_completion_request(request)
        self._instruct.validate_messages(instruct.messages)
        first_user, last_user = self._instruct.find_first_last_user(instruct)
        ids = list(self._instruct.start())
        mask = [False] * len(ids)
        for i, msg in enumerate(instruct.messages):
            supervised = False
            if isinstance(msg, UserMessage):
                toks, _, _ = self._instruct.encode_user_message(
                    msg,
                    instruct.available_tools,
                    i == last_user,
                    i == first_user,
                    system_prompt=instruct.system_prompt,
                    force_img_first=True,
                    settings=instruct.settings,
                )
            elif isinstance(msg, AssistantMessage):
                toks = self._instruct.encode_assistant_message(msg, i < last_user)
                supervised = getattr(msg, "weight", None) != 0
            elif isinstance(msg, ToolMessage):
                toks, _, _ = self._instruct.encode_tool_message(msg, i < last_user)
            elif isinstance(msg, SystemMessage):  # v7+: [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT]
                toks, _ = self._instruct.encode_system_message(msg)
            else:
                raise TypeError(f"unsupported message type {type(msg).__name__}")
            ids.extend(toks)
            mask.extend([supervised] * len(toks))
        return ids, mask


def _control_ids(raw) -> dict[str, int]:
    """Control strings this tokenizer has a real token for (get_special_token answers unk otherwise)."""
    known = {s.value for s in SpecialTokens}
    out = {}
    for s in CONTROL_STRINGS:
        if s not in known:
            continue
        try:
            token = raw.get_special_token(s)
        except Exception:  # noqa: BLE001 - tekken raises for tokens it lacks
            continue
        if token not in (None, raw.unk_id):
            out[s] = token
    return out


def _has_thinking(message: Any) -> bool:
    return isinstance(message.content, list) and any(isinstance(c, ThinkChunk) for c in message.content)


def _to_chunk(chunk: Any) -> TextChunk | ThinkChunk:
    """An mft Chunk, or a mapping {"type": "text", "text"} / {"type": "thinking", "thinking", "closed"}."""
    if isinstance(chunk, Mapping):
        if chunk.get("type") == "thinking":
            return ThinkChunk(thinking=chunk["thinking"], closed=chunk.get("closed", True))
        return TextChunk(text=chunk["text"])
    if chunk.type == "thinking":
        return ThinkChunk(thinking=chunk.text, closed=chunk.closed)
    return TextChunk(text=chunk.text)


def _to_mistral(message: Any):
    """An mft Message (or a mapping in the same shape) -> the mistral-common message object."""
    if isinstance(message, Mapping):
        get = message.get
    else:
        get = lambda k: getattr(message, k, None)  # noqa: E731
    role, content = get("role"), get("content")
    if isinstance(content, (list, tuple)):
        content = [_to_chunk(c) for c in content]
    if role == "system":
        return SystemMessage(content=content)
    if role == "user":
        return UserMessage(content=content)
    if role == "assistant":
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            if not isinstance(c, Mapping)
            else ToolCall(id=c.get("id", "null"), function=FunctionCall(**c["function"]))
            for c in (get("tool_calls") or ())
        ]
        return FinetuningAssistantMessage(content=content, tool_calls=calls or None, weight=get("weight"))
    if role == "tool":
        return ToolMessage(content=content, tool_call_id=get("tool_call_id"), name=get("name"))
    raise MftError(f"message role {role!r} is not supported; expected one of system, user, assistant, tool")


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load a BUILTIN name ("v1", "v2", "v3", "v7", "v7-mm", "v3-tekken", "v3-tekken-mm"), a tokenizer
    file (tekken.json of any version, tokenizer.model.vN), or a model folder holding one."""
    spec = str(spec)
    path = BUILTIN.get(spec) or Path(spec).expanduser()
    if path.is_dir():
        path = _find_in_folder(path)
    if not (is_tekken(path) or is_sentencepiece(path)):
        raise MftError(
            f"tokenizer {spec!r} not understood: expected one of {', '.join(BUILTIN)}, a Mistral "
            "tokenizer file (tokenizer.model.vN, tokenizer.model, tekken.json) or a model folder "
            "containing one"
        )
    try:
        mistral = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    except ImportError as e:  # sentencepiece is an optional extra of mistral-common
        raise MftError(f"cannot load tokenizer {path}: {e}") from None
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:  # a damaged or truncated file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MftError(f"cannot load tokenizer {path}: the file is damaged or not a Mistral tokenizer "
                       f"({detail}).") from None
    return Tokenizer(mistral, str(path))


def _find_in_folder(folder: Path) -> Path:
    found = find_tokenizer_file(folder)
    if found is None:
        raise MftError(
            f"model folder {folder} has no Mistral tokenizer file "
            "(tekken.json, tokenizer.model.vN or tokenizer.model)"
        )
    return found


def check_vocab(tokenizer: Tokenizer, vocab_size: int, model_name: str, tokenizer_spec: str) -> None:
    """A model must have an embedding row for every id the tokenizer can produce."""
    if tokenizer.vocab_size > vocab_size:
        raise MftError(
            f"tokenizer {tokenizer_spec!r} has {tokenizer.vocab_size} tokens but model={model_name} has "
            f"vocab_size={vocab_size}; use the model's own tokenizer or set model.vocab_size."
        )
