"""The tuner's objective: measured decode tokens/s of a candidate, from real generation on the
calibration prompts (`GenerationObjective`), with a `TrialRecord` of what each run did."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.generate import generate
from specexec_cli.tuning.pool import ModelPool
from specexec_cli.tuning.space import Candidate


class _TimeUp(Exception):
    pass


@dataclass
class TrialRecord:
    """What one measured candidate did (for the benchmark's predicted-vs-measured report)."""

    tokens_per_s: float
    tokens: int
    seconds: float
    tokens_per_pass: float | None = None  # decode tokens per target pass (prefill iteration excluded)
    draft_passes_per_iteration: float | None = None
    host_s_per_iteration: float | None = None
    truncated: bool = False


def generation_config(
    candidate: Candidate, max_new_tokens: int, temperature: float, seed: int, max_branch_width: int
) -> GenerationConfig:
    """The GenerationConfig that runs `candidate` (no EOS: every run makes exactly max_new_tokens)."""
    tree = TreeConfig()
    if not candidate.autoregressive:
        tree = TreeConfig(candidate.budget, candidate.max_n_beams, candidate.max_beam_len, max_branch_width)
    return GenerationConfig(
        method="autoregressive" if candidate.autoregressive else "specexec",
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=temperature),
        tree=tree,
        eos_token_ids=(),
        seed=seed,
    )


class GenerationObjective:
    """Measured decode tokens/s of a candidate: real generation on the calibration prompts, same seed,
    fixed new-token count. The prompt's prefill (the first iteration) is not timed: it is the same
    work for every configuration of a target and would only blur the differences."""

    def __init__(
        self,
        pool: ModelPool,
        prompts: list[torch.Tensor],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        max_branch_width: int = 8,
        time_limit_s: float | None = None,
    ) -> None:
        self.pool, self.prompts = pool, prompts
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.max_branch_width, self.time_limit_s = max_branch_width, time_limit_s
        self.records: dict[Candidate, TrialRecord] = {}
        self._warm: set[tuple[str, str]] = set()

    def config(self, candidate: Candidate, max_new_tokens: int | None = None) -> GenerationConfig:
        return generation_config(
            candidate,
            max_new_tokens or self.max_new_tokens,
            self.temperature,
            self.seed,
            self.max_branch_width,
        )

    def _models(self, candidate: Candidate):
        target, draft = self.pool.models_for(candidate)
        if candidate.load_key not in self._warm:  # first use after a load: warm allocator and caches
            generate(target, draft, self.prompts[0], self.config(candidate, 2))
            self._warm.add(candidate.load_key)
        return target, draft

    def _run(self, target, draft, ids: torch.Tensor, config: GenerationConfig, limit: float | None):
        """(decode tokens, decode seconds, decode iterations, result or None when cut at `limit`)."""
        marks: list[tuple[float, int]] = []
        start = time.perf_counter()

        def tick(token_ids: list[int]) -> str:  # called by generate after every iteration
            now = time.perf_counter()
            marks.append((now, len(token_ids)))
            if limit is not None and now - start > limit and len(marks) >= 3:
                raise _TimeUp
            return ""

        try:
            result = generate(target, draft, ids, config, decode=tick, on_text=lambda _: None)
        except _TimeUp:
            result = None
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        iterations = len({n for _, n in marks}) - 1  # every iteration adds a token; the last tick repeats
        if n1 <= n0 or t1 <= t0:  # one iteration made everything: time it whole
            t0, n0, iterations = start, 0, 1
        return n1 - n0, t1 - t0, iterations, result

    def __call__(self, candidate: Candidate) -> float:
        target, draft = self._models(candidate)
        return self.measure(candidate, target, draft)

    def measure(self, candidate: Candidate, target, draft, record: bool = True) -> float:
        """Measured decode tokens/s of `candidate` run on these models (`record`: keep its TrialRecord)."""
        config = self.config(candidate)
        tokens, seconds, iterations = 0, 0.0, 0
        draft_passes, host, stats_iterations, truncated = 0, 0.0, 0, False
        limit = self.time_limit_s / len(self.prompts) if self.time_limit_s else None
        for ids in self.prompts:
            n, s, k, result = self._run(target, draft, ids, config, limit)
            tokens, seconds, iterations = tokens + n, seconds + s, iterations + k
            if result is None:
                truncated = True
            else:
                draft_passes += result.stats.draft_passes
                stats_iterations += result.stats.iterations
                host += result.host_s
        rate = tokens / seconds
        if not record:
            return rate
        self.records[candidate] = TrialRecord(
            tokens_per_s=rate,
            tokens=tokens,
            seconds=seconds,
            tokens_per_pass=tokens / iterations if iterations else None,
            draft_passes_per_iteration=draft_passes / stats_iterations if stats_iterations else None,
            host_s_per_iteration=host / stats_iterations if stats_iterations else None,
            truncated=truncated,
        )
        return rate
