"""SIGTERM as an exception, for the CLI only: while a command runs, SIGTERM raises `Terminated` so
finished results stay written, temporary folders are removed, and the process exits 143 without a
traceback. Library code never installs it; the previous handler is restored afterwards."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from specexec_cli.errors import Terminated

EXIT_TERMINATED = 128 + signal.SIGTERM


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Install the SIGTERM -> Terminated handler for the block (main thread only, else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
