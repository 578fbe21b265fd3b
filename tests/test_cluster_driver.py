"""The cluster driver's rules that need no Ray (specexec_cli/cluster/driver.py): when a worker counts as
hung, how many workers a job replaces."""

from __future__ import annotations

import pytest

from specexec_cli.cluster import driver
from specexec_cli.cluster.driver import HUNG_FACTOR, hang_of, hung_bound, hung_floor, max_replacements
from specexec_cli.errors import UsageError


def progress(busy_s: float, worst_s: float) -> dict[str, float]:
    return {"passes": 3, "last_s": worst_s, "worst_s": worst_s, "busy_s": busy_s}


def test_the_hang_bound_follows_the_slowest_recent_pass_above_a_floor() -> None:
    assert hung_bound(0.0, 60.0) == 60.0  # nothing measured yet: the floor
    assert hung_bound(1.0, 60.0) == 60.0
    assert hung_bound(30.0, 60.0) == 30.0 * HUNG_FACTOR


def test_a_pass_running_past_the_bound_is_a_hang_and_a_late_call_is_one_too() -> None:
    assert hang_of(progress(0.0, 0.5), seen_s=100.0, call_s=0.5, floor=5.0) is None  # between passes
    assert hang_of(progress(4.0, 0.5), seen_s=0.5, call_s=0.5, floor=5.0) is None
    why = hang_of(progress(4.0, 0.5), seen_s=2.0, call_s=0.5, floor=5.0)  # 6 s since the pass began
    assert why == "no pass finished in 6 s, over its bound of 5 s"
    assert hang_of(progress(40.0, 5.0), seen_s=0.0, call_s=1.0, floor=5.0) is None  # 10 x 5 s
    late = hang_of(None, seen_s=9.0, call_s=9.0, floor=5.0)  # no answer at all
    assert late == "its exchange call has not come back in 9 s, over its bound of 5 s"


def test_the_floor_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("SPECEXEC_RAY_HUNG_S", raising=False)
    assert hung_floor() == driver.HUNG_FLOOR_S
    monkeypatch.setenv("SPECEXEC_RAY_HUNG_S", "2.5")
    assert hung_floor() == 2.5
    for bad in ("soon", "0"):
        monkeypatch.setenv("SPECEXEC_RAY_HUNG_S", bad)
        with pytest.raises(UsageError, match="SPECEXEC_RAY_HUNG_S"):
            hung_floor()


def test_a_job_replaces_two_workers_per_worker_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("SPECEXEC_RAY_MAX_REPLACEMENTS", raising=False)
    assert max_replacements(3) == 3 * driver.REPLACEMENTS_PER_WORKER == 6
    monkeypatch.setenv("SPECEXEC_RAY_MAX_REPLACEMENTS", "0")
    assert max_replacements(3) == 0
    monkeypatch.setenv("SPECEXEC_RAY_MAX_REPLACEMENTS", "-1")
    with pytest.raises(UsageError, match="SPECEXEC_RAY_MAX_REPLACEMENTS must be >= 0"):
        max_replacements(3)
