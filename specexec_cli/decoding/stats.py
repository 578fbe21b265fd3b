"""Counters and timers for model passes, so tokens per target pass and host overhead can be reported.

On CUDA a pass is timed with two events recorded on the compute stream around it, and the times are
read only when asked for (or once the events have completed): the host never waits for the device
here. `torch.cuda.synchronize` would also wait for the offload engine's copy streams, so the next
forward's first layers could no longer load while the draft runs. On other devices the host clock
(perf_counter) times the call, which is the pass itself there.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

T = TypeVar("T")
HISTORY = 256  # timed passes kept in `PassStats.history`


def record_event(device: torch.device) -> Any:
    """A timing event recorded now on `device`'s current (compute) stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


@dataclass
class PassStats:
    """Model passes and the time spent inside them during one generation."""

    target_passes: int = 0
    draft_passes: int = 0
    iterations: int = 0
    _seconds: dict[str, float] = field(default_factory=lambda: {"target": 0.0, "draft": 0.0}, repr=False)
    _pending: list[tuple[str, int, Any, Any]] = field(default_factory=list, repr=False)  # CUDA passes
    # (which, tokens, seconds) of the latest timed passes whose times are known, oldest first; `passes_timed`
    # counts every pass ever added to it, so a reader can tell which entries are new to it.
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY), repr=False)
    passes_timed: int = 0
    checked_tokens: int = 0  # draft tree tokens the target checked (roots not counted)

    @property
    def target_s(self) -> float:
        return self.seconds("target")

    @property
    def draft_s(self) -> float:
        return self.seconds("draft")

    def seconds(self, which: str) -> float:
        """Total time of the `which` passes; waits for the last timed pass to finish on the device."""
        self._collect(wait=True)
        return self._seconds[which]

    def timed(self, which: str, device: torch.device, fn: Callable[[], T], tokens: int = 0) -> T:
        """Run fn, count it as a `which` ("target" or "draft") pass over `tokens` new tokens and time it;
        returns its result."""
        setattr(self, f"{which}_passes", getattr(self, f"{which}_passes") + 1)
        if device.type != "cuda":
            start = time.perf_counter()
            result = fn()
            self._add(which, tokens, time.perf_counter() - start)
            return result
        start_event = record_event(device)
        result = fn()
        self._pending.append((which, tokens, start_event, record_event(device)))
        self._collect(wait=False)
        return result

    def recent(self) -> list[tuple[str, int, float]]:
        """The timed passes in `history` whose end has been reached, without waiting for the device."""
        self._collect(wait=False)
        return list(self.history)

    def _add(self, which: str, tokens: int, seconds: float) -> None:
        self._seconds[which] += seconds
        self.history.append((which, tokens, seconds))
        self.passes_timed += 1

    def _collect(self, wait: bool) -> None:
        """Add up the passes whose end event has completed (all of them when `wait`)."""
        while self._pending:
            which, tokens, start, end = self._pending[0]
            if wait:
                end.synchronize()  # this event only: not the copy streams, not the whole device
            elif not end.query():
                return
            self._add(which, tokens, start.elapsed_time(end) / 1000.0)
            self._pending.pop(0)

    def since(self, earlier: PassStats) -> PassStats:
        """The passes and seconds counted after `earlier` (a `snapshot` of this object)."""
        later = self.snapshot()
        return PassStats(
            later.target_passes - earlier.target_passes, later.draft_passes - earlier.draft_passes,
            later.iterations - earlier.iterations,
            {which: later._seconds[which] - earlier._seconds[which] for which in later._seconds},
            checked_tokens=later.checked_tokens - earlier.checked_tokens)

    def snapshot(self) -> PassStats:
        """A frozen copy of the counters (waits for the timed passes to finish on the device)."""
        self._collect(wait=True)
        return PassStats(self.target_passes, self.draft_passes, self.iterations, dict(self._seconds),
                         checked_tokens=self.checked_tokens)
