"""The tuner's batch stage: measured throughput of the chosen configuration at each batch size.

For batch size N, the first N batch prompts are decoded together through `generate_many` (greedy, no
EOS, a fixed number of new tokens each), and the rate is total new tokens / wall seconds, prefill
included: what `generate --batch-size N` delivers on that workload. The fastest size is kept. A size
that runs out of memory ends the stage; the sizes measured before it still count.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import GenerationResult
from specexec_cli.decoding.runner import generate_many
from specexec_cli.errors import SpecexecError
from specexec_cli.tuning import log
from specexec_cli.tuning.batch_workload import BatchWorkload
from specexec_cli.tuning.objective import generation_config
from specexec_cli.tuning.pool import ModelPool
from specexec_cli.tuning.space import Candidate

clock: Callable[[], float] = time.perf_counter  # the stage's wall clock (tests replace it)


@dataclass(frozen=True)
class BatchMeasurement:
    """One batch size's run: new tokens made, wall seconds, or why it failed."""

    batch_size: int
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.error is None and self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BatchChoice:
    """Every size measured and the fastest one."""

    measurements: tuple[BatchMeasurement, ...]
    best: BatchMeasurement

    @property
    def baseline(self) -> BatchMeasurement | None:
        """The batch-1 run, when it succeeded."""
        return next((m for m in self.measurements if m.batch_size == 1 and m.error is None), None)

    def speedup(self, measurement: BatchMeasurement) -> float | None:
        base = self.baseline
        return measurement.tokens_per_s / base.tokens_per_s if base and base.tokens_per_s else None

    def summary(self) -> str:
        speedup = self.speedup(self.best)
        ratio = f", {speedup:.2f}x batch 1" if speedup is not None else ""
        best = self.best
        return f"batch size {best.batch_size}: {best.tokens_per_s:.2f} tok/s on the batch prompts{ratio}"

    def table(self) -> str:
        """batch size | tok/s | speedup vs batch 1, the chosen size marked."""
        lines = [f"{'batch':>5}  {'tok/s':>9}  {'vs batch 1':>10}"]
        for m in self.measurements:
            if m.error is not None:
                lines.append(f"{m.batch_size:>5}  {'failed':>9}  {m.error}")
                continue
            speedup = self.speedup(m)
            ratio = f"{speedup:.2f}x" if speedup is not None else "-"
            mark = "  <- chosen" if m is self.best else ""
            lines.append(f"{m.batch_size:>5}  {m.tokens_per_s:>9.2f}  {ratio:>10}{mark}")
        return "\n".join(lines)


def pick_batch(measurements: Sequence[BatchMeasurement]) -> BatchChoice:
    """The fastest successful size (the smaller one on a tie); SpecexecError when none succeeded."""
    ok = [m for m in measurements if m.error is None and m.tokens_per_s > 0]
    if not ok:
        reasons = "; ".join(f"batch {m.batch_size}: {m.error}" for m in measurements if m.error)
        raise SpecexecError(f"the batch stage measured no batch size ({reasons or 'nothing ran'})")
    best = max(ok, key=lambda m: (m.tokens_per_s, -m.batch_size))
    return BatchChoice(tuple(measurements), best)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def measure_batch(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompts: Sequence[torch.Tensor],
    config: GenerationConfig,
    batch_size: int,
    timer: Callable[[], float] | None = None,
) -> BatchMeasurement:
    """Decode `prompts` [L] together, `batch_size` at a time; tokens and wall seconds."""
    timer = timer or clock
    made = [0]

    def on_result(_index: int, result: GenerationResult) -> None:
        made[0] += result.n_new_tokens

    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    start = timer()
    generate_many(target, draft, list(prompts), config, on_result, batch_size=batch_size)
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    return BatchMeasurement(batch_size, made[0], timer() - start)


def measure_batches(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompts: Sequence[torch.Tensor],
    config: GenerationConfig,
    sizes: Sequence[int],
    timer: Callable[[], float] | None = None,
) -> list[BatchMeasurement]:
    """`measure_batch` for each size, in increasing order, on the first N prompts for size N; stops at
    the first size that runs out of memory (or that the runtime refuses)."""
    measurements = []
    for size in sorted(set(sizes)):
        try:
            measurement = measure_batch(target, draft, prompts[:size], config, size, timer)
        except (SpecexecError, torch.OutOfMemoryError, MemoryError) as exc:
            reason = "out of memory" if _out_of_memory(exc) else str(exc)
            measurements.append(BatchMeasurement(size, error=reason))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        log(f"batch {size}: {measurement.tokens} tokens in {measurement.seconds:.2f} s "
            f"({measurement.tokens_per_s:.2f} tok/s)")
        measurements.append(measurement)
    return measurements


def tune_batch_size(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    candidate: Candidate,
    prompts: Sequence[torch.Tensor],
    sizes: Sequence[int],
    new_tokens: int,
    seed: int = 0,
    max_branch_width: int = 8,
    timer: Callable[[], float] | None = None,
) -> BatchChoice:
    """Measure `candidate` (the search's best) at each batch size, greedily, and pick the fastest; the
    table goes to stderr."""
    config = generation_config(candidate, new_tokens, 0.0, seed, max_branch_width)
    log(f"batch stage: {candidate.label()} at batch sizes {', '.join(map(str, sizes))}, "
        f"{new_tokens} new tokens per prompt")
    choice = pick_batch(measure_batches(target, draft, prompts, config, sizes, timer))
    log("batch sizes on the batch prompts:\n" + choice.table())
    return choice


def run_batch_stage(
    pool: ModelPool,
    candidate: Candidate,
    workload: BatchWorkload,
    tokenizer: Any,
    seed: int = 0,
    max_branch_width: int = 8,
) -> BatchChoice | None:
    """`tune_batch_size` on the pool's models for `candidate`, on the workload's prompts encoded as
    generate encodes them; None, with a warning, when no batch size ran (the search's profile is then
    saved without a batch size rather than lost)."""
    target, draft = pool.models_for(candidate)
    prompts = [torch.tensor(ids, dtype=torch.long) for ids in workload.encoded(tokenizer)]
    try:
        return tune_batch_size(
            target, draft, candidate, prompts, workload.sizes, workload.new_tokens, seed, max_branch_width
        )
    except SpecexecError as exc:
        log(f"warning: {exc}; the profile gets no batch size")
        return None
