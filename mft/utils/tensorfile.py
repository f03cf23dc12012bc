"""safetensors files in and out: one MftError for a damaged file, normal permissions for a new one.

Every weights file mft reads (a base model, a shard, an adapter, a quantised checkpoint) is opened
through `open_safetensors`, so a file that is missing, cut short, empty or not safetensors at all
gives one message naming it instead of a Rust error. safetensors never unpickles, so reading a
downloaded file runs no code.
"""

import ctypes
import errno
import json
import os
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterator
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
SAFETENSORS_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# safetensors lays tensors out widest dtype first (its Dtype enum, descending), then by name;
# write_streamed keeps that layout, so its files are byte for byte those of save_file.
_FILE_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
_CHUNK_BYTES = 64 << 20  # a pinned staging buffer: a CUDA tensor goes to disk in pieces of this size


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



@dataclass(frozen=True)
class TensorSlot:
    """What a tensor will be in a file written by write_streamed: known before the tensor is."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def file_order(layout: dict[str, TensorSlot]) -> list[str]:
    """The names in the order safetensors stores their data."""
    return sorted(layout, key=lambda name: (_FILE_ORDER.index(SAFETENSORS_NAMES[layout[name].dtype]), name))


def safetensors_header(layout: dict[str, TensorSlot], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header (space-padded to 8 bytes) of a file holding `layout`."""
    entries: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in file_order(layout):
        slot = layout[name]
        entries[name] = {"dtype": SAFETENSORS_NAMES[slot.dtype], "shape": list(slot.shape),
                         "data_offsets": [offset, offset + slot.nbytes]}
        offset += slot.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_streamed(path: Path | None, layout: dict[str, TensorSlot], fetch: Callable[[str], torch.Tensor],
                   metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file in one sequential pass, calling `fetch(name)` for one tensor at a time.

    No state dict of the whole model is ever held: each tensor is written (a CUDA one through two
    pinned staging buffers) by a background thread while the next is fetched. `path` None fetches
    every tensor in the same order and writes nothing: FSDP ranks other than 0, whose `fetch`
    takes part in a gather. The file gets the permissions of any new file (open's, not 0600).
    """
    order = file_order(layout)
    if path is None:
        for name in order:
            fetch(name)
        return
    try:
        with open(path, "wb") as f:
            f.write(safetensors_header(layout, metadata))
            with _BackgroundWriter(f) as writer:
                for name in order:
                    tensor = fetch(name)
                    if tensor.dtype != layout[name].dtype or tuple(tensor.shape) != layout[name].shape:
                        raise ValueError(f"{name}: fetched {tensor.dtype}{list(tensor.shape)}, the header says "
                                         f"{layout[name].dtype}{list(layout[name].shape)}")
                    writer.put(tensor)
    except OSError as e:  # a full disk, a lost mount: say which file, as save_safetensors does
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


class _BackgroundWriter:
    """Writes tensors' bytes to an open file in a thread (file writes release the GIL), so gathering
    and copying the next tensor overlaps with the disk. A CPU tensor is written from its own memory;
    a CUDA one is copied chunk by chunk into two pinned buffers that the thread hands back once written."""

    def __init__(self, f) -> None:
        self._file = f
        self._pending: queue.Queue = queue.Queue(maxsize=2)
        self._free_buffers: queue.Queue = queue.Queue()
        self._buffers: list[torch.Tensor] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="safetensors-writer", daemon=True)

    def __enter__(self) -> "_BackgroundWriter":
        self._thread.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._pending.put(None)
        self._thread.join()
        if self._error is not None and error is None:
            raise self._error

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            data, release = item
            try:
                if self._error is None:
                    self._file.write(_memory(data))
            except BaseException as e:  # raised in the caller's thread at its next put or at exit
                self._error = e
            finally:
                if release is not None:
                    release()

    def _put(self, data: torch.Tensor, release: Callable[[], None] | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._pending.put((data, release))

    def put(self, tensor: torch.Tensor) -> None:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if raw.device.type == "cpu":
            self._put(raw)  # held in the queue until written
            return
        if not self._buffers:
            self._buffers = [torch.empty(_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            for index in range(len(self._buffers)):
                self._free_buffers.put(index)
        for start in range(0, raw.numel(), _CHUNK_BYTES):
            piece = raw[start:start + _CHUNK_BYTES]
            index = self._free_buffers.get()
            staged = self._buffers[index][:piece.numel()]
            staged.copy_(piece)  # synchronous: the device tensor may be freed once this returns
            self._put(staged, lambda index=index: self._free_buffers.put(index))


def _memory(raw: torch.Tensor) -> Any:
    """A CPU uint8 tensor's bytes as a buffer, without numpy: Tensor.numpy() would make its storage
    unresizable, and FSDP2 frees a parameter's unsharded storage by resizing it."""
    return (ctypes.c_char * raw.numel()).from_address(raw.data_ptr()) if raw.numel() else b""
