"""The books of a cluster job: where each prompt is (waiting, on a worker, settled), with no Ray in it.

Rules (docs/ray.md):
- A prompt goes to one worker at a time; a result is accepted once (a second copy is ignored), so
  nothing is written twice.
- A worker that dies gives its unsettled prompts back, at the front of the queue. A prompt that was on a
  worker when it died runs alone after its second such death (it may be what kills them) and is given up
  after its third.
- A pass shared by several prompts that fails is bisected (any of them may have caused it): its prompts
  run again in two halves, each half sharing passes only within itself, a half of one prompt alone; a
  half that fails is halved again, so one bad prompt among n is alone after about log2(n) failed passes
  while the others keep sharing. A prompt that fails alone is not sent to that worker again, and is given
  up once it has failed on every live worker.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SOLO_AFTER_DEATHS = 2  # deaths of workers running a prompt before it runs alone
MAX_DEATHS = 3  # ... and before it is given up


@dataclass
class History:
    """What happened to one prompt so far."""

    failed_on: set[str] = field(default_factory=set)  # workers it failed on alone
    deaths: int = 0  # workers that died while it was on them
    solo: bool = False  # runs in a pass of its own from now on
    group: int | None = None  # shares passes only with the prompts of this group (a half of a failed pass)
    last_error: str = ""


@dataclass(frozen=True)
class Item:
    """One prompt as sent to a worker: its index in the job, whether it must run alone, and the group whose
    prompts alone it may share a pass with (None: any)."""

    index: int
    solo: bool = False
    group: int | None = None


class Ledger:
    """Where each of `n_prompts` prompts is. Workers are named by the driver; `add_worker` before `take`."""

    def __init__(self, n_prompts: int) -> None:
        self.n_prompts = n_prompts
        self.waiting: deque[int] = deque(range(n_prompts))
        self.on_worker: dict[str, set[int]] = {}  # live workers -> prompts sent and not settled
        self.finished: set[int] = set()
        self.given_up: dict[int, str] = {}  # index -> why
        self.history: dict[int, History] = {}
        self.groups = 0  # groups made so far (the last one's number)

    # --- workers --------------------------------------------------------------------------------

    def add_worker(self, name: str) -> None:
        self.on_worker.setdefault(name, set())

    @property
    def live_workers(self) -> list[str]:
        return list(self.on_worker)

    def queued(self, name: str) -> int:
        """Prompts sent to worker `name` and not settled: its queued work."""
        return len(self.on_worker[name])

    def least_queued(self, limits: dict[str, int], prefer: str | None = None) -> str | None:
        """Of the workers in `limits` (name -> most prompts it may hold), the one with the least queued work
        among those under their limit: `prefer` on a tie, else the first; None when all are full."""
        open_ = [name for name, limit in limits.items() if self.queued(name) < limit]
        if not open_:
            return None
        least = min(self.queued(name) for name in open_)
        if prefer in open_ and self.queued(prefer) == least:
            return prefer
        return next(name for name in open_ if self.queued(name) == least)

    def holding_limit(self, lanes: int, batches: int) -> int:
        """Most prompts a worker with `lanes` per pass may hold: `batches` batches, but no more than its fair
        share of what is left among the live workers (those still starting count), so that the first
        worker ready does not take a small job's every prompt; never less than one batch."""
        lanes = max(1, lanes)
        share = -(-self.left // max(1, len(self.on_worker)))  # ceil
        return max(lanes, min(batches * lanes, share))

    def worker_lost(self, name: str) -> tuple[list[int], list[int]]:
        """Worker `name` died (or could not start): its unsettled prompts go back to the front of the queue.
        Returns (prompts to run again, prompts given up now)."""
        held = sorted(self.on_worker.pop(name, set()))
        again = []
        for index in held:
            history = self._history(index)
            history.deaths += 1
            history.solo = history.solo or history.deaths >= SOLO_AFTER_DEATHS
            history.group = None if history.solo else history.group
            if history.deaths >= MAX_DEATHS:
                self._give_up(index, f"{history.deaths} workers died while running it")
            else:
                again.append(index)
        self.waiting.extendleft(reversed(again))
        return again, [i for i in held if i in self.given_up] + self._give_up_unrunnable()

    # --- prompts --------------------------------------------------------------------------------

    def take(self, name: str, size: int) -> list[Item]:
        """Up to `size` waiting prompts for worker `name`, in queue order, skipping any that failed on it;
        a prompt of a group brings the rest of its group waiting (a group goes to one worker whole)."""
        taken: list[Item] = []
        skipped: list[int] = []
        while self.waiting and len(taken) < size:
            index = self.waiting.popleft()
            history = self.history.get(index)
            if history is not None and name in history.failed_on:
                skipped.append(index)
                continue
            members = [index]
            if history is not None and history.group is not None:
                members += self._take_group(history.group, name)
            for member in members:
                record = self.history.get(member)
                taken.append(Item(member, record.solo if record else False, record.group if record else None))
                self.on_worker[name].add(member)
        self.waiting.extendleft(reversed(skipped))
        return taken

    def finish(self, index: int) -> bool:
        """A result for prompt `index` arrived: True the first time (write it), False for a copy."""
        if self.settled(index):
            return False
        self._release(index)
        self.finished.add(index)
        return True

    def fail(self, name: str, indices: list[int], error: str) -> dict[int, str]:
        """The prompts `indices` failed on worker `name` in one pass (one prompt: it failed alone). Returns
        what happens to each unsettled one: "group" (a pass of several was bisected: it runs again in a
        half of that pass), "alone" (its half is itself), "elsewhere" (it failed alone: another worker
        tries it) or "given up"."""
        left = sorted(index for index in indices if not self.settled(index))
        for index in left:
            self._release(index)
            self._history(index).last_error = error
        if len(indices) > 1:
            verdicts = self._bisect(left)
        else:
            verdicts = {index: self._failed_alone(name, index, error) for index in left}
        self.waiting.extendleft(reversed([index for index in left if verdicts[index] != "given up"]))
        return verdicts

    def give_up_unfinished(self, why: str) -> list[int]:
        """Every prompt not settled (no worker is left to run them): given up, `why`. Returns them in
        input order."""
        left = [index for index in range(self.n_prompts) if not self.settled(index)]
        for index in left:
            self._give_up(index, why)
        return left

    def settled(self, index: int) -> bool:
        return index in self.finished or index in self.given_up

    @property
    def left(self) -> int:
        """Prompts not settled yet."""
        return self.n_prompts - len(self.finished) - len(self.given_up)

    @property
    def done(self) -> bool:
        return self.left == 0

    # --- internals ------------------------------------------------------------------------------

    def _history(self, index: int) -> History:
        return self.history.setdefault(index, History())

    def _release(self, index: int) -> None:
        """Take prompt `index` off the worker holding it, else out of the queue. A prompt is in one place
        at a time, so the queue (a scan) is searched only for a prompt no worker holds."""
        for held in self.on_worker.values():
            if index in held:
                held.remove(index)
                return
        if index in self.waiting:
            self.waiting.remove(index)

    def _bisect(self, indices: list[int]) -> dict[int, str]:
        """A shared pass of `indices` failed: each half of them becomes a group of its own (a half of one
        prompt runs solo)."""
        verdicts = {}
        middle = (len(indices) + 1) // 2
        for half in (indices[:middle], indices[middle:]):
            group = None
            if len(half) > 1:
                self.groups += 1
                group = self.groups
            for index in half:
                history = self._history(index)
                history.group, history.solo = group, group is None
                verdicts[index] = "group" if group is not None else "alone"
        return verdicts

    def _failed_alone(self, name: str, index: int, error: str) -> str:
        history = self._history(index)
        history.failed_on.add(name)
        if set(self.on_worker) <= history.failed_on:
            self._give_up(index, error)
            return "given up"
        return "elsewhere"

    def _take_group(self, group: int, name: str) -> list[int]:
        """The waiting prompts of `group` (but those that failed on worker `name`), out of the queue."""
        members = [index for index in self.waiting if self.history.get(index) is not None
                   and self.history[index].group == group and name not in self.history[index].failed_on]
        for index in members:
            self.waiting.remove(index)
        return members

    def _give_up(self, index: int, why: str) -> None:
        self._release(index)
        self.given_up[index] = why

    def _give_up_unrunnable(self) -> list[int]:
        """Waiting prompts that failed on every worker still alive (after one died): given up."""
        live = set(self.on_worker)
        stuck = [index for index in self.waiting
                 if live and index in self.history and live <= self.history[index].failed_on]
        for index in stuck:
            self._give_up(index, self.history[index].last_error)
        return stuck
