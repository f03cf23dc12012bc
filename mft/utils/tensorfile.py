"""safetensors files in and out: one MftError for a damaged file, normal permissions for a new one.

Every weights file mft reads (a base model, a shard, an adapter, a quantised checkpoint) is opened
through `open_safetensors`, so a file that is missing, cut short, empty or not safetensors at all
gives one message naming it instead of a Rust error. safetensors never unpickles, so reading a
downloaded file runs no code.
"""

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mft.utils.atomic import normal_mode
from mft.utils.errors import MftError

# safetensors' dtype names, as the header has them -> torch dtypes.
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOATING = ("F64", "F32", "F16", "BF16")  # what a dense weight may be stored as (cast on load)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's entry in a safetensors header."""

    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "F32", "BF16", "U8", ...


@contextmanager
def open_safetensors(path: str | os.PathLike, what: str = "weights") -> Iterator[Any]:
    """safe_open(path) on the CPU; a missing or damaged file is an MftError naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise MftError(f"{path}: the {what} file is missing.")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise MftError(f"{path}: the {what} file is truncated or not a safetensors file ({e}).") from None
    try:
        with handle as f:
            yield f
    except SafetensorError as e:  # a header that parses but describes tensors torch cannot make
        raise MftError(f"{path}: the {what} file is damaged ({e}).") from None


def read_header(path: str | os.PathLike, what: str = "weights") -> dict[str, TensorInfo]:
    """Every tensor's name, shape and dtype, read from the header only (no tensor data)."""
    with open_safetensors(path, what) as f:
        return {key: _info(f, key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)


def _info(f: Any, key: str) -> TensorInfo:
    sl = f.get_slice(key)
    return TensorInfo(tuple(sl.get_shape()), sl.get_dtype())


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, leaving the file with the permissions of any new file.

    safetensors writes through a private temporary file, so its files are 0600 (owner only).
    """
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # a full disk arrives as "I/O error: ... (os error 28)": make it the OSError it is
        code = re.search(r"os error (\d+)", str(e))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number) if code else str(e), str(path)) from None
    os.chmod(path, normal_mode(is_dir=False))

