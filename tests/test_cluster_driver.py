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


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """A `ray.nodes()` entry: the fields worker_resources reads."""
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"Alive": alive, "Resources": resources}


def test_gpu_workers_reserve_their_share_of_the_node_cpus_not_one() -> None:
    # 16 CPUs and 4 GPUs on one node, 8 and 1 on another: the tighter node sets the share (4 each)
    assert driver.worker_resources([node(16, 4), node(8, 1)], 5) == {"num_gpus": 1, "num_cpus": 4.0}
    assert driver.worker_resources([node(2, 4)], 4) == {"num_gpus": 1, "num_cpus": 1.0}  # never below one
    assert driver.worker_resources([node(64, 8), node(32, 0, alive=False)], 8)["num_cpus"] == 8.0


def test_cpu_workers_share_the_cluster_cpus() -> None:
    assert driver.worker_resources([node(8), node(8)], 4) == {"num_cpus": 4.0}
    assert driver.worker_resources([node(2)], 4) == {"num_cpus": 0.5}
    assert driver.worker_resources([node(4), node(16)], 1) == {"num_cpus": 16.0}  # no more than a node has


def test_workers_per_node_follows_the_spread_over_the_nodes_that_can_take_one() -> None:
    assert driver.workers_per_node([node(16), node(16)], 4) == 2
    assert driver.workers_per_node([node(16), node(16)], 3) == 2  # one node holds two
    assert driver.workers_per_node([node(16, 4), node(16)], 4) == 4  # only the GPU node takes workers
    assert driver.workers_per_node([node(16, 2), node(16, 2)], 8) == 2  # no node more than its GPUs
    assert driver.workers_per_node([node(16), node(16, alive=False)], 2) == 2
    assert driver.workers_per_node([], 2) == 1


def test_workers_on_one_node_plan_host_memory_together() -> None:
    from specexec_cli.runtime.caps import host_share, parse_caps

    gib = 1 << 30
    shared = parse_caps(host_share(("cuda=20GiB",), 4, 64 * gib))
    assert shared == {"cuda": 20 * gib, "cpu": 16 * gib}  # each of 4 plans a quarter; the GPU cap stays
    assert parse_caps(host_share(("cpu=8GiB",), 4, 64 * gib)) == {"cpu": 8 * gib}  # its own is smaller
    assert parse_caps(host_share(("cpu=40GiB",), 2, 64 * gib)) == {"cpu": 32 * gib}
    assert host_share((), 1, 64 * gib) == ()  # alone on its node: nothing changes
