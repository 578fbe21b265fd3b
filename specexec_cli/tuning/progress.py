"""Progress on stderr for the tuner's longer steps (timing passes, growing calibration trees): a tqdm bar
saying what is measured, how far it is and the time left, bounded by the step's time limit."""

from __future__ import annotations

import sys
import time


class StepProgress:
    """`total` units of work (passes, trees) that stop early at `limit_s` seconds (None: no limit)."""

    def __init__(self, label: str, total: int, limit_s: float | None = None, enabled: bool = True) -> None:
        self.start, self.limit_s, self.done = time.perf_counter(), limit_s, 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"specexec: {label}", file=sys.stderr, unit="step",
                            dynamic_ncols=True, leave=False)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is None:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.bar.total - self.done) if self.done else float("inf")
        if self.limit_s is not None:
            left = min(left, max(0.0, self.limit_s - elapsed))
        self.bar.set_postfix_str(f"~{left:.0f} s left", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def quiet(label: str, total: int, limit_s: float | None = None) -> StepProgress:
    """A StepProgress that shows nothing (tests, --no-progress)."""
    return StepProgress(label, total, limit_s, enabled=False)
