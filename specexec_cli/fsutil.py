"""File-system checks with one-line errors: a writable folder for a flag, and "disk full" messages that
name the folder and the space needed."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from specexec_cli.errors import SpecexecError, UsageError

GB = 1e9


def expand_user(path: str | os.PathLike) -> Path:
    """`path` with a leading ~ or ~user expanded; left as written when that user or home is unknown
    (as a shell leaves `~nobody-here`), instead of pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def check_writable_dir(path: str, flag: str) -> Path:
    """The folder `path` (created if missing) when this process can write there, else a UsageError."""
    folder = expand_user(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create the folder ({exc.strerror})") from None
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder is not writable")
    return folder


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of `folder` (or its nearest existing parent); None if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def size_text(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{max(n, 1) / 1e6:.1f} MB"


def no_space_error(folder: Path, needed: int, what: str) -> SpecexecError:
    """The one-line error for a full disk: where, how much is needed, how much is free."""
    free = free_bytes(folder)
    have = f", {size_text(free)} free" if free is not None else ""
    return SpecexecError(f"no space left in {folder}: {what} needs about {size_text(needed)}{have}; "
                         "free some space or point SPECEXEC_CACHE / XDG_CONFIG_HOME elsewhere")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_full_as_error(folder: Path, needed: int, what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised in the block into `no_space_error`; check the free space first."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise no_space_error(folder, needed, what)
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise no_space_error(folder, needed, what) from None
        raise
