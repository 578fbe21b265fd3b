"""The engine thread: every admitted request is a lane of one `Batch` (decoding/generate.py), so one target
pass serves all of them; requests that arrive while others decode join at the next iteration.

The HTTP side (serve/app.py) submits a prompt's token ids with its GenerationConfig and a `Ticket`, then
reads the ticket's events (text pieces, then the result or an error) from its asyncio loop. A ticket
the client gave up on is cancelled; its lane is dropped before the next iteration. Past `max_batch`
lanes requests wait; past `max_queue` waiting ones `submit` refuses (the route answers 503).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import Batch, GenerationResult, make_decoder
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


@dataclass
class _Waiting:
    ids: torch.Tensor
    config: GenerationConfig
    ticket: Ticket


class Scheduler:
    """Owns the decoder and the batch; `submit` from any thread, everything else runs on its thread."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None, config: GenerationConfig,
                 decode: Callable[[list[int]], str], max_batch: int, max_queue: int, metrics: Metrics,
                 log: Callable[[str], None] = lambda _message: None) -> None:
        self.target, self.draft, self.config = target, draft, config
        self.decode, self.max_batch, self.max_queue = decode, max_batch, max_queue
        self.metrics, self.log = metrics, log
        self.batch = self._new_batch()
        self.tickets: dict[int, Ticket] = {}
        self.waiting: deque[_Waiting] = deque()
        self.cond = threading.Condition()
        self.admitting = True
        self.closing = False  # cancel everything and end the thread
        self.next_key = 0
        self.thread = threading.Thread(target=self._run, name="specexec-engine", daemon=True)

    def _new_batch(self) -> Batch:
        return Batch(make_decoder(self.target, self.draft, self.config, self.max_batch))

    def start(self) -> None:
        self.thread.start()

    # --- any thread -----------------------------------------------------------------------------

    def submit(self, ids: torch.Tensor, config: GenerationConfig, ticket: Ticket) -> None:
        """Queue a request; raises ShuttingDown or Overloaded (nothing queued then)."""
        with self.cond:
            if not self.admitting:
                raise ShuttingDown
            free = max(0, self.max_batch - len(self.batch.runs))
            if len(self.waiting) >= self.max_queue + free:
                raise Overloaded
            self.waiting.append(_Waiting(ids, config, ticket))
            self.metrics.set_gauges(len(self.waiting), len(self.batch.runs))
            self.cond.notify()

    def stop_admitting(self) -> None:
        with self.cond:
            self.admitting = False

    @property
    def busy(self) -> int:
        """Requests waiting or decoding."""
        with self.cond:
            return len(self.waiting) + len(self.tickets)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel whatever is still waiting or decoding (each gets an error event) and end the thread."""
        with self.cond:
            self.admitting = False
            self.closing = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # --- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.batch.runs and not self.closing:
                    self.cond.wait()
                if self.closing:
                    self._cancel_all("the server is shutting down")
                    return
                admitted = []
                while self.waiting and len(self.batch.runs) + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            for item in admitted:
                self._admit(item)
            self._drop_cancelled()
            if self.batch.runs:
                self._step()
            self.metrics.set_gauges(len(self.waiting), len(self.batch.runs))

    def _admit(self, item: _Waiting) -> None:
        if item.ticket.cancelled:
            self.metrics.add(requests_cancelled=1)
            return
        key, self.next_key = self.next_key, self.next_key + 1
        ticket = item.ticket
        try:
            self.batch.start(key, item.ids, item.config, self.decode,
                             on_text=lambda piece: ticket.put(Event("text", text=piece)))
        except Exception as exc:  # noqa: BLE001 - reported to this request only
            ticket.put(Event("error", text=f"could not start the request: {exc}"))
            return
        self.tickets[key] = ticket

    def _drop_cancelled(self) -> None:
        for run in list(self.batch.runs):
            if self.tickets[run.index].cancelled:
                self.batch.drop(run)
                del self.tickets[run.index]
                self.metrics.add(requests_cancelled=1)

    def _step(self) -> None:
        stats = self.batch.stats
        before = (stats.target_passes, stats.draft_passes, stats.checked_tokens)
        lanes = len(self.batch.runs)
        tokens_before = sum(len(run.new_tokens) for run in self.batch.runs)
        try:
            finished = self.batch.step()
        except Exception as exc:  # noqa: BLE001 - a failed pass fails the requests in it, not the server
            self.log(f"decoding failed: {type(exc).__name__}: {exc}")
            self._cancel_all(f"decoding failed: {type(exc).__name__}: {exc}")
            self.batch = self._new_batch()  # its caches may be half-updated: start afresh
            return
        now = time.perf_counter()
        for run in [*self.batch.runs, *finished]:
            ticket = self.tickets[run.index]
            if ticket.first_token_s is None and run.new_tokens:
                ticket.first_token_s = now - ticket.submitted
        # committed tokens; a tree pass commits the accepted ones plus one bonus token per lane
        emitted = sum(len(run.new_tokens) for run in [*self.batch.runs, *finished]) - tokens_before
        target, draft, checked = (stats.target_passes - before[0], stats.draft_passes - before[1],
                                  stats.checked_tokens - before[2])
        tree = checked > 0
        self.metrics.add(target_passes=target, draft_passes=draft, emitted_tokens=emitted,
                         spec_decode_num_drafts=target if tree else 0, spec_decode_num_draft_tokens=checked,
                         spec_decode_num_accepted_tokens=max(0, emitted - lanes) if tree else 0)
        for run in finished:
            ticket = self.tickets.pop(run.index)
            result = run.result(stats)
            self.metrics.add(requests_finished=1, prompt_tokens=run.lane.n - len(run.new_tokens),
                             generation_tokens=len(run.new_tokens))
            ticket.put(Event("done", result=result))

    def _cancel_all(self, message: str) -> None:
        for item in self.waiting:
            item.ticket.put(Event("error", text=message))
        self.waiting.clear()
        for run in list(self.batch.runs):
            ticket = self.tickets.pop(run.index)
            ticket.put(Event("error", text=message))
            self.metrics.add(requests_cancelled=1)
            try:
                self.batch.drop(run)
            except Exception:  # noqa: BLE001 - the batch is being thrown away
                self.batch.runs.remove(run)

