"""The engine thread: every admitted request is a lane of one `Batch` (decoding/generate.py), so one target
pass serves all of them; requests that arrive while others decode join at the next iteration, their
prompts entering in pieces over the next passes (chunked prefill, decoding/prefill.py).

The HTTP side (serve/app.py) submits a prompt's token ids with its GenerationConfig and a `Ticket`, then
reads the ticket's events (text pieces, then the result or an error) from its asyncio loop. A ticket
the client gave up on is cancelled; its lane is dropped before the next iteration. Past `max_batch`
lanes requests wait; past `max_queue` waiting ones `submit` refuses (the route answers 503).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import Batch, GenerationResult, make_decoder
from specexec_cli.decoding.runner import BatchRunner, Job
from specexec_cli.serve.metrics import Metrics


class Overloaded(Exception):
    """The waiting queue is full."""


class ShuttingDown(Exception):
    """The server no longer admits requests."""


@dataclass
class Event:
    """What the engine thread tells a request: "text" (a piece of new text), "done" (the result) or
    "error" (a message)."""

    kind: str
    text: str = ""
    result: GenerationResult | None = None


class Ticket:
    """One request's channel from the engine thread back to its asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False  # set by the HTTP side, read by the engine thread
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None  # seconds from submission to the first committed token

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Owns the decoder's batch runner (decoding/runner.py); `submit` from any thread, everything else
    runs on its thread."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None, config: GenerationConfig,
                 decode: Callable[[list[int]], str], max_batch: int, max_queue: int, metrics: Metrics,
                 log: Callable[[str], None] = lambda _message: None) -> None:
        self.target, self.draft, self.config = target, draft, config
        self.decode, self.max_batch, self.max_queue = decode, max_batch, max_queue
        self.metrics, self.log = metrics, log
        self.runner = BatchRunner(lambda: Batch(make_decoder(target, draft, config, max_batch)), max_batch)
        self.tickets: dict[int, Ticket] = {}  # waiting or decoding, by job key; guarded by `cond`
        self.cond = threading.Condition()
        self.admitting = True
        self.closing = False  # cancel everything and end the thread
        self.failure: str | None = None  # why the engine thread stopped, when it did
        self.next_key = 0
        self.thread = threading.Thread(target=self._serve, name="specexec-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        """False once the engine thread has stopped for a fault: /health is then 503, every request an
        error at once."""
        return self.failure is None and (self.thread.is_alive() or not self.thread.ident or self.closing)

    # --- any thread -----------------------------------------------------------------------------

    def submit(self, ids: torch.Tensor, config: GenerationConfig, ticket: Ticket) -> None:
        """Queue a request; raises ShuttingDown or Overloaded (nothing queued then)."""
        with self.cond:
            if self.failure is not None:
                raise ShuttingDown(f"the engine stopped: {self.failure}")
            if not self.admitting:
                raise ShuttingDown
            free = max(0, self.max_batch - self.runner.n_running)
            if self.runner.n_waiting >= self.max_queue + free:
                raise Overloaded
            key, self.next_key = self.next_key, self.next_key + 1
            self.tickets[key] = ticket
            job = Job(key, ids, config, self.decode, lambda piece: ticket.put(Event("text", text=piece)),
                      payload=ticket)
            self.runner.add(job)
            self.metrics.set_gauges(self.runner.n_waiting, self.runner.n_running)
            self.cond.notify()

    def stop_admitting(self) -> None:
        with self.cond:
            self.admitting = False

    @property
    def busy(self) -> int:
        """Requests waiting or decoding."""
        with self.cond:
            return len(self.tickets)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel whatever is still waiting or decoding (each gets an error event) and end the thread."""
        with self.cond:
            self.admitting = False
            self.closing = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # --- the engine thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        """The engine thread: `_run`, and if it cannot go on, every open request answered at once."""
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported to every request and to /health
            self.failure = f"{type(exc).__name__}: {exc}"
            self.log(f"the engine thread stopped: {self.failure}")
            with self.cond:
                self.admitting = False
            self._cancel_all(f"the engine stopped: {self.failure}")

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.runner.idle and not self.closing:
                    self.cond.wait()
                if self.closing:
                    self._cancel_all("the server is shutting down")
                    return
                for key, ticket in self.tickets.items():
                    if ticket.cancelled:
                        self.runner.cancel(key)
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - a fault outside a pass: its requests fail, not the server
                self.log(f"decoding failed: {type(exc).__name__}: {exc}")
                for job in self.runner.reset():
                    self._answer(job, Event("error", text=f"decoding failed: {type(exc).__name__}: {exc}"))
            self.metrics.set_gauges(self.runner.n_waiting, self.runner.n_running)

    def _step(self) -> None:
        stats = self.runner.batch.stats
        batch = self.runner.batch
        before = (stats.target_passes, stats.draft_passes, stats.checked_tokens, batch.prefill_pieces)
        tokens_before = sum(len(run.new_tokens) for run in self.runner.batch.runs)
        outcomes, dropped = self.runner.step()
        with self.cond:
            for job in dropped:
                self.tickets.pop(job.key, None)
        if dropped:
            self.metrics.add(requests_cancelled=len(dropped))
        finished = [o for o in outcomes if o.result is not None]
        runs = [(self.runner.jobs[run.index], run) for run in self.runner.batch.runs]
        now = time.perf_counter()
        for job, run in [*runs, *((o.job, o.run) for o in finished)]:
            if job.payload.first_token_s is None and run.new_tokens:
                job.payload.first_token_s = now - job.payload.submitted
        pass_error = None  # the failed pass's message, logged once
        for outcome in outcomes:
            if outcome.error is None:
                continue
            if outcome.in_pass:
                pass_error = f"{type(outcome.error).__name__}: {outcome.error}"
                self._answer(outcome.job, Event("error", text=f"decoding failed: {pass_error}"))
            else:
                text = f"could not start the request: {outcome.error}"
                self._answer(outcome.job, Event("error", text=text))
        if pass_error is not None:
            self.log(f"decoding failed: {pass_error}")
        else:  # committed tokens; a tree pass commits the accepted ones plus one bonus token per lane
            stats = self.runner.batch.stats
            lanes = sum(run.decoding for _, run in runs) + len(finished)  # a prompt still entering emits none
            emitted = sum(len(run.new_tokens) for _, run in runs) - tokens_before
            emitted += sum(len(o.run.new_tokens) for o in finished)
            target, draft, checked = (stats.target_passes - before[0], stats.draft_passes - before[1],
                                      stats.checked_tokens - before[2])
            tree = checked > 0
            self.metrics.add(target_passes=target, draft_passes=draft, emitted_tokens=emitted,
                             prefill_pieces=self.runner.batch.prefill_pieces - before[3],
                             spec_decode_num_drafts=target if tree else 0,
                             spec_decode_num_draft_tokens=checked,
                             spec_decode_num_accepted_tokens=max(0, emitted - lanes) if tree else 0)
        for outcome in finished:
            run = outcome.run
            self.metrics.add(requests_finished=1, prompt_tokens=run.lane.n - len(run.new_tokens),
                             generation_tokens=len(run.new_tokens))
            self._answer(outcome.job, Event("done", result=outcome.result))

    def _answer(self, job: Job, event: Event) -> None:
        with self.cond:
            self.tickets.pop(job.key, None)
        job.payload.put(event)

    def _cancel_all(self, message: str) -> None:
        """Answer every waiting and running request with `message` and forget them."""
        with self.cond:
            tickets, self.tickets = list(self.tickets.values()), {}
        self.runner.close()
        for ticket in tickets:
            ticket.put(Event("error", text=message))
        if tickets:
            self.metrics.add(requests_cancelled=len(tickets))
