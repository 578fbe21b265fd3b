"""Error messages as one line: what the CLI prints for a SpecexecError, a full disk, or a bug."""

from __future__ import annotations

from specexec_cli.fsutil import is_disk_full

MAX_CHARS = 500


def one_line(exc: BaseException) -> str:
    """The exception's message joined onto one line (and capped), or its type name when empty."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


def unexpected(exc: BaseException) -> str:
    """An exception no layer turned into a SpecexecError: a full disk, else a bug to report."""
    if is_disk_full(exc):
        where = f" in {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"no space left on the device{where}; free some space and run again"
    return (f"unexpected {type(exc).__name__}: {one_line(exc)} (this is a bug: please report it; "
            "SPECEXEC_DEBUG=1 shows the traceback)")
