"""Read the small JSON files that describe checkpoints, with errors a user can act on.

A file a user downloads or copies can be missing, cut short, binary, or hold a value of the
wrong type; each case is one MftError naming the file and, for a value, its key.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mft.utils.errors import MftError


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path` (`what` names it in errors, e.g. "Hugging Face config")."""
    path = Path(path)
    if not path.is_file():
        raise MftError(f"{path}: the {what} file is missing.")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MftError(f"{path}: the {what} file is not UTF-8 text (a binary or damaged file?).") from None
    except json.JSONDecodeError as e:
        raise MftError(
            f"{path}: the {what} file is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "it may be truncated or damaged."
        ) from None
    except RecursionError:
        raise MftError(f"{path}: the {what} file nests JSON too deeply to be a {what}.") from None
    except OSError as e:
        raise MftError(f"{path}: could not read the {what} file ({e.strerror or e}).") from None
    if not isinstance(value, dict):
        raise MftError(f"{path}: expected a JSON object in the {what} file, got {_kind_of(value)}.")
    return value


@dataclass(frozen=True)
class Kind:
    """A JSON value's expected type, as a phrase for messages and a test."""

    phrase: str  # "a positive integer", completes "must be ..."
    accepts: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not the integer 1 here


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE_INT = Kind("a positive integer", lambda v: _is_int(v) and v > 0)
COUNT = Kind("an integer >= 0", lambda v: _is_int(v) and v >= 0)
NUMBER = Kind("a number", _is_number)
POSITIVE_NUMBER = Kind("a positive number", lambda v: _is_number(v) and v > 0)
FRACTION = Kind("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
STRING = Kind("a string", lambda v: isinstance(v, str))
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))
STRINGS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v))
# A sliding window: one for every layer, or a per-layer pattern (null: a full-attention layer).
WINDOWS = Kind("a positive integer or a list of positive integers and nulls",
               lambda v: POSITIVE_INT.accepts(v) or isinstance(v, list) and bool(v)
               and all(w is None or POSITIVE_INT.accepts(w) for w in v))


@dataclass(frozen=True)
class Field:
    kind: Kind
    required: bool = False  # absent or null is an error; otherwise either means "the default"


def check_fields(obj: Mapping[str, Any], fields: Mapping[str, Field], path: Path, within: str = "",
                 only_known: bool = False) -> None:
    """One MftError listing every key of `obj` whose value is missing or of the wrong type.

    `within` prefixes key names in the message ("base_model.args."); with `only_known`, keys
    not in `fields` are errors too.
    """
    problems = []
    for key, field in fields.items():
        value = obj.get(key)
        if value is None:
            if field.required:
                problems.append(f"'{within}{key}' is missing (expected {field.kind.phrase})")
        elif not field.kind.accepts(value):
            problems.append(f"'{within}{key}' must be {field.kind.phrase}, got {json.dumps(value)[:60]} "
                            f"({_kind_of(value)})")
    if only_known:
        problems += [f"'{within}{key}' is not a known key" for key in obj if key not in fields]
    if problems:
        raise MftError(f"{path}: " + "; ".join(problems) + ".")


def _kind_of(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
