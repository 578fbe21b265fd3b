"""The Ray actor of a cluster job: it opens the engine once, as `generate` does (settings from this
machine's best profile, memory plan, loaded pair), and runs the prompts it is sent as one continuous
batch on an engine thread of its own. The driver talks to it with one call at a time: `exchange` hands
it more prompts and brings back the results that finished since the last call.

This class is plain Python; the driver makes it an actor with `ray.remote` (specexec_cli/cluster/driver.py).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from specexec_cli.cluster.ledger import Item
from specexec_cli.decoding.config import SamplingConfig
from specexec_cli.decoding.generate import Batch, make_decoder
from specexec_cli.engine import EngineRequest, Workload, log, open_engine
from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.messages import one_line, unexpected
from specexec_cli.prompts import Prompt
from specexec_cli.run import describe, encode_prompt, result_record


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


def error_text(exc: BaseException) -> str:
    return one_line(exc) if isinstance(exc, SpecexecError) else unexpected(exc)


class Worker:
    """One engine on one Ray worker (see the module docstring)."""

    def __init__(self, job: Job) -> None:
        import ray

        context = ray.get_runtime_context()
        cpus = context.get_assigned_resources().get("CPU", 0)
        if cpus:
            torch.set_num_threads(max(1, round(cpus)))  # the worker's share of its node's cores
        self.where = {"node": ray.util.get_node_ip_address(), "actor": context.get_actor_id()}
        self.job = job
        self.start_error: dict[str, Any] | None = None
        workload = replace(Workload.of_prompts(job.plan_prompts, job.max_new_tokens, job.system,
                                               job.chat_template), n_prompts=job.n_prompts)
        try:
            self.engine = open_engine(job.request, workload)
            self.config = self.engine.config(job.max_new_tokens, job.sampling, job.stop_strings, job.seed)
        except Exception as exc:  # told to the driver by info() in one line, not as Ray's traceback
            self.start_error = {"error": error_text(exc), "usage": isinstance(exc, UsageError)}
            return
        self.lanes = self.engine.lanes
        self.changed = threading.Condition()
        self.waiting: deque[tuple[Item, Prompt]] = deque()
        self.outbox: list[dict[str, Any]] = []
        threading.Thread(target=self._run, name="specexec-engine", daemon=True).start()

    def info(self) -> dict[str, Any]:
        """Where this worker runs and what it opened, or {"error", "usage"} when the engine did not open."""
        if self.start_error is not None:
            return {**self.where, **self.start_error}
        tree = self.engine.tree
        return {**self.where, "pid": os.getpid(), "lanes": self.lanes, "method": self.engine.method,
                "budget": tree.budget if self.engine.method != "autoregressive" else None,
                "device": self.engine.device, "threads": torch.get_num_threads()}

    def exchange(self, items: list[tuple[Item, Prompt]], wait_s: float) -> list[dict[str, Any]]:
        """Queue `items`; return the outcomes that finished since the last call, waiting up to `wait_s`
        seconds for one. An outcome is {"index", "record", "text", "describe"} or {"index", "error",
        "shared"} (shared: the prompt failed in a pass with other prompts)."""
        with self.changed:
            self.waiting.extend(items)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.outbox, timeout=wait_s)
            outcomes, self.outbox = self.outbox, []
        return outcomes

    # --- the engine thread ------------------------------------------------------------------------

    def _post(self, outcome: dict[str, Any]) -> None:
        with self.changed:
            self.outbox.append(outcome)
            self.changed.notify_all()

    def _admit(self, batch: Batch, solo_running: bool) -> list[tuple[Item, Prompt]]:
        """Waiting prompts that may join the batch now: up to the free lanes; a solo prompt joins an empty
        batch and nothing joins it."""
        with self.changed:
            self.changed.wait_for(lambda: self.waiting or batch.runs)
            joining: list[tuple[Item, Prompt]] = []
            while self.waiting and not solo_running and len(batch.runs) + len(joining) < self.lanes:
                item, _ = self.waiting[0]
                if item.solo and (batch.runs or joining):
                    break
                joining.append(self.waiting.popleft())
                solo_running = item.solo
            return joining

    def _run(self) -> None:
        pair = self.engine.pair

        def decode(ids: list[int]) -> str:
            return pair.tokenizer.decode(ids, skip_special_tokens=True)

        batch = Batch(make_decoder(pair.target, pair.draft, self.config, self.lanes))
        running: dict[int, tuple[Item, Prompt]] = {}
        while True:
            for item, prompt in self._admit(batch, any(item.solo for item, _ in running.values())):
                try:
                    ids = encode_prompt(pair, prompt, self.config, self.job.system, self.job.chat_template)
                    batch.start(item.index, ids, self.config, decode)
                    running[item.index] = (item, prompt)
                except Exception as exc:  # this prompt alone is bad (too long, empty)
                    self._post({"index": item.index, "error": error_text(exc), "shared": False})
            if not batch.runs:
                continue
            try:
                finished = batch.step()
            except Exception as exc:  # a failed pass fails the prompts in it; the batch starts afresh
                log(f"worker {self.where['actor'][:8]}: a pass failed: {error_text(exc)}")
                shared = len(running) > 1
                for index in list(running):
                    self._post({"index": index, "error": error_text(exc), "shared": shared})
                running.clear()
                batch = Batch(make_decoder(pair.target, pair.draft, self.config, self.lanes))
                continue
            for run in finished:
                _, prompt = running.pop(run.index)
                result = run.result(batch.stats)
                record = {**result_record(prompt, result, self.config), "worker": self.where}
                self._post({"index": run.index, "record": record, "text": result.text or "",
                            "describe": describe(prompt, result)})
