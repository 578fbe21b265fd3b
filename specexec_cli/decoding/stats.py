"""Counters and timers for model passes, so tokens per target pass and host overhead can be reported."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass
class PassStats:
    """Model passes and the wall time spent inside them during one generation."""

    target_passes: int = 0
    draft_passes: int = 0
    target_s: float = 0.0
    draft_s: float = 0.0
    iterations: int = 0

    def timed(self, which: str, device: torch.device, fn: Callable[[], T]) -> T:
        """Run fn, add its time to the `which` ("target" or "draft") counters and return its result.

        On CUDA the device is synchronised around the call so the time is the pass's, not the launch's.
        """
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        setattr(self, f"{which}_passes", getattr(self, f"{which}_passes") + 1)
        setattr(self, f"{which}_s", getattr(self, f"{which}_s") + elapsed)
        return result
