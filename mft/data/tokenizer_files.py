"""Which files in a model folder are Mistral tokenizers, told by name alone.

No mistral-common import: the `mft_tokenizer` config resolver runs at compose time, before
anything heavy is loaded. `load_tokenizer` (mft/data/tokenizer.py) picks its file here too, so
the resolver and the loader agree on what a folder holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# In a model folder, the first name that exists wins; then any other Mistral tokenizer file.
FOLDER_PREFERENCE = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model.v2")
# mistral-common's naming rules: tekken files are *tekken*.json; SentencePiece files end in .model
# or .model.vN, with an optional multimodal suffix (tokenizer.model.v7m1).
_SENTENCEPIECE = re.compile(r"\.model(\.v\d+(m\d+)?)?$")


def is_tokenizer_name(path: Path) -> bool:
    """A file whose name mistral-common reads as a tekken or SentencePiece tokenizer."""
    tekken = "tekken" in path.name and path.suffix == ".json"
    return path.is_file() and (tekken or bool(_SENTENCEPIECE.search(path.name)))


def find_tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file a model folder holds, or None: FOLDER_PREFERENCE first, then a versioned
    tokenizer.model.vN before the bare tokenizer.model (which mistral-common reads as v1)."""
    for name in FOLDER_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.iterdir() if is_tokenizer_name(p))
    return min(others, key=lambda p: (p.name == "tokenizer.model", p.name)) if others else None


def model_tokenizer(checkpoint: Any, fallback: str) -> str:
    """The `mft_tokenizer` resolver: the checkpoint folder when it holds a Mistral tokenizer file
    (load_tokenizer then reads that file), else `fallback` (a builtin name such as "v3").

    `${mft_tokenizer:${model.checkpoint},v3}` in a model preset makes a model folder's own
    tokenizer the default; an explicit model.tokenizer=... replaces the interpolation.
    """
    if checkpoint is None or str(checkpoint).strip() == "":
        return fallback
    folder = Path(str(checkpoint)).expanduser()
    return str(checkpoint) if folder.is_dir() and find_tokenizer_file(folder) is not None else fallback
