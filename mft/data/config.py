"""The typed `data` config group (conf/data/): one DataConfig, its choices and their defaults.

It lives here, not in mft/config.py, so the data layer takes its own typed config without
importing the training app's schema (mft/config.py imports it from here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mft.utils.choice import Choice
from mft.utils.errors import MftError


class TooLong(Choice):
    """Chats longer than seq_len, and with split chats that fit no open sequence (texts always
    continue into the next sequence)."""

    truncate = "truncate"  # keep the first seq_len positions
    drop = "drop"
    # cut into pieces: a chat that fits no open sequence fills the fullest and continues in the next
    # (mistral-finetune's stream packing: almost no padding; a continued piece lacks earlier turns)
    split = "split"


class DataFormat(Choice):
    """How a row is read."""

    auto = "auto"  # per row: `messages` -> chat, instruction + output -> alpaca, else the text column
    text = "text"
    chat = "chat"
    alpaca = "alpaca"


class AlpacaStyle(Choice):
    chat = "chat"  # user = instruction (+ input), assistant = output
    prompt = "prompt"  # the classic "Below is an instruction..." template, trained on as text


class ControlTokens(Choice):
    """Literal "<s>", "[INST]", ... in text samples."""

    warn = "warn"  # count them and keep them as plain text
    map = "map"  # turn them into the control tokens


# Bad rows: raise (stop before the first step, listing file:line) | skip (log each one, count them in
# the summary). Built with the functional API because `raise` is a keyword and OmegaConf reads a
# value by member name.
OnError = Choice("OnError", [("raise", "raise"), ("skip", "skip")])


@dataclass
class DataConfig:
    # Paths, or {file: path, weight: w} entries mixed by weight; an entry may also set its own
    # format, text_column and alpaca.
    train_files: List[Any] = MISSING
    # Files to evaluate on; empty: hold out valid_fraction of each training file.
    valid_files: List[Any] = field(default_factory=list)
    # Share of each training file held out for validation when valid_files is empty (fixed seed).
    valid_fraction: float = 0.0
    # Tokens per packed sequence; no default: it depends on the data and the memory (tiny_chat: 256).
    seq_len: int = MISSING
    too_long: TooLong = TooLong.truncate
    # Packed sequences kept open at once: a chat goes into the open one it fills best (best fit),
    # so short chats fill the gaps long ones leave; 1: greedy, in order.
    pack_buffer: int = 64
    # Order of the training samples per epoch (the held-out split ignores it).
    seed: int = 0
    format: DataFormat = DataFormat.auto
    # The column of text rows (AutoTrain-style CSV files often call it "text").
    text_column: str = "text"
    alpaca: AlpacaStyle = AlpacaStyle.chat
    control_tokens: ControlTokens = ControlTokens.warn
    on_error: OnError = OnError["raise"]
    # Tokenized files, keyed by content + tokenizer + settings; null: tokenize in memory every run.
    cache_dir: Optional[str] = "~/.cache/mft/data"
    # Tokenizer processes; null: several for files over 16 MiB, else none.
    num_workers: Optional[int] = None


def data_config(cfg: DataConfig | Mapping[str, Any]) -> DataConfig:
    """A DataConfig as is; a plain mapping (scripts, tests) typed and checked as Hydra would."""
    if isinstance(cfg, DataConfig):
        return cfg
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), dict(cfg)))
    except MissingMandatoryValue as e:
        raise MftError(f"data config: missing key '{e.full_key}'") from None
    except OmegaConfBaseException as e:
        raise MftError(f"data config: {e}") from None
