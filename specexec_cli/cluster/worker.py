"""A cluster job's worker: `Worker` is the Ray actor (the driver makes it one with `ray.remote`); it opens
the engine once, as `generate` does (settings from this machine's best profile, memory plan, loaded
pair), and hands it to a `BatchLoop`, which runs the prompts it is sent as one continuous batch on an
engine thread of its own. The driver talks to a worker with one call at a time: `exchange` hands it more
prompts and brings back the results that finished since the last call, with the engine thread's pass
progress (`exchange` answers even while a pass is stuck, so the driver judges a hang by the passes, not
by the calls). BatchLoop has no Ray in it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from specexec_cli.cluster import faults
from specexec_cli.cluster.ledger import Item
from specexec_cli.decoding.config import GenerationConfig, SamplingConfig
from specexec_cli.decoding.generate import Batch, make_decoder
from specexec_cli.decoding.runner import BatchRunner, Outcome
from specexec_cli.decoding.runner import Job as RunnerJob
from specexec_cli.engine import Engine, Workload, log, open_engine
from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.messages import one_line, unexpected
from specexec_cli.prompts import Prompt
from specexec_cli.run import describe, encode_prompt, result_record
from specexec_cli.settings import EngineRequest


@dataclass(frozen=True)
class Job:
    """What every worker of a job runs with, sent once when it starts."""

    request: EngineRequest  # the engine flags, resolved on the worker against its own profile
    max_new_tokens: int
    sampling: SamplingConfig
    stop_strings: tuple[str, ...]
    seed: int | None
    system: str | None
    chat_template: bool
    plan_prompts: tuple[Prompt, ...]  # the job's longest prompts: the memory plan holds them
    n_prompts: int  # prompts in the whole job
    workers_per_node: int = 1  # the most of the job's workers one node holds: each plans 1 / this of its RAM


def error_text(exc: BaseException) -> str:
    """An exception as the CLI would print it: one line (a bug says so)."""
    return one_line(exc) if isinstance(exc, SpecexecError) else unexpected(exc)


RECENT_PASSES = 16  # the passes whose worst time `progress` reports


class BatchLoop:
    """Prompts in, outcomes out: the prompts handed to `exchange` run as one continuous batch on a thread
    of its own, `lanes` at a time; a prompt marked solo runs in a pass of its own. `where` goes into each
    result's JSON line as its "worker" field."""

    def __init__(self, engine: Engine, config: GenerationConfig, system: str | None, chat_template: bool,
                 where: dict[str, str]) -> None:
        self.engine, self.config, self.where = engine, config, where
        self.system, self.chat_template = system, chat_template
        self.lanes = engine.lanes
        self.changed = threading.Condition()
        self.waiting: deque[tuple[Item, Prompt]] = deque()
        self.outbox: list[dict[str, Any]] = []
        self.holding: set[int] = set()  # prompts handed over and not answered yet
        self.fatal: str | None = None  # why the engine thread stopped, if it did
        self.passes = 0  # passes finished (failed ones too)
        self.recent_s: deque[float] = deque(maxlen=RECENT_PASSES)  # their times, the latest last
        self.pass_started: float | None = None  # when the pass running now began (None between passes)
        threading.Thread(target=self._serve, name="specexec-engine", daemon=True).start()

    def exchange(self, items: list[tuple[Item, Prompt]], wait_s: float) -> list[dict[str, Any]]:
        """Queue `items`; return the outcomes that finished since the last call, waiting up to `wait_s`
        seconds for one. An outcome is {"index", "record", "text", "describe"} or {"index", "error",
        "shared"} (shared: the prompt failed in a pass with other prompts), with "pass" (the pass's number)
        when it failed in a pass; a failed pass's outcomes come in one answer. Raises SpecexecError once the
        engine thread has stopped (a bug), so the driver counts this worker as dead. A prompt this loop
        already holds is not queued twice, so the driver may resend a call whose answer it lost."""
        with self.changed:
            fresh = [(item, prompt) for item, prompt in items if item.index not in self.holding]
            self.holding.update(item.index for item, _ in fresh)
            self.waiting.extend(fresh)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.outbox or self.fatal, timeout=wait_s)
            outcomes, self.outbox = self.outbox, []
            if self.fatal and not outcomes:
                raise SpecexecError(f"the engine thread stopped: {self.fatal}")
        return outcomes

    def progress(self) -> dict[str, float]:
        """The engine thread's passes: how many finished, the last and the worst of the recent ones, and how
        long the pass running now has run (0 between passes), in seconds on this machine's clock."""
        with self.changed:
            busy = time.monotonic() - self.pass_started if self.pass_started is not None else 0.0
            return {"passes": self.passes, "last_s": self.recent_s[-1] if self.recent_s else 0.0,
                    "worst_s": max(self.recent_s, default=0.0), "busy_s": busy}

    # --- the engine thread ------------------------------------------------------------------------

    def _timed_step(self, runner: BatchRunner) -> list[Outcome]:
        """One runner step (one pass), its time kept for `progress`."""
        started = time.monotonic()
        with self.changed:
            self.pass_started = started
        try:
            faults.before_pass()  # test-only switches (faults.py); nothing without SPECEXEC_TEST_FAULTS
            outcomes, _ = runner.step()
        finally:
            with self.changed:
                self.pass_started = None
                self.passes += 1
                self.recent_s.append(time.monotonic() - started)
        return outcomes

    def _post(self, *outcomes: dict[str, Any]) -> None:
        """Outcomes out, together (a failed pass's go in one answer, so the driver sees the whole pass)."""
        with self.changed:
            self.outbox += outcomes
            self.holding.difference_update(outcome["index"] for outcome in outcomes)
            self.changed.notify_all()

    def _take_waiting(self, runner: BatchRunner) -> list[tuple[Item, Prompt]]:
        """The prompts handed over since the last pass (waiting for some when the runner has nothing)."""
        with self.changed:
            self.changed.wait_for(lambda: self.waiting or not runner.idle)
            taken = list(self.waiting)
            self.waiting.clear()
            return taken

    def _serve(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # a bug: say so at the next exchange instead of hanging the job
            with self.changed:
                self.fatal = error_text(exc)
                self.changed.notify_all()

    def _run(self) -> None:
        pair = self.engine.pair

        def decode(ids: list[int]) -> str:
            return pair.tokenizer.decode(ids, skip_special_tokens=True)

        runner = BatchRunner(lambda: Batch(make_decoder(pair.target, pair.draft, self.config, self.lanes)),
                             self.lanes)
        while True:
            for item, prompt in self._take_waiting(runner):
                try:
                    ids = encode_prompt(pair, prompt, self.config, self.system, self.chat_template)
                except Exception as exc:  # this prompt alone is bad (too long, empty)
                    self._post({"index": item.index, "error": error_text(exc), "shared": False})
                    continue
                runner.add(RunnerJob(item.index, ids, self.config, decode, solo=item.solo, group=item.group,
                                     payload=prompt))
            outcomes = self._timed_step(runner)
            failed = [o for o in outcomes if o.error is not None and o.in_pass]
            if failed:
                log(f"worker {self.where['actor'][:8]}: a pass failed: {error_text(failed[0].error)}")
                self._post(*[{"index": o.job.key, "error": error_text(o.error), "shared": o.shared,
                              "pass": self.passes} for o in failed])
            for outcome in outcomes:
                if outcome.error is not None:
                    if not outcome.in_pass:
                        self._post({"index": outcome.job.key, "error": error_text(outcome.error),
                                    "shared": False})
                    continue
                prompt, result = outcome.job.payload, outcome.result
                record = {**result_record(prompt, result, self.config), "worker": self.where}
                self._post({"index": outcome.job.key, "record": record, "text": result.text or "",
                            "describe": describe(prompt, result)})


def open_job_engine(job: Job) -> tuple[Engine, GenerationConfig]:
    """The engine a worker runs `job` with, opened as generate opens it (the request resolved against this
    machine's profile, the memory planned for the job's longest prompts), with this node's host memory
    shared among the job's workers placed on it."""
    workload = replace(Workload.of_prompts(job.plan_prompts, job.max_new_tokens, job.system,
                                           job.chat_template), n_prompts=job.n_prompts)
    engine = open_engine(job.request, workload, engines_on_host=job.workers_per_node)
    return engine, engine.config(job.max_new_tokens, job.sampling, job.stop_strings, job.seed)


class Worker:
    """The Ray actor: one engine on one worker (see the module docstring). Opening the engine may fail
    (a model missing on this node): `info` then says why in one line, instead of Ray's traceback."""

    def __init__(self, job: Job) -> None:
        import ray

        context = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU", 0)
        if cpus:
            torch.set_num_threads(max(1, round(cpus)))  # the worker's share of its node's cores
        self.where = {"node": ray.util.get_node_ip_address(), "actor": context.get_actor_id()}
        self.start_error: dict[str, Any] | None = None
        try:
            engine, config = open_job_engine(job)
        except Exception as exc:
            self.start_error = {"error": error_text(exc), "usage": isinstance(exc, UsageError)}
            return
        self.loop = BatchLoop(engine, config, job.system, job.chat_template, self.where)

    def info(self) -> dict[str, Any]:
        """Where this worker runs and what it opened, or {"error", "usage"} when the engine did not open."""
        if self.start_error is not None:
            return {**self.where, **self.start_error}
        engine = self.loop.engine
        return {**self.where, "pid": os.getpid(), "lanes": engine.lanes, "method": engine.method,
                "budget": engine.tree.budget if engine.method != "autoregressive" else None,
                "device": engine.device, "threads": torch.get_num_threads()}

    def exchange(self, items: list[tuple[Item, Prompt]], wait_s: float) -> dict[str, Any]:
        """BatchLoop.exchange of this worker's engine: {"outcomes": [...], "progress": BatchLoop.progress}."""
        faults.before_exchange()
        outcomes = self.loop.exchange(items, wait_s)
        return {"outcomes": outcomes, "progress": self.loop.progress()}
