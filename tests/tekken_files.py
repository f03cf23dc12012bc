"""Tekken tokenizer files of every version, for tests.

The mistral-common wheel ships only v3 tekken files. A newer tekken.json differs from them in its
"config"."version" and its special tokens, so tests build one from tekken_240718.json: the same
vocabulary, the version written into "config", and the special tokens that version's instruct
tokenizer asks the file for (mistral-common's InstructTokenizerV7/V11/V13/V15 constructors):

- v7: [SYSTEM_PROMPT], [/SYSTEM_PROMPT], [TOOL_CONTENT] (already among the 20 legacy tokens);
- v11: + [ARGS], [CALL_ID] (tool calls as name [CALL_ID] id [ARGS] json);
- v13: the same, + [THINK], [/THINK] when `think` (reasoning models: Magistral);
- v15: + [MODEL_SETTINGS], [/MODEL_SETTINGS], and a model_settings_builder (reasoning effort).

Special tokens are listed with contiguous ranks from 0, as real files do; the extra ones take the
ranks after the 20 legacy tokens, and mistral-common fills the rest up to 1000 itself.
"""

import functools
import json
from pathlib import Path

import mistral_common
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

SOURCE = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
EXTRA_SPECIAL_TOKENS = {
    "v3": (),
    "v7": (),
    "v11": ("[ARGS]", "[CALL_ID]"),
    "v13": ("[ARGS]", "[CALL_ID]"),
    "v15": ("[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]"),
}
THINK_TOKENS = ("[THINK]", "[/THINK]")
# What v15 files carry: the reasoning efforts the model knows, and the one a request gets by default.
REASONING_EFFORT = {"values": ["none", "high"], "default": "high"}


@functools.cache
def _source() -> dict:
    return json.loads(SOURCE.read_text(encoding="utf-8"))


def tekken_json(version: str, think: bool = True) -> dict:
    """The content of a tekken.json of `version` ("v3", "v7", "v11", "v13", "v15")."""
    source = _source()
    data = {**source, "config": {**source["config"], "version": version}}  # the vocabulary is shared, not copied
    legacy = [{"rank": t["rank"], "token_str": str(t["token_str"]), "is_control": t["is_control"]}
              for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    extra = EXTRA_SPECIAL_TOKENS[version] + (THINK_TOKENS if version == "v13" and think else ())
    data["special_tokens"] = legacy + [
        {"rank": len(legacy) + i, "token_str": token, "is_control": True} for i, token in enumerate(extra)
    ]
    if version == "v15":
        data["model_settings_builder"] = {"reasoning_effort": REASONING_EFFORT}
    return data


def write_tekken(folder: Path, version: str, think: bool = True, name: str = "tekken.json") -> Path:
    """Write a tekken.json of `version` into `folder` (created if needed); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(tekken_json(version, think)), encoding="utf-8")
    return path
