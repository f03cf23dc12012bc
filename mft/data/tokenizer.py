"""Mistral tokenizers: a thin wrapper over mistral-common that also says which tokens to train on.

mistral-common is the reference encoder. `Tokenizer.encode_chat` runs mistral-common's own request
normalizer and its own per-message encoders, in the order `encode_instruct` uses them, so the ids
are exactly what mistral-common produces for the same conversation; walking the messages ourselves
is what tells us which span each message produced, hence the supervision mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mistral_common
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import is_tekken

from mft.errors import MftError

_DATA = Path(mistral_common.__file__).parent / "data"
# Named tokenizers: the files the mistral-common wheel carries, so no network is needed.
BUILTIN = {
    "v1": _DATA / "tokenizer.model.v1",
    "v3": _DATA / "mistral_instruct_tokenizer_240323.model.v3",
    "v7": _DATA / "mistral_instruct_tokenizer_241114.model.v7",
    "v3-tekken": _DATA / "tekken_240718.json",
}
# In a model folder, the first name that exists wins; then any other Mistral tokenizer file.
_FOLDER_PREFERENCE = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2")
_ROLES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


class Tokenizer:
    """A loaded Mistral tokenizer: text and chat encoding with a per-token supervision mask."""

    def __init__(self, mistral: MistralTokenizer, path: str):
        self.mistral = mistral  # the underlying mistral-common object (finetuning validation mode)
        self.path = path
        self._instruct = mistral.instruct_tokenizer
        self._raw = mistral.instruct_tokenizer.tokenizer
        self._normalizer = get_normalizer(self._raw.version, self._raw.model_settings_builder)

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

    def encode_text(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """Encode raw text; control strings such as "[INST]" in it stay plain text."""
        return self._raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        policy = SpecialTokenPolicy.KEEP if keep_special else SpecialTokenPolicy.IGNORE
        return self._raw.decode(list(ids), special_token_policy=policy)

    def encode_chat(self, messages: Sequence[Any]) -> tuple[list[int], list[bool]]:
        """Encode a conversation as mistral-common does; mask is True on assistant tokens + EOS.

        `messages` are mappings or objects with `role` and `content`. Roles: system, user,
        assistant. Tool calls, tool results and per-message weights slot in here later: each
        new message kind is one more branch below, choosing its mask value.
        """
        request = ChatCompletionRequest(messages=[_to_mistral(m) for m in messages])
        instruct = self._normalizer.from_chat_completion_request(request)
        first_user, last_user = self._instruct.find_first_last_user(instruct)
        ids = list(self._instruct.start())
        mask = [False] * len(ids)
        for i, msg in enumerate(instruct.messages):
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
                supervised = False
            elif isinstance(msg, AssistantMessage):
                toks = self._instruct.encode_assistant_message(msg, i < last_user)
                supervised = True
            elif isinstance(msg, SystemMessage):  # v7+: [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT]
                toks, _ = self._instruct.encode_system_message(msg)
                supervised = False
            else:
                raise TypeError(f"unsupported message type {type(msg).__name__}")
            ids.extend(toks)
            mask.extend([supervised] * len(toks))
        return ids, mask


def _to_mistral(message: Any):
    get = message.get if isinstance(message, Mapping) else lambda k: getattr(message, k, None)
    role, content = get("role"), get("content")
    if role not in _ROLES:
        raise MftError(f"message role {role!r} is not supported; expected one of {sorted(_ROLES)}")
    return _ROLES[role](content=content)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load "v1" | "v3" | "v7" | "v3-tekken", a tokenizer file, or a model folder holding one."""
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
    return Tokenizer(mistral, str(path))


def _find_in_folder(folder: Path) -> Path:
    for name in _FOLDER_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.iterdir() if is_tekken(p) or is_sentencepiece(p))
    if not others:
        raise MftError(
            f"model folder {folder} has no Mistral tokenizer file "
            "(tekken.json, tokenizer.model.vN or tokenizer.model)"
        )
    # Prefer a versioned .model.vN over the bare tokenizer.model (which mistral-common reads as v1).
    return sorted(others, key=lambda p: (p.name == "tokenizer.model", p.name))[0]
