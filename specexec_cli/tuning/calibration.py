"""Calibration: the measured cost-model inputs for one target on this machine (`Calibration`), and
`calibrate()`, which times the target variants and the drafts and measures each draft's acceptance.

Curves are keyed by target variant (space.variant_name: "fp32", or "fp32@disk" under --max-memory). A
variant whose layers stream is timed at three batch sizes only; its curve over every budget comes from
cost_model.streamed_forward_s (max(read time, compute)) instead of timing each budget's pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from specexec_cli.errors import SpecexecError
from specexec_cli.tuning import cost_model as cm
from specexec_cli.tuning import log
from specexec_cli.tuning.measure import (
    AcceptanceMeasurement,
    StreamedMeasurement,
    measure_acceptance,
    measure_forward_curve,
    measure_streamed,
    streamed_layers,
)
from specexec_cli.tuning.objective import GenerationObjective
from specexec_cli.tuning.pool import ModelPool
from specexec_cli.tuning.progress import StepProgress
from specexec_cli.tuning.space import NO_DRAFT, Candidate, SearchSpace, variant_name


@dataclass
class Calibration:
    """The measured cost-model inputs for one target on this machine. It is filled one measurement at a
    time and saved after each (tune stores it in the study), so a run that stops resumes after the last
    one: `settled` drafts have their final acceptance curve, `left_out` pairs failed to load or run."""

    target_curves: dict[str, cm.LatencyCurve] = field(default_factory=dict)
    draft_curves: dict[tuple[str, str], cm.LatencyCurve] = field(default_factory=dict)
    acceptance: dict[str, AcceptanceMeasurement] = field(default_factory=dict)
    streamed: dict[str, StreamedMeasurement] = field(default_factory=dict)  # variants whose layers stream
    host_s: float = cm.DEFAULT_HOST_OVERHEAD_S
    seconds: float = 0.0
    settled: set[str] = field(default_factory=set)  # drafts whose acceptance needs no larger budget
    left_out: dict[str, str] = field(default_factory=dict)  # "draft | variant" -> why it cannot run

    def costs(self, candidate: Candidate, resident_layers: int | None = None) -> cm.PairCosts | None:
        """The cost model's inputs for `candidate`; a streamed variant's target curve is predicted for
        `resident_layers` (its own placement's) when given, else as it was measured."""
        target = self.target_curves.get(candidate.variant)
        if target is None:
            return None
        streamed = self.streamed.get(candidate.variant)
        if streamed is not None and resident_layers not in (None, streamed.resident_layers):
            target = streamed.curve(list(target.batches), resident_layers)
        if candidate.autoregressive:
            return cm.PairCosts(target, host_s=self.host_s)
        draft = self.draft_curves.get(candidate.load_key)
        measured = self.acceptance.get(candidate.draft)
        if draft is None:
            return None
        host = measured.host_s_per_iteration if measured else self.host_s
        return cm.PairCosts(target, draft, measured.curve if measured else None, host)

    def predict(self, candidate: Candidate, resident_layers: int | None = None) -> float | None:
        """Predicted decode tokens/s: from the measured acceptance curve, or from the optimistic prior
        for a draft that was not worth measuring (so the search can still rule it out)."""
        if pair_name(candidate.draft, candidate.variant) in self.left_out:
            return None
        costs = self.costs(candidate, resident_layers)
        if costs is None:
            return None
        if not candidate.autoregressive and costs.acceptance is None:
            costs = cm.PairCosts(costs.target, costs.draft, optimistic_prior(), costs.host_s)
        return cm.predict_tokens_per_s(costs, candidate.budget, candidate.max_n_beams, candidate.max_beam_len)

    def to_dict(self) -> dict:
        return {
            "target_latency": {q: c.to_dict() for q, c in self.target_curves.items()},
            "draft_latency": [
                {"draft": d, "quantization": q, **c.to_dict()} for (d, q), c in self.draft_curves.items()
            ],
            "acceptance": {d: m.to_dict() for d, m in self.acceptance.items()},
            "streamed": {v: m.to_dict() for v, m in self.streamed.items()},
            "host_s": self.host_s,
            "seconds": self.seconds,
            "settled": sorted(self.settled),
            "left_out": dict(self.left_out),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(
            target_curves={q: cm.LatencyCurve.from_dict(c) for q, c in data["target_latency"].items()},
            draft_curves={
                (c["draft"], c["quantization"]): cm.LatencyCurve.from_dict(c) for c in data["draft_latency"]
            },
            acceptance={d: AcceptanceMeasurement.from_dict(m) for d, m in data["acceptance"].items()},
            streamed={v: StreamedMeasurement.from_dict(m) for v, m in data.get("streamed", {}).items()},
            host_s=float(data["host_s"]),
            seconds=float(data["seconds"]),
            settled=set(data.get("settled", ())),
            left_out=dict(data.get("left_out", {})),
        )

    def covers(self, space: SearchSpace) -> bool:
        """Whether every target variant and (draft, variant) pair of `space` has its curves and every
        draft its final acceptance (or was left out)."""
        variants = {variant_name(q, o) for q, o in space.planned_variants}
        pairs = {(d, v) for d in space.speculative_drafts for v in variants
                 if space.pair_budget(d, v) is not None and pair_name(d, v) not in self.left_out}
        return (variants <= set(self.target_curves) and pairs <= set(self.draft_curves)
                and set(space.speculative_drafts) <= self.settled)


def pair_name(draft: str, variant: str) -> str:
    return f"{draft} | {variant}"


def optimistic_prior() -> cm.AcceptanceCurve:
    """1.5x the paper-level prior: a pair this good is rare, so it bounds what a draft could do."""
    prior = cm.AcceptanceCurve.prior()
    return cm.AcceptanceCurve(tuple(1.0 + 1.5 * (g - 1.0) for g in prior.values))


def target_batches(budgets: tuple[int, ...]) -> list[int]:
    """Batch sizes to time the target at: 1 and every budget + 1 (what a trial's pass holds)."""
    return sorted({1, *(b + 1 for b in budgets)})


def streamed_batches(budgets: tuple[int, ...]) -> list[int]:
    """The batch sizes a streamed target is timed at, smallest first until the step's time is up: 1 and
    passes about four times larger up to the largest (the formula predicts the rest)."""
    passes, out = [b + 1 for b in budgets], {1}
    size = 17
    while size < passes[-1]:
        out.add(size)
        size = 4 * size - 3
    out.add(passes[-1])
    return sorted(out)


def draft_batches(n_beams: tuple[int, ...]) -> list[int]:
    """Batch sizes to time a draft at: powers of two up to the widest pass, and each max_n_beams."""
    widest = max(n_beams)
    return sorted({*(2**i for i in range(widest.bit_length()) if 2**i <= widest), *n_beams})


def plain_rate(cal: Calibration) -> float:
    """The best predicted plain-decoding rate over the calibrated variants."""
    return max(1.0 / (c.at(1) + cal.host_s) for c in cal.target_curves.values())


def calibration_budget(
    cal: Calibration, space: SearchSpace, draft: str, variant: str, ratio: float
) -> int | None:
    """The largest budget (of those the pair can run at) at which `draft` could still reach `ratio` x
    plain decoding under the optimistic prior with a single draft pass; None when no budget could."""
    plain = plain_rate(cal)
    target, draft_curve = cal.target_curves[variant], cal.draft_curves[(draft, variant)]
    prior = optimistic_prior()
    limit = space.pair_budget(draft, variant) or 0
    hopeful = [
        b
        for b in space.budgets
        if b <= limit and prior.at(b) / (draft_curve.at(1) + target.at(b + 1) + cal.host_s) >= ratio * plain
    ]
    return max(hopeful) if hopeful else None


# The first budget an acceptance curve is measured at, and the factor between budgets: each larger
# measurement is made only when the curve measured so far says a tree that large could be faster.
FIRST_ACCEPTANCE_BUDGET = 32
ACCEPTANCE_STEP = 4


def extend_concave(curve: cm.AcceptanceCurve, budget: int) -> cm.AcceptanceCurve:
    """`curve` extended to `budget` as optimistically as a concave curve allows: past its end G grows
    by its last doubling's gain per further doubling (real curves flatten faster), depth held."""
    top = curve.max_budget
    if budget <= top or top < 2:
        return curve
    gain = curve.at(top) - curve.at(top // 2)
    values = list(curve.values) + [curve.at(top) + gain * math.log2(k / top)
                                   for k in range(top + 1, budget + 1)]
    depths = None
    if curve.depths is not None:
        depths = tuple(curve.depths) + (curve.depths[-1],) * (budget - top)
    return cm.AcceptanceCurve(tuple(values), depths)


def next_acceptance_budget(
    cal: Calibration, space: SearchSpace, draft: str, variant: str, cap: int
) -> int | None:
    """The next budget to measure `draft`'s acceptance at, or None when the curve measured so far says no
    larger tree could beat the best budget it covers (or none is left under `cap`)."""
    measured = cal.acceptance.get(draft)
    if measured is None:
        return max((b for b in space.budgets if b <= min(cap, FIRST_ACCEPTANCE_BUDGET)), default=None)
    top = measured.curve.max_budget
    larger = [b for b in space.budgets if top < b <= cap]
    if not larger:
        return None
    step = min(larger, key=lambda b: abs(math.log2(b / (ACCEPTANCE_STEP * top))))
    costs = cal.costs(Candidate(draft, *_split(variant)))
    beams, depth = max(space.n_beams), max(space.beam_lens)
    best_now = max(cm.predict_tokens_per_s(costs, b, beams, depth) for b in space.budgets if b <= top)
    hopeful = replace(costs, acceptance=extend_concave(measured.curve, step))
    could = max(cm.predict_tokens_per_s(hopeful, b, beams, depth) for b in larger if b <= step)
    return step if could > best_now else None


def _split(variant: str) -> tuple[str, int, int, int, str]:
    quant, _, offload = variant.partition("@")
    return quant, 0, 0, 0, offload


def calibrate(
    pool: ModelPool,
    space: SearchSpace,
    objective: GenerationObjective,
    iterations_per_prompt: int = 8,
    hopeless_ratio: float = 0.5,
    *,
    stored: Calibration | None = None,
    save: Callable[[Calibration], None] | None = None,
    timing_draft: Callable[[str], str] | None = None,
    step_limit_s: float = 30.0,
    progress: bool = False,
) -> Calibration:
    """Time the target variants and the drafts, then measure each draft's acceptance curve with the
    fastest target variant: first at a small budget, then at budgets four times larger while the curve
    measured so far says a larger tree could pay (and the optimistic prior does not rule it out). A draft
    that could not get near plain decoding even then is not measured (its predictions use the
    optimistic prior).

    Each measurement is saved as it is made (`save`) and skipped when `stored` has it. A pair that fails
    to load or run is left out (one line; the others go on). `timing_draft(variant)` names the pair whose
    placement a placed variant is timed on (the one that streams the most). Every step stops at
    `step_limit_s` with what it measured."""
    start = time.perf_counter()
    cal = stored or Calibration()
    spent = cal.seconds
    store = save or (lambda _cal: None)

    def keep() -> None:
        cal.seconds = spent + time.perf_counter() - start
        store(cal)

    def leave(draft: str, variant: str, exc: Exception) -> None:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        cal.left_out[pair_name(draft, variant)] = reason
        log(f"left out: {draft} on {variant}: {reason}")
        keep()

    def step(label: str, total: int, limit: float | None) -> StepProgress:
        return StepProgress(label, total, limit, enabled=progress)

    variants = [variant_name(q, o) for q, o in space.planned_variants]
    for variant in variants:
        if variant in cal.target_curves:
            continue
        draft = timing_draft(variant) if timing_draft else NO_DRAFT
        try:
            cal.target_curves[variant] = target_curve(cal, pool.target(variant, draft), variant, space, step,
                                                      step_limit_s)
        except SpecexecError as exc:
            leave(draft, variant, exc)
            continue
        keep()
    variants = [v for v in variants if v in cal.target_curves]
    for draft in space.speculative_drafts:
        curves: dict[str, cm.LatencyCurve] = {}  # per weights variant the draft is made from
        for variant in variants:
            pair = pair_name(draft, variant)
            if space.pair_budget(draft, variant) is None or pair in cal.left_out:
                continue
            if (draft, variant) in cal.draft_curves:
                continue
            weights = pool.draft_variant(draft, variant)
            try:
                if weights not in curves:
                    batches = draft_batches(space.n_beams)
                    bar = step(f"timing draft {draft} ({weights})", len(batches), 10.0)
                    curves[weights] = measure_forward_curve(pool.draft(draft, variant), batches,
                                                            time_limit_s=10.0, progress=bar)
                    bar.close()
            except SpecexecError as exc:
                leave(draft, variant, exc)
                continue
            cal.draft_curves[(draft, variant)] = curves[weights]
            keep()
    for draft in space.speculative_drafts:
        if draft in cal.settled:
            continue
        usable = [v for v in variants if (draft, v) in cal.draft_curves]
        if not usable:
            cal.settled.add(draft)
            continue
        variant = min(usable, key=lambda v: cal.target_curves[v].at(1))
        cap = calibration_budget(cal, space, draft, variant, hopeless_ratio)
        if cap is None:
            log(f"calibrating: {draft} cannot get near plain decoding at any budget; not measured")
            cal.settled.add(draft)
            keep()
            continue
        quant, offload = variant.partition("@")[0], variant.partition("@")[2]
        widest = Candidate(draft, quant, 0, max(space.n_beams), max(space.beam_lens), offload)
        while (budget := next_acceptance_budget(cal, space, draft, variant, cap)) is not None:
            config = objective.config(replace(widest, budget=budget))
            # every K up to the budget is read off one tree, so it grows as deep and wide as it can
            config = replace(config, tree=replace(config.tree, draft_cost=0.0))
            trees = iterations_per_prompt * len(objective.prompts)
            try:
                target, draft_model = pool.models_for(replace(widest, budget=budget))
                bar = step(f"acceptance of {draft} at budget {budget}", trees, step_limit_s)
                try:
                    cal.acceptance[draft] = measure_acceptance(target, draft_model, objective.prompts, config,
                                                               iterations_per_prompt, step_limit_s, bar)
                finally:
                    bar.close()
            except SpecexecError as exc:
                leave(draft, variant, exc)
                break
            measured = cal.acceptance[draft]
            log(f"calibrating: {draft} at budget {budget}: G = {measured.curve.at(budget):.2f} tokens per "
                f"pass over {measured.iterations} trees ({measured.seconds:.0f} s)")
            keep()
        cal.settled.add(draft)
        keep()
    return cal


def target_curve(cal: Calibration, model, variant: str, space: SearchSpace,
                 step: Callable[[str, int, float | None], StepProgress], limit_s: float) -> cm.LatencyCurve:
    """The target's forward times over the space's passes: timed at each of them when it is in memory;
    timed at a few and predicted by the streamed formula when its layers stream (both stop at
    `limit_s`; the curve extrapolates past the last pass timed)."""
    budgets = tuple(b for b in space.budgets if any(
        (space.pair_budget(d, variant) or 0) >= b for d in space.speculative_drafts)) or space.budgets[:1]
    if streamed_layers(model) is None:
        batches = target_batches(budgets)
        bar = step(f"timing target {variant}", len(batches), limit_s)
        curve = measure_forward_curve(model, batches, time_limit_s=limit_s, progress=bar)
        bar.close()
        return curve
    batches = streamed_batches(budgets)
    bar = step(f"timing streamed target {variant}", len(batches), limit_s)
    measured = measure_streamed(model, batches, time_limit_s=limit_s, progress=bar)
    bar.close()
    cal.streamed[variant] = measured
    log(
        f"calibrating: {variant} streams {measured.n_layers - measured.resident_layers} layers at "
        f"{measured.read_bandwidth / 1e9:.2f} GB/s; compute {measured.compute.at(1):.2f} s at 1 token"
    )
    return measured.curve(target_batches(space.budgets))
