"""Test-only fault switches for cluster workers: nothing here runs unless the environment variable
SPECEXEC_TEST_FAULTS names a folder (tests/test_ray.py sets it for the job it starts; Ray's local workers
inherit the driver's environment). A file in that folder turns a fault on:

- `exchange-error`: the next `exchange` call on any worker raises (a transient error); the file is
  removed by the worker that takes it, so it happens once per job.
- `hang-pass`: the next pass on any worker sleeps HANG_S seconds (an engine stuck in a pass); once.
- `crash-pass`: while the file is there, every worker's process exits at its next pass.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "SPECEXEC_TEST_FAULTS"
HANG_S = 600.0


def _folder() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def take(name: str) -> bool:
    """True for the one caller that removes switch `name` (a one-shot fault), else False."""
    folder = _folder()
    if folder is None:
        return False
    try:
        (folder / name).unlink()
    except FileNotFoundError:
        return False
    return True


def is_on(name: str) -> bool:
    folder = _folder()
    return folder is not None and (folder / name).exists()


def before_exchange() -> None:
    if take("exchange-error"):
        raise RuntimeError("injected: a transient error in exchange")


def before_pass() -> None:
    if is_on("crash-pass"):
        os._exit(1)
    if take("hang-pass"):
        time.sleep(HANG_S)
