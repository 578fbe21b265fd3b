"""Continuous batching, one loop for every front door (generate's batches, the server, Ray workers).

Jobs wait in a queue; `step` admits waiting jobs while lanes are free (a solo job runs in a pass of its
own; a job of a group shares passes only with its group), runs one iteration of the `Batch` (one
target pass for all of them) and returns what happened: the jobs that finished with their result, and
the jobs that failed with their error. A job that cannot
start (an empty prompt) fails alone. A failed pass fails only the jobs in that pass (`shared` says
whether it held others) and the runner starts a fresh batch, since the failed one's caches may be half
updated; the waiting jobs are untouched. `add` and `cancel` may be called from any thread; `step` from
one thread at a time (the engine's).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import Batch, GenerationResult, Run, make_decoder
from specexec_cli.decoding.stats import PassStats
from specexec_cli.errors import UsageError


@dataclass
class Job:
    """One prompt to decode: its key (unique in the runner), token ids [L], its own config (sampling,
    seed, limits, stop strings), the text hooks, and whatever the front door carries with it."""

    key: int
    ids: torch.Tensor
    config: GenerationConfig
    decode: Callable[[list[int]], str] | None = None
    on_text: Callable[[str], None] | None = None
    solo: bool = False  # runs in a pass of its own (a retry of a prompt whose shared pass failed)
    group: int | None = None  # shares passes only with jobs of this group (a smaller retry of such a pass)
    payload: Any = None


@dataclass
class Outcome:
    """A job that left the runner: finished (`result`), or failed (`error`) when it started or in a pass
    (`in_pass`; `shared`: that pass held other jobs too, so the fault may not be its own)."""

    job: Job
    result: GenerationResult | None = None
    error: BaseException | None = None
    in_pass: bool = False
    shared: bool = False
    run: Run | None = None  # the finished run (its tokens, lane) for callers that need more than the result


class BatchRunner:
    """See the module docstring. `make_batch` makes a fresh Batch (its decoder and caches)."""

    def __init__(self, make_batch: Callable[[], Batch], lanes: int) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.make_batch, self.lanes = make_batch, lanes
        self.batch = make_batch()
        self.jobs: dict[int, Job] = {}  # running, by key
        self.lock = threading.Lock()
        self.waiting: deque[Job] = deque()  # guarded by `lock`
        self._cancelled: set[int] = set()  # guarded by `lock`

    # --- any thread -----------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        with self.lock:
            self.waiting.append(job)

    def cancel(self, key: int) -> None:
        """Forget job `key`: waiting ones at once, running ones before the next pass."""
        with self.lock:
            self._cancelled.add(key)

    @property
    def n_waiting(self) -> int:
        with self.lock:
            return len(self.waiting)

    @property
    def n_running(self) -> int:
        return len(self.batch.runs)

    @property
    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.batch.runs

    # --- the engine thread ------------------------------------------------------------------------

    def _take_cancelled(self) -> list[Job]:
        with self.lock:
            cancelled, self._cancelled = self._cancelled, set()
            kept = deque(job for job in self.waiting if job.key not in cancelled)
            dropped = [job for job in self.waiting if job.key in cancelled]
            self.waiting = kept
        for run in list(self.batch.runs):
            if run.index in cancelled:
                self.batch.drop(run)
                dropped.append(self.jobs.pop(run.index))
        return dropped

    def _admit(self) -> list[Outcome]:
        """Start waiting jobs while lanes are free; a solo job starts only in an empty batch, and
        nothing joins it; a job joins running ones only of its own group (None: no group). Jobs that
        cannot start come back as failures."""
        failed = []
        while True:
            with self.lock:
                if not self.waiting or len(self.batch.runs) >= self.lanes:
                    break
                solo_running = any(job.solo for job in self.jobs.values())
                job = self.waiting[0]
                if solo_running or (job.solo and self.batch.runs):
                    break
                if self.jobs and next(iter(self.jobs.values())).group != job.group:
                    break  # the running jobs are all of one group (or of none)
                self.waiting.popleft()
            try:
                self.batch.start(job.key, job.ids, job.config, job.decode, job.on_text)
            except Exception as exc:  # this job alone is bad (empty prompt, bad config)
                failed.append(Outcome(job, error=exc))
                continue
            self.jobs[job.key] = job
        return failed

    def step(self) -> tuple[list[Outcome], list[Job]]:
        """Admit, run one pass, and return (outcomes, jobs dropped because they were cancelled)."""
        dropped = self._take_cancelled()
        outcomes = self._admit()
        if not self.batch.runs:
            return outcomes, dropped
        try:
            finished = self.batch.step()
        except Exception as exc:  # a failed pass fails the jobs in it; the batch starts afresh
            shared = len(self.jobs) > 1
            outcomes += [Outcome(job, error=exc, in_pass=True, shared=shared) for job in self.jobs.values()]
            self.jobs.clear()
            self.batch = self.make_batch()
            return outcomes, dropped
        for run in finished:
            outcomes.append(Outcome(self.jobs.pop(run.index), result=run.result(self.batch.stats), run=run))
        return outcomes, dropped

    def reset(self) -> list[Job]:
        """The running jobs, forgotten, and a fresh batch (after a fault outside a pass); the waiting
        ones stay."""
        running = list(self.jobs.values())
        self.jobs.clear()
        self.batch = self.make_batch()
        return running

    def close(self) -> list[Job]:
        """Every job still waiting or running, forgotten (the caller answers them)."""
        with self.lock:
            left, self.waiting = list(self.waiting), deque()
        left += list(self.jobs.values())
        self.jobs.clear()
        self.batch = self.make_batch()
        return left


def generate_many(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompts: Iterable[torch.Tensor],  # each [L] or [1, L]
    config: GenerationConfig,
    on_result: Callable[[int, GenerationResult], None],
    batch_size: int = 1,
    decode: Callable[[list[int]], str] | None = None,
    on_text: Callable[[str], None] | None = None,
    config_of: Callable[[int], GenerationConfig] | None = None,
) -> PassStats:
    """Generate for every prompt, up to `batch_size` at a time sharing each target pass (continuous
    batching: a finished prompt leaves and the next one from `prompts` takes its place).

    `config` sets the method and tree; `config_of(index)`, when given, is prompt `index`'s own config
    (sampling, seed, limits, stop strings; same method and tree), else every prompt runs with `config`.

    `on_result(index, result)` is called as each prompt finishes (not necessarily in input order).
    `prompts` is read lazily; when reading it fails (a bad prompt), the prompts already in flight are
    finished and delivered first, then the error is raised. `on_text` streams text and needs batch_size 1.
    Returns the counters of every pass the run made.
    """
    config.validate()
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if (config.stop_strings or on_text) and decode is None:
        raise ValueError("stop strings and streaming need a decode function")
    if on_text is not None and batch_size > 1:
        raise UsageError("streaming (--stream) prints one prompt at a time: use --batch-size 1")
    runner = BatchRunner(lambda: Batch(make_decoder(target, draft, config, batch_size)), batch_size)
    queue = enumerate(prompts)
    exhausted, failure = False, None
    while True:
        while not exhausted and runner.n_waiting + runner.n_running < batch_size:
            try:
                item = next(queue, None)
                if item is not None:
                    own = config if config_of is None else config_of(item[0])
                    runner.add(Job(item[0], item[1], own, decode, on_text))
            except Exception as exc:  # a bad prompt: finish the ones in flight, then report it
                item, failure = None, exc
            if item is None:
                exhausted = True
        if runner.idle:
            if failure is not None:
                raise failure
            return runner.batch.stats
        outcomes, _ = runner.step()
        for outcome in outcomes:  # the finished ones first: a failure loses nothing already done
            if outcome.error is None:
                on_result(outcome.job.key, outcome.result)
            elif not outcome.in_pass and failure is None:  # a prompt that cannot start (empty): as a bad
                failure, exhausted = outcome.error, True  # prompt, the ones in flight finish first
        errors = [outcome.error for outcome in outcomes if outcome.in_pass]
        if errors:
            raise errors[0]
