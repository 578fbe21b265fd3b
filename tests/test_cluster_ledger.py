"""The books of a cluster job (specexec_cli/cluster/ledger.py), with no Ray: dispatch to the least queued
worker, nothing lost or written twice when workers die, a failed shared pass is bisected (one bad prompt
is found in about log2 passes while the others keep sharing), failing prompts are given up only when
every live worker failed them."""

from __future__ import annotations

import random

from specexec_cli.cluster.ledger import MAX_DEATHS, Item, Ledger


def test_take_hands_out_prompts_in_order_and_counts_queued_work() -> None:
    ledger = Ledger(5)
    ledger.add_worker("a")
    ledger.add_worker("b")
    assert ledger.take("a", 2) == [Item(0), Item(1)]
    assert ledger.take("b", 2) == [Item(2), Item(3)]
    assert (ledger.queued("a"), ledger.queued("b")) == (2, 2)
    assert ledger.finish(0) and not ledger.finish(0)  # a second copy is not written
    assert ledger.queued("a") == 1
    assert not ledger.done


def test_least_queued_prefers_the_asker_on_a_tie_and_skips_full_workers() -> None:
    ledger = Ledger(10)
    for name in ("a", "b", "c"):
        ledger.add_worker(name)
    ledger.take("a", 3)
    ledger.take("b", 1)
    limits = {"a": 4, "b": 4, "c": 4}
    assert ledger.least_queued(limits) == "c"
    ledger.take("c", 1)
    assert ledger.least_queued(limits, prefer="c") == "c"
    assert ledger.least_queued(limits, prefer="a") == "b"  # a holds more
    assert ledger.least_queued({"a": 3}) is None  # full


def test_a_worker_holds_two_batches_at_most_and_no_more_than_its_share_of_a_small_job() -> None:
    ledger = Ledger(16)
    ledger.add_worker("a")
    ledger.add_worker("b")  # still starting: it counts
    assert ledger.holding_limit(lanes=8, batches=2) == 8  # half of 16, not all of them
    assert Ledger(1000).holding_limit(lanes=8, batches=2) == 16  # two batches (one worker)
    assert ledger.holding_limit(lanes=1, batches=2) == 2
    for index in range(14):
        ledger.finish(index)
    assert ledger.holding_limit(lanes=8, batches=2) == 8  # never less than a batch


def test_a_dead_workers_prompts_go_first_to_the_others() -> None:
    ledger = Ledger(6)
    ledger.add_worker("a")
    ledger.add_worker("b")
    ledger.take("a", 2)  # 0, 1
    ledger.take("b", 2)  # 2, 3
    ledger.finish(0)
    again, given_up = ledger.worker_lost("a")
    assert again == [1] and given_up == []
    assert ledger.live_workers == ["b"]
    assert ledger.take("b", 2) == [Item(1), Item(4)]  # the lost prompt first


def test_a_prompt_on_dying_workers_runs_alone_then_is_given_up() -> None:
    ledger = Ledger(1)
    names = [f"w{i}" for i in range(MAX_DEATHS + 1)]
    for name in names:
        ledger.add_worker(name)
    for death, name in enumerate(names[:MAX_DEATHS], start=1):
        [item] = ledger.take(name, 1)
        assert item.solo == (death > 2)  # alone after its second death
        again, given_up = ledger.worker_lost(name)
        assert (again, given_up) == (([], [0]) if death == MAX_DEATHS else ([0], []))
    assert ledger.done and 0 in ledger.given_up


def test_a_failed_shared_pass_runs_again_in_halves_and_a_lone_failure_moves_on() -> None:
    ledger = Ledger(4)
    ledger.add_worker("a")
    ledger.add_worker("b")
    ledger.take("a", 3)
    assert ledger.fail("a", [0, 1, 2], "boom") == {0: "group", 1: "group", 2: "alone"}  # one pass of three
    assert ledger.take("a", 1) == [Item(0, group=1), Item(1, group=1)]  # a group goes whole
    assert ledger.take("a", 1) == [Item(2, solo=True)]
    assert ledger.fail("a", [2], "bad prompt") == {2: "elsewhere"}  # alone: not on "a" again
    assert ledger.take("a", 1) == [Item(3)]  # 2 waits for another worker
    assert ledger.take("b", 1) == [Item(2, solo=True)]
    assert ledger.fail("b", [2], "bad prompt") == {2: "given up"}  # failed on every live worker
    assert ledger.given_up == {2: "bad prompt"}
    assert all(ledger.finish(index) for index in (0, 1, 3)) and ledger.done


def passes_of(items: list[Item]) -> list[list[int]]:
    """The passes a worker with lanes to spare makes of `items`: the free ones together, each group
    together, each solo one alone (as decoding/runner.BatchRunner admits them)."""
    free = [item.index for item in items if item.group is None and not item.solo]
    groups: dict[int, list[int]] = {}
    for item in items:
        if item.group is not None:
            groups.setdefault(item.group, []).append(item.index)
    solo = [[item.index] for item in items if item.solo]
    return [group for group in [free, *groups.values(), *solo] if group]


def test_one_bad_prompt_among_16_is_alone_after_log2_failed_passes_and_the_others_finish() -> None:
    ledger = Ledger(16)
    ledger.add_worker("a")
    bad, failed_sizes, passes = 11, [], 0
    for _round in range(10):
        if ledger.done:
            break
        for pass_ in passes_of(ledger.take("a", 16)):
            passes += 1
            if bad in pass_:
                failed_sizes.append(len(pass_))
                ledger.fail("a", pass_, "boom")
            else:
                assert all(ledger.finish(index) for index in pass_)
    assert failed_sizes == [16, 8, 4, 2, 1]  # halved each time: log2(16) + 1 failed passes
    assert ledger.done and ledger.given_up == {bad: "boom"} and ledger.finished == set(range(16)) - {bad}
    assert passes == 9  # the good ones kept sharing: 4 passes of 8, 4, 2, 1 (not 15 alone)


def test_waiting_prompts_that_failed_on_every_survivor_are_given_up_when_a_worker_dies() -> None:
    ledger = Ledger(1)
    ledger.add_worker("a")
    ledger.add_worker("b")
    ledger.take("a", 1)
    assert ledger.fail("a", [0], "bad") == {0: "elsewhere"}  # waits for b
    assert ledger.worker_lost("b") == ([], [0])  # only "a" is left, and it failed it
    assert ledger.given_up == {0: "bad"} and ledger.done


def test_with_no_worker_left_every_unfinished_prompt_is_given_up() -> None:
    ledger = Ledger(4)
    ledger.add_worker("a")
    ledger.take("a", 2)
    ledger.finish(0)
    ledger.worker_lost("a")
    assert ledger.give_up_unfinished("no worker left") == [1, 2, 3]
    assert ledger.done and ledger.finished == {0} and set(ledger.given_up.values()) == {"no worker left"}


def drain(ledger: Ledger, held: dict[str, list[Item]]) -> None:
    """Finish everything the live workers hold or can take, until the job is done."""
    for _round in range(10 * ledger.n_prompts + 10):
        if ledger.done:
            return
        for name in ledger.live_workers:
            for item in held.get(name, []) + ledger.take(name, 3):
                ledger.finish(item.index)
            held[name] = []
    raise AssertionError("the job did not end")


def test_random_schedules_settle_every_prompt_exactly_once() -> None:
    """Workers finish, fail and die at random: every prompt ends finished or given up, never both, a finished
    prompt is never handed out again, and the job ends."""
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 30)
        ledger = Ledger(n)
        names = [f"w{i}" for i in range(rng.randint(1, 4))]
        for name in names:
            ledger.add_worker(name)
        held: dict[str, list[Item]] = {name: [] for name in names}
        finished_once: set[int] = set()
        for _step in range(2000):
            if ledger.done or not ledger.live_workers:
                break
            name = rng.choice(ledger.live_workers)
            roll = rng.random()
            if roll < 0.5:
                taken = ledger.take(name, rng.randint(1, 3))
                assert not any(ledger.settled(item.index) for item in taken)  # every handout
                assert not {item.index for item in taken} & finished_once
                held[name] += taken
            elif roll < 0.85 and held[name]:
                item = held[name].pop(0)
                if not ledger.settled(item.index):
                    assert item.index not in finished_once
                    assert ledger.finish(item.index)
                    finished_once.add(item.index)
            elif roll < 0.95 and held[name]:
                pass_ = [held[name].pop(0).index]
                while held[name] and rng.random() < 0.5:  # a pass of several
                    pass_.append(held[name].pop(0).index)
                ledger.fail(name, pass_, "x")
            elif len(ledger.live_workers) > 1:
                ledger.worker_lost(name)
                held[name] = []
        assert not (ledger.finished & set(ledger.given_up))
        assert ledger.finished == finished_once
        drain(ledger, held)
        assert ledger.finished | set(ledger.given_up) == set(range(n))  # every prompt settled
        assert not (ledger.finished & set(ledger.given_up))
