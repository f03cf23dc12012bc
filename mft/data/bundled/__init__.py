"""Small datasets shipped inside the package (regenerate with tools/make_tiny_chat.py)."""

from pathlib import Path

from mft.utils.errors import MftError

DIR = Path(__file__).resolve().parent


def bundled_path(name: str) -> str:
    """Absolute path of a bundled file, e.g. "tiny_chat_train.jsonl" (the suffix may be left out)."""
    for candidate in (DIR / name, DIR / f"{name}.jsonl"):
        if candidate.is_file() and candidate.parent == DIR:
            return str(candidate)
    available = ", ".join(sorted(p.name for p in DIR.glob("*.jsonl")))
    raise MftError(f"no bundled data file {name!r}; available: {available}")
