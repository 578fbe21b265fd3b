"""CUDA-only logic exercised on CPU with stand-ins for the CUDA calls: pass timing with events on the
compute stream (never a device-wide synchronize) and the pinned-memory fallbacks."""

from __future__ import annotations

import pytest
import torch

from specexec_cli.decoding import stats as stats_module
from specexec_cli.decoding.stats import PassStats
from specexec_cli.runtime.pinned import PinnedPool

CUDA = torch.device("cuda", 0)


class FakeEvent:
    """A timing event whose completion and timestamp the test controls."""

    def __init__(self, clock: list[float], done: list[bool]) -> None:
        self.time, self.done, self.synced = clock[0], done, False

    def query(self) -> bool:
        return self.done[0]

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.time - self.time) * 1000.0  # milliseconds, like torch.cuda.Event


def test_cuda_passes_are_timed_with_events_without_synchronizing(monkeypatch):
    clock, done, events = [0.0], [False], []

    def record(device):
        assert device == CUDA
        events.append(FakeEvent(clock, done))
        return events[-1]

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize waits for the copy streams too")

    monkeypatch.setattr(stats_module, "record_event", record)
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    stats = PassStats()

    def pass_of(seconds):
        def run():
            clock[0] += seconds
            return "logits"
        return run

    assert stats.timed("draft", CUDA, pass_of(0.25)) == "logits"
    assert stats.timed("target", CUDA, pass_of(2.0)) == "logits"
    assert len(stats._pending) == 2 and not any(e.synced for e in events)  # nothing waited on yet
    done[0] = True
    stats.timed("draft", CUDA, pass_of(0.5))  # completed events are folded in without waiting
    assert stats._pending == [] and not any(e.synced for e in events)
    done[0] = False
    stats.timed("target", CUDA, pass_of(1.0))
    assert stats.target_s == pytest.approx(3.0)  # reading waits for that pass's end event only
    assert stats.draft_s == pytest.approx(0.75)
    assert [e.synced for e in events] == [False] * 7 + [True]
    assert (stats.target_passes, stats.draft_passes) == (2, 2)


def test_cpu_passes_are_timed_with_the_host_clock():
    stats = PassStats()
    stats.timed("target", torch.device("cpu"), lambda: torch.ones(3).sum())
    assert stats.target_passes == 1 and stats.target_s > 0 and stats.draft_s == 0


def pool(register_codes: list[int], pin_fails: bool = False):
    """A CUDA PinnedPool whose cudaHostRegister returns `register_codes` in turn."""
    calls = {"register": 0, "clear": 0, "pin": 0, "unregister": [], "spans": []}

    def register(ptr, nbytes):
        calls["register"] += 1
        calls["spans"].append((ptr, nbytes))
        return register_codes[calls["register"] - 1]

    def pinned_empty(nbytes):
        calls["pin"] += 1
        if pin_fails:
            raise RuntimeError("out of pinnable memory")
        return torch.empty(nbytes, dtype=torch.uint8)

    p = PinnedPool(True, register=register, unregister=calls["unregister"].append, pinned_empty=pinned_empty,
                   clear_error=lambda: calls.__setitem__("clear", calls["clear"] + 1))
    return p, calls


def test_pinned_pool_registers_whole_pages_no_two_buffers_share():
    p, calls = pool([0, 0, 0])
    a, b, c = p.empty(1000), p.empty(3000), p.empty(8192)
    assert (a.numel(), b.numel(), c.numel()) == (1000, 3000, 8192)
    assert calls["spans"] == [(a.data_ptr(), 4096), (b.data_ptr(), 4096), (c.data_ptr(), 8192)]
    pages = [range(ptr // 4096, (ptr + n) // 4096) for ptr, n in calls["spans"]]
    assert all(ptr % 4096 == 0 for ptr, _ in calls["spans"])
    assert not set(pages[0]) & set(pages[1]) and not set(pages[1]) & set(pages[2])
    assert p.registered_bytes == 4096 + 4096 + 8192 and p.allocator_bytes == 0 and calls["clear"] == 0
    assert "registered" in p.summary() and "NOT" not in p.summary()
    p.close()
    assert calls["unregister"] == [a.data_ptr(), b.data_ptr(), c.data_ptr()]


def test_a_failed_register_clears_the_error_once_and_falls_back_to_pin_memory():
    p, calls = pool([0, 2])  # 2: cudaErrorMemoryAllocation
    p.empty(100)
    buf = p.empty(3000)
    p.empty(5000)  # no second registration attempt after a failure
    assert buf.numel() == 3000
    assert {k: v for k, v in calls.items() if k != "spans"} == {"register": 2, "clear": 1, "pin": 2,
                                                               "unregister": []}
    assert p.registered_bytes == 4096 and p.allocator_bytes == 8000  # one whole page registered
    assert p.allocator_reserved == 4096 + 8192  # the caching host allocator's power-of-two blocks
    assert p.pinned_bytes == 4096 + 8000 and "error 2" in p.errors[0]
    assert "via pin_memory" in p.summary()


def test_when_nothing_can_be_pinned_the_buffer_is_pageable_and_reported():
    p, calls = pool([1], pin_fails=True)
    buf = p.empty(64)
    assert buf.numel() == 64 and p.unpinned_bytes == 64 and p.pinned_bytes == 0
    assert "NOT pinned" in p.summary() and len(p.errors) == 2


def test_without_cuda_nothing_is_registered():
    p = PinnedPool(False, register=lambda *a: pytest.fail("registered on CPU"))
    assert p.empty(10).numel() == 10 and p.summary() == "pinned: none (no CUDA device)"
