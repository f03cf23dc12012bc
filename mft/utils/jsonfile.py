"""Read the small JSON files that describe checkpoints, with errors a user can act on."""

import json
from pathlib import Path
from typing import Any

from mft.utils.errors import MftError


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path` (`what` names it in errors, e.g. "Hugging Face config")."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MftError(f"Could not read {what} {path}: {e}") from None
    if not isinstance(value, dict):
        raise MftError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
