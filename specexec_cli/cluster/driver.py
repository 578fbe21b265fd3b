"""The driver of a cluster job (`specexec generate -f PROMPTS --ray ADDRESS`): connect to Ray, start one
worker (specexec_cli/cluster/worker.py) per GPU or per node, send prompts in chunks to the worker with
the least queued work, and write each result as `generate` writes it, in input order unless unordered.

One call at a time is in flight to each worker: first `info` (it returns once the engine is open), then
`exchange` calls that carry new prompts out and finished results back. A call that fails with the
actor gone means the worker died: the ledger (specexec_cli/cluster/ledger.py) gives its unfinished
prompts to the others. Any other failure of an exchange (an error raised in the call) is sent again once
(the worker ignores prompts it already holds) before the worker counts as dead. A worker that holds
prompts and has not finished a pass (or answered a call) within its hang bound, max(floor, HUNG_FACTOR x
its slowest recent pass), is hung: it is killed and its prompts go to the others. A dead or hung worker
is replaced by a fresh one, up to a limit per job (max_replacements); with no worker left and none
allowed, the unfinished prompts are given up. Whatever finished is written before the driver stops,
however it stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from specexec_cli.cluster.ledger import Ledger
from specexec_cli.cluster.worker import Job, Worker, error_text
from specexec_cli.engine import log
from specexec_cli.errors import SpecexecError, Terminated, UsageError
from specexec_cli.messages import one_line
from specexec_cli.prompts import Prompt
from specexec_cli.run import OrderedWriter

INSTALL_HINT = "--ray needs Ray on this machine and every node: pip install 'specexec[ray]'"
WAIT_S = 1.0  # longest an exchange call waits for a result before coming back empty
REPORT_S = 30.0  # progress on stderr at most this often
PLAN_PROMPTS = 64  # the longest prompts each worker's memory plan holds
QUEUE_BATCHES = 2  # a worker holds up to this many batches of prompts: one decoding, one waiting
CHECK_S = 1.0  # the driver looks for hung workers at least this often
HUNG_FACTOR = 10.0  # a pass running this many times the worker's slowest recent pass is hung ...
HUNG_FLOOR_S = 60.0  # ... and never before this many seconds (SPECEXEC_RAY_HUNG_S sets it, for tests)
REPLACEMENTS_PER_WORKER = 2  # a job replaces up to this many dead or hung workers per worker it started


@dataclass
class Summary:
    """What a cluster job did."""

    finished: int = 0  # set from the ledger when the job ends, as is `failed`
    failed: list[str] = field(default_factory=list)  # ids of prompts given up, in input order
    new_tokens: int = 0
    seconds: float = 0.0  # from the first worker ready to the last result
    workers: int = 0  # workers that opened the engine
    replaced: list[str] = field(default_factory=list)  # "w1 hung", "w2 died": workers replaced, in order
    replacement_limit: int = 0  # the most this job could replace
    per_worker: dict[str, int] = field(default_factory=dict)  # worker name -> results it wrote

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def check_reachable(address: str) -> None:
    """A HOST:PORT address must answer before ray.init, which would otherwise retry for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "local", "auto", ray://...: ray.init decides
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise SpecexecError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                            "`ray start --head` on that machine, or use --ray local") from None


def connect(ray: Any, address: str) -> None:
    """ray.init(address), keeping the CLI's SIGTERM handler (ray.init installs its own)."""
    check_reachable(address)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    kwargs = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, log_to_driver=True, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        hint = ""
        if not os.environ.get("RAY_AUTH_MODE"):
            hint = ("; if the cluster uses token authentication (`ray start`'s default), set "
                    "RAY_AUTH_MODE=token and put its token in ~/.ray/auth_token (docs/ray.md)")
        raise SpecexecError(f"could not connect to Ray at {address}: {one_line(exc)}{hint}") from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def default_workers(ray: Any) -> int:
    """One worker per GPU in the cluster, else one per node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus or sum(1 for node in ray.nodes() if node.get("Alive"))


def worker_resources(nodes: list[dict[str, Any]], n_workers: int) -> dict[str, float]:
    """Each worker's reservation, from `ray.nodes()`: a GPU and its share of its node's CPUs (the fewest
    CPUs per GPU of any GPU node, so torch gets more than one thread) when the cluster has GPUs, else an
    equal share of the CPUs (no more than the biggest node has), which also sets its torch threads. More
    workers than GPUs wait for one."""
    alive = [node["Resources"] for node in nodes if node.get("Alive")]
    gpu_nodes = [res for res in alive if res.get("GPU", 0) >= 1]
    if gpu_nodes:
        per_gpu = min(res.get("CPU", 1.0) / res["GPU"] for res in gpu_nodes)
        return {"num_gpus": 1, "num_cpus": float(max(1, int(per_gpu)))}
    node_cpus = [res.get("CPU", 0) for res in alive]
    share = sum(node_cpus) / max(1, n_workers)
    return {"num_cpus": min(float(int(share)) if share >= 1 else share, max(node_cpus, default=1.0))}


def workers_per_node(nodes: list[dict[str, Any]], n_workers: int) -> int:
    """The most of the job's workers one node holds when Ray spreads them evenly (SPREAD) over the nodes
    that can take one (the GPU nodes when there are any, none more than its GPUs): each worker plans
    with 1 / this of its node's free host memory."""
    alive = [node["Resources"] for node in nodes if node.get("Alive")]
    gpu_nodes = [res for res in alive if res.get("GPU", 0) >= 1]
    usable = gpu_nodes or alive
    if not usable:
        return 1
    spread = -(-n_workers // len(usable))  # ceil
    if gpu_nodes:
        spread = min(spread, int(max(res["GPU"] for res in gpu_nodes)))
    return max(1, spread)


def plan_prompts(prompts: list[Prompt]) -> tuple[Prompt, ...]:
    """The longest prompts by characters (a stand-in for tokens: the driver has no tokenizer)."""
    def size(prompt: Prompt) -> int:
        return len(prompt.text) + sum(len(m["content"]) for m in prompt.messages)

    return tuple(sorted(prompts, key=size, reverse=True)[:PLAN_PROMPTS])


def why_lost(ray: Any, exc: BaseException) -> str:
    """Why a call to a worker failed: the actor died, or its __init__ (opening the engine) raised."""
    if isinstance(exc, ray.exceptions.RayActorError):
        lines = (getattr(exc, "error_msg", None) or str(exc)).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        return first if len(first) <= 160 else first[:157] + "..."
    if isinstance(exc, ray.exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
        return error_text(exc.cause)
    return error_text(exc)


def is_transient(ray: Any, exc: BaseException) -> bool:
    """A failed call that may succeed when sent again: anything but the actor being gone."""
    return not isinstance(exc, ray.exceptions.RayActorError)


def env_number(name: str, default: float, zero_ok: bool) -> float:
    """Environment variable `name` as a number > 0 (>= 0 when `zero_ok`), `default` when unset; a bad one
    is a usage error."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if number < 0 or (number == 0 and not zero_ok):
        raise UsageError(f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return number


def hung_floor() -> float:
    """The least time a pass may run before its worker counts as hung: HUNG_FLOOR_S, or the environment
    variable SPECEXEC_RAY_HUNG_S (seconds; tests set a few)."""
    return env_number("SPECEXEC_RAY_HUNG_S", HUNG_FLOOR_S, zero_ok=False)


def max_replacements(n_workers: int) -> int:
    """How many dead or hung workers a job replaces: REPLACEMENTS_PER_WORKER x its workers, or the
    environment variable SPECEXEC_RAY_MAX_REPLACEMENTS (0 replaces none)."""
    return int(env_number("SPECEXEC_RAY_MAX_REPLACEMENTS", REPLACEMENTS_PER_WORKER * n_workers, zero_ok=True))


def hung_bound(worst_pass_s: float, floor: float) -> float:
    """How long a worker's pass may run before it is hung: HUNG_FACTOR x its slowest recent pass, at least
    `floor` seconds (the first pass, with nothing measured yet, gets the floor)."""
    return max(floor, HUNG_FACTOR * worst_pass_s)


def hang_of(progress: dict[str, float] | None, seen_s: float, call_s: float, floor: float) -> str | None:
    """Why a worker holding prompts counts as hung, or None: `progress` is what its last answer reported
    (BatchLoop.progress), `seen_s` how long ago that answer came, `call_s` how long its call in flight has
    been out."""
    worst = progress["worst_s"] if progress else 0.0
    bound = hung_bound(worst, floor)
    busy = progress["busy_s"] + seen_s if progress and progress["busy_s"] > 0 else 0.0
    if busy > bound:
        return f"no pass finished in {busy:.0f} s, over its bound of {bound:.0f} s"
    if call_s > bound + WAIT_S:
        return f"its exchange call has not come back in {call_s:.0f} s, over its bound of {bound:.0f} s"
    return None


class Dispatcher:
    """The driver's loop over its workers' calls (see the module docstring)."""

    def __init__(self, ray: Any, job: Job, prompts: list[Prompt], n_workers: int, writer: OrderedWriter,
                 as_json: bool, verbose: bool) -> None:
        self.ray, self.prompts, self.writer = ray, prompts, writer
        self.as_json, self.verbose = as_json, verbose
        self.ledger = Ledger(len(prompts))
        self.summary = Summary()
        nodes = ray.nodes()
        self.job = replace(job, workers_per_node=workers_per_node(nodes, n_workers))
        self.resources = worker_resources(nodes, n_workers)
        self.actor_class = ray.remote(max_restarts=0)(Worker)  # a dead worker's prompts go to the others
        self.started = 0  # workers started, replacements too: the next one is w{started + 1}
        self.summary.replacement_limit = max_replacements(n_workers)
        self.actors: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.calls: dict[Any, str] = {}  # the one call in flight per worker -> its name
        self.sent: dict[str, list[Any]] = {}  # the prompts of each worker's exchange in flight
        self.retried: set[str] = set()  # workers whose exchange in flight is a resend
        self.sent_at: dict[str, float] = {}  # when each worker's exchange in flight was sent
        self.progress: dict[str, tuple[float, dict[str, float]]] = {}  # its last pass progress, and when
        self.hung_floor = hung_floor()
        for _ in range(n_workers):
            self._start()
        per = ", ".join(f"{key.removeprefix('num_')}={value:g}" for key, value in self.resources.items())
        log(f"ray: starting {n_workers} worker(s) ({per} each); each opens the engine (loads the models)")
        self.first_ready: float | None = None
        self.last_result = 0.0
        self.start_errors: list[dict[str, Any]] = []

    def run(self) -> Summary:
        last_report = time.monotonic()
        while not self.ledger.done:
            if not self.calls:
                self._none_left()
                continue
            done, _ = self.ray.wait(list(self.calls), num_returns=1, timeout=CHECK_S)
            for ref in done:
                self._answer(self.calls.pop(ref), ref)
            self._check_hung()
            if time.monotonic() - last_report >= REPORT_S:
                self._report()
                last_report = time.monotonic()
        self.summary.seconds = (self.last_result - self.first_ready) if self.first_ready else 0.0
        self.summary.finished = len(self.ledger.finished)
        self.summary.failed = [self.prompts[index].id for index in sorted(self.ledger.given_up)]
        return self.summary

    def drain(self) -> None:
        """The job stops early (Ctrl-C): take in the results of the calls in flight, which come back within
        WAIT_S, without sending more work."""
        calls, self.calls = self.calls, {}
        done, _ = self.ray.wait(list(calls), num_returns=len(calls), timeout=2 * WAIT_S + 1)
        for ref in done:
            name = calls.pop(ref)
            try:
                outcomes = self.ray.get(ref)
            except Exception:
                continue
            if name in self.info:
                self._outcomes(name, outcomes["outcomes"])

    def stop(self) -> None:
        for actor in self.actors.values():
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor, no_restart=True)

    # --- one answered call ------------------------------------------------------------------------

    def _answer(self, name: str, ref: Any) -> None:
        try:
            value = self.ray.get(ref)
        except Exception as exc:
            if name in self.info and name not in self.retried and is_transient(self.ray, exc):
                cause = getattr(exc, "cause", None) or exc  # a task error carries the exception it raised
                why = f"{type(cause).__name__}: {one_line(cause)}"  # not a bug report: it may pass
                log(f"ray: an exchange with worker {name} failed ({why}); sending it again")
                self.retried.add(name)
                self._exchange(name, self.sent[name])
                return
            self._lost(name, exc)
            return
        self.retried.discard(name)
        if name not in self.info:
            if "error" in value:
                self._not_started(name, value)
                return
            self._ready(name, value)
        else:
            self.progress[name] = (time.monotonic(), value["progress"])
            self._outcomes(name, value["outcomes"])
        if name in self.actors:
            self._exchange(name, self._items_for(name))

    def _exchange(self, name: str, items: list[Any]) -> None:
        """Send worker `name` its next exchange call, carrying `items`."""
        self.sent[name], self.sent_at[name] = items, time.monotonic()
        self.calls[self.actors[name].exchange.remote(items, WAIT_S)] = name

    def _ready(self, name: str, info: dict[str, Any]) -> None:
        self.info[name] = info
        self.summary.workers += 1
        self.first_ready = self.first_ready or time.monotonic()
        budget = f", budget {info['budget']}" if info.get("budget") else ""
        log(f"ray: worker {name} ready on {info['node']} (actor {info['actor']}, pid {info['pid']}): "
            f"{info['method']}{budget}, {info['lanes']} prompt(s) per pass, {info['device']}, "
            f"{info['threads']} thread(s)")

    def _lost(self, name: str, exc: BaseException) -> None:
        why = why_lost(self.ray, exc)
        if name not in self.info:
            self._not_started(name, {"error": why, "usage": False})
            return
        self._drop(name, f"died ({why})")

    def _check_hung(self) -> None:
        """Kill every ready worker that holds prompts and is hung (see hang_of)."""
        now = time.monotonic()
        for name in [name for name in self.actors if name in self.info and self.ledger.queued(name)]:
            seen, progress = self.progress.get(name, (self.sent_at[name], None))
            why = hang_of(progress, now - seen, now - self.sent_at[name], self.hung_floor)
            if why is not None:
                for ref in [ref for ref, owner in self.calls.items() if owner == name]:
                    del self.calls[ref]  # its answer is not waited for
                self._drop(name, f"hung ({why}) and was killed")

    def _start(self) -> str:
        """Start one worker (it opens the engine; its `info` call answers when it has)."""
        self.started += 1
        name = f"w{self.started}"
        actor = self.actor_class.options(scheduling_strategy="SPREAD", **self.resources).remote(self.job)
        self.actors[name] = actor
        self.ledger.add_worker(name)
        self.calls[actor.info.remote()] = name
        return name

    def _drop(self, name: str, what: str) -> None:
        """Ready worker `name` leaves the job (`what` happened to it: "died (...)", "hung (...) ..."): killed
        for good, replaced while the job's limit allows, its unfinished prompts given to the others (the
        replacement counts among them)."""
        actor = self.actors.pop(name)
        with contextlib.suppress(Exception):  # "unavailable" may be a network blip: it must not come back
            self.ray.kill(actor, no_restart=True)
        if len(self.summary.replaced) < self.summary.replacement_limit:
            self.summary.replaced.append(f"{name} {what.split(' ', 1)[0]}")
            replaced = f"; replaced by {self._start()}"
        else:
            replaced = f"; not replaced (the job's limit of {self.summary.replacement_limit} is reached)"
        again, given_up = self.ledger.worker_lost(name)
        log(f"ray: worker {name} {what}{replaced}; {len(again)} unfinished prompt(s) go to the other workers")
        for index in given_up:
            self._give_up(index)

    def _not_started(self, name: str, info: dict[str, Any]) -> None:
        """Worker `name` could not open the engine (or died doing it): it leaves the job."""
        node = f" on {info['node']}" if info.get("node") else ""
        log(f"ray: worker {name}{node} could not start: {info['error']}")
        self.start_errors.append(info)
        actor = self.actors.pop(name, None)
        if actor is not None:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor, no_restart=True)
        for index in self.ledger.worker_lost(name)[1]:
            self._give_up(index)

    def _outcomes(self, name: str, outcomes: list[dict[str, Any]]) -> None:
        """One answer's outcomes: results, prompts that failed alone, and failed passes (the outcomes of
        one pass, by its number, settled together)."""
        passes: dict[int, list[dict[str, Any]]] = {}
        for outcome in outcomes:
            if "error" in outcome and "pass" in outcome:
                passes.setdefault(outcome["pass"], []).append(outcome)
            else:
                self._outcome(name, outcome)
        for failed in passes.values():
            self._failed(name, [outcome["index"] for outcome in failed], failed[0]["error"])

    def _failed(self, name: str, indices: list[int], error: str) -> None:
        """The prompts `indices` failed on worker `name` in one pass (or one alone)."""
        verdicts = self.ledger.fail(name, indices, error)
        again = [index for index, verdict in verdicts.items() if verdict in ("group", "alone")]
        if again:
            first = (len(again) + 1) // 2
            how = f"in halves of {first} and {len(again) - first}" if len(again) > 1 else "alone"
            log(f"ray: a pass of {len(indices)} prompts failed on {name} ({error}); {len(again)} of them run "
                f"again {how}")
        for index, verdict in verdicts.items():
            if verdict == "given up":
                self._give_up(index)
            elif verdict == "elsewhere":
                log(f"ray: prompt {self.prompts[index].id} failed on {name}; trying another worker ({error})")

    def _outcome(self, name: str, outcome: dict[str, Any]) -> None:
        index = outcome["index"]
        if "error" in outcome:
            self._failed(name, [index], outcome["error"])
            return
        if not self.ledger.finish(index):
            return  # a copy of a result already written
        record = outcome["record"]
        self.summary.new_tokens += record["new_tokens"]
        self.summary.per_worker[name] = self.summary.per_worker.get(name, 0) + 1
        self.last_result = time.monotonic()
        line = json.dumps(record, ensure_ascii=False) if self.as_json else outcome["text"]
        self.writer.put(index, line + "\n")
        if self.verbose:
            log(f"{outcome['describe']} on {name}")

    def _give_up(self, index: int) -> None:
        history = self.ledger.history.get(index)
        tries = len(history.failed_on) if history else 0
        on = f" on {tries} worker(s)" if tries else ""
        log(f"error: prompt {self.prompts[index].id} failed{on}: {self.ledger.given_up[index]}")
        self.writer.put(index, None)

    # --- dispatch ---------------------------------------------------------------------------------

    def _items_for(self, name: str) -> list[Any]:
        """Chunks of waiting prompts for worker `name` while it is the ready worker with the least queued
        work (the others get theirs when their own calls come back, within WAIT_S)."""
        items: list[Any] = []
        lanes = max(1, self.info[name]["lanes"])
        limits = {other: self._limit(other) for other in self.info if other in self.actors}
        while self.ledger.waiting and self.ledger.least_queued(limits, prefer=name) == name:
            chunk = self.ledger.take(name, min(lanes, limits[name] - self.ledger.queued(name)))
            if not chunk:
                break  # what waits has failed on this worker
            items += [(item, self.prompts[item.index]) for item in chunk]
        return items

    def _none_left(self) -> None:
        """Every worker failed to start or died with prompts unfinished: one line, exit 2 when every start
        failed on bad input (an unknown model, say), else 1."""
        if self.start_errors and not self.info:
            why = "; ".join(dict.fromkeys(info["error"] for info in self.start_errors))
            error = UsageError if all(info["usage"] for info in self.start_errors) else SpecexecError
            raise error(f"no Ray worker could open the engine: {why}")
        why = "no Ray worker left"
        if self.summary.replaced:
            why += f" after {len(self.summary.replaced)} replacement(s), the job's limit"
        given_up = self.ledger.give_up_unfinished(why)
        log(f"ray: {why}; {len(given_up)} unfinished prompt(s) given up")
        for index in given_up:
            self.writer.put(index, None)

    def _limit(self, name: str) -> int:
        return self.ledger.holding_limit(self.info[name]["lanes"], QUEUE_BATCHES)

    def _report(self) -> None:
        ready = sum(1 for name in self.info if name in self.actors)
        rate = ""
        if self.first_ready and self.summary.new_tokens:
            rate = f", {self.summary.new_tokens / (time.monotonic() - self.first_ready):.2f} tok/s"
        log(f"ray: {len(self.ledger.finished)}/{self.ledger.n_prompts} prompts done, "
            f"{len(self.ledger.given_up)} failed, {ready} worker(s) running, "
            f"{len(self.actors) - ready} starting{rate}")


def per_worker(summary: Summary) -> str:
    """"w1 9, w2 7": the results each worker wrote."""
    return ", ".join(f"{name} {count}" for name, count in sorted(summary.per_worker.items())) or "none"


def run_on_ray(address: str, job: Job, prompts: list[Prompt], *, workers: int | None, as_json: bool,
               verbose: bool, out: TextIO, unordered: bool = False) -> Summary:
    """Run `prompts` on the Ray cluster at `address` and write each result to `out` (see the module
    docstring). Raises SpecexecError when no worker is left; on any exit, what finished is written, the
    workers are stopped and the driver disconnects (a `local` cluster stops)."""
    ray = import_ray()
    writer = OrderedWriter(out, unordered)
    dispatcher = None
    # Ray prints its workers' and raylets' logs on sys.stdout: they go to stderr, results to `out`
    with contextlib.redirect_stdout(sys.stderr):
        connect(ray, address)
        try:
            n_workers = min(workers or default_workers(ray), len(prompts))
            dispatcher = Dispatcher(ray, job, prompts, n_workers, writer, as_json, verbose)
            try:
                summary = dispatcher.run()
            except (KeyboardInterrupt, Terminated):
                log("ray: stopping; collecting the results the workers have finished")
                dispatcher.drain()
                raise
            log(f"ray: {summary.finished} of {len(prompts)} prompts on {summary.workers} worker(s) "
                f"({per_worker(summary)}), {summary.new_tokens} new tokens in {summary.seconds:.2f} s from "
                f"the first worker ready ({summary.tokens_per_s:.2f} tok/s)")
            if summary.replaced:
                log(f"ray: {len(summary.replaced)} worker(s) replaced ({', '.join(summary.replaced)}); "
                    f"the job's limit is {summary.replacement_limit}")
            return summary
        finally:
            writer.close(prompts)
            if dispatcher is not None:
                dispatcher.stop()
            ray.shutdown()
