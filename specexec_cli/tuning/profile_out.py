"""The profile `specexec tune` saves: the best measured configuration as generate settings, with what
was measured and predicted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specexec_cli import hardware, profiles
from specexec_cli.tuning.batch_stage import BatchChoice
from specexec_cli.tuning.calibration import Calibration
from specexec_cli.tuning.pool import ModelPool
from specexec_cli.tuning.results import SearchResult
from specexec_cli.tuning.space import Candidate

if TYPE_CHECKING:
    from specexec_cli.tuning.options import TuneOptions


def make_profile(
    target: str,
    best: Candidate,
    result: SearchResult,
    probe: hardware.HardwareProbe,
    options: TuneOptions,
    pool: ModelPool,
    calibration: Calibration,
    batch: BatchChoice | None = None,
) -> profiles.Profile:
    # the spec the best trial ran, its placement as the plan pinned it: what generate resolves again
    settings = (pool.specs.get(best) or pool.spec(best)).profile_settings()
    evaluation = next(e for e in result.evaluations if e.candidate == best)
    plain = result.plain_baseline(best)
    measured = {"tokens_per_s": evaluation.tokens_per_s, "trials": len(result.evaluations)}
    if plain is not None:
        measured["autoregressive_tokens_per_s"] = plain.tokens_per_s
        measured["speedup"] = evaluation.tokens_per_s / plain.tokens_per_s
    spec = result.best_speculative
    if spec is not None and spec.candidate != best:  # what speculation reached, when it did not win
        measured["best_speculative"] = {**spec.candidate.to_dict(), "tokens_per_s": spec.tokens_per_s}
    measured.update(
        max_new_tokens=options.max_new_tokens, prompts=options.n_prompts, temperature=options.temperature
    )
    notes = [result.verdict()]
    if batch is not None:  # the batch stage's choice, for generate's default --batch-size
        settings["batch_size"] = batch.best.batch_size
        speedup = batch.speedup(batch.best)
        measured.update(batch_size=batch.best.batch_size, batch_tokens_per_s=batch.best.tokens_per_s)
        if speedup is not None:
            measured["batch_speedup"] = speedup
        notes.append(batch.summary())
    predicted = {"tokens_per_s": evaluation.predicted} if evaluation.predicted is not None else {}
    return profiles.Profile(
        target=target,
        settings=settings,
        fingerprint=probe.fingerprint,
        hardware=hardware.identity(probe.gpus, probe.host, probe.torch_version),
        measured=measured,
        predicted=predicted,
        probe={**probe.to_dict(), "calibration": calibration.to_dict()},
        source=f"specexec tune (study {result.study_name})",
        notes=notes,
    )
