"""Write a folder or a file atomically: readers see the old one or the complete new one, never half."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    An existing `path` is moved aside first and deleted only after the new folder is in place;
    on error the temporary folder is removed and `path` is left as it was. What was written in
    it gets the permissions of any new file or folder (0644 / 0755 under umask 022) and is on
    disk before the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _normalise_and_sync(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; on success that file replaces `path` in one rename,
    with the umask's permissions; on error it is removed and `path` is left as it was."""
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(normal_mode(is_dir=False))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def normal_mode(is_dir: bool) -> int:
    """The mode open() or mkdir() gives under the current umask (0644 / 0755 under umask 022)."""
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _normalise_and_sync(folder: Path) -> None:
    """Give everything under `folder` (itself included) the umask's mode, and fsync each file.

    mkdtemp makes the folder 0700 and safetensors writes its files 0600 (through a private
    temporary file); a checkpoint others read (a shared cluster, a serving process) needs more.
    """
    file_mode, dir_mode = normal_mode(is_dir=False), normal_mode(is_dir=True)
    folder.chmod(dir_mode)
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(dir_mode)
        else:
            path.chmod(file_mode)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
