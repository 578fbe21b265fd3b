"""The profile `specexec tune` saves: the best measured configuration as generate settings, with what
was measured and predicted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specexec_cli import hardware, profiles
from specexec_cli.tuning.batch_stage import BatchChoice
from specexec_cli.tuning.calibration import Calibration
from specexec_cli.tuning.pool import ModelPool
from specexec_cli.tuning.results import SearchResult
from specexec_cli.tuning.space import Candidate, generate_draft_name, split_draft_quant

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
    settings: dict = {"method": "autoregressive" if best.autoregressive else "specexec"}
    settings["quantization"] = best.quantization
    if not best.autoregressive:
        settings.update(
            draft=generate_draft_name(best.draft, options.target),
            budget=best.budget,
            max_n_beams=best.max_n_beams,
            max_branch_width=options.max_branch_width,
        )
        if best.max_beam_len < best.budget:  # a cap at least the budget caps nothing: none is saved
            settings["max_beam_len"] = best.max_beam_len
    settings.update(pool.offload_settings(best))
    if split_draft_quant(best.draft)[1] == "int8":
        settings["draft_quant"] = "int8"
    if options.max_memory:
        settings["max_memory"] = list(options.max_memory)  # as given: generate plans under the same caps
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
