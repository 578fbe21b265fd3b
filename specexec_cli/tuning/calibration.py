"""Calibration: the measured cost-model inputs for one target on this machine (`Calibration`), and
`calibrate()`, which times the target variants and the drafts and measures each draft's acceptance.

Curves are keyed by target variant (space.variant_name: "fp32", or "fp32@disk" under --max-memory). A
variant whose layers stream is timed at three batch sizes only; its curve over every budget comes from
cost_model.streamed_forward_s (max(read time, compute)) instead of timing each budget's pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

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
from specexec_cli.tuning.space import NO_DRAFT, Candidate, SearchSpace, variant_name


@dataclass
class Calibration:
    """The measured cost-model inputs for one target on this machine."""

    target_curves: dict[str, cm.LatencyCurve] = field(default_factory=dict)
    draft_curves: dict[tuple[str, str], cm.LatencyCurve] = field(default_factory=dict)
    acceptance: dict[str, AcceptanceMeasurement] = field(default_factory=dict)
    streamed: dict[str, StreamedMeasurement] = field(default_factory=dict)  # variants whose layers stream
    host_s: float = cm.DEFAULT_HOST_OVERHEAD_S
    seconds: float = 0.0

    def costs(self, candidate: Candidate) -> cm.PairCosts | None:
        target = self.target_curves.get(candidate.variant)
        if target is None:
            return None
        if candidate.autoregressive:
            return cm.PairCosts(target, host_s=self.host_s)
        draft = self.draft_curves.get(candidate.load_key)
        measured = self.acceptance.get(candidate.draft)
        if draft is None:
            return None
        host = measured.host_s_per_iteration if measured else self.host_s
        return cm.PairCosts(target, draft, measured.curve if measured else None, host)

    def predict(self, candidate: Candidate) -> float | None:
        """Predicted decode tokens/s: from the measured acceptance curve, or from the optimistic prior
        for a draft that was not worth measuring (so the search can still rule it out)."""
        costs = self.costs(candidate)
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
        )

    def covers(self, space: SearchSpace) -> bool:
        """Whether every target variant and (draft, variant) pair of `space` has its curves."""
        variants = {variant_name(q, o) for q, o in space.variants}
        pairs = {(d, v) for d in space.speculative_drafts for v in variants}
        return variants <= set(self.target_curves) and pairs <= set(self.draft_curves)


def optimistic_prior() -> cm.AcceptanceCurve:
    """1.5x the paper-level prior: a pair this good is rare, so it bounds what a draft could do."""
    prior = cm.AcceptanceCurve.prior()
    return cm.AcceptanceCurve(tuple(1.0 + 1.5 * (g - 1.0) for g in prior.values))


def target_batches(budgets: tuple[int, ...]) -> list[int]:
    """Batch sizes to time the target at: 1 and every budget + 1 (what a trial's pass holds)."""
    return sorted({1, *(b + 1 for b in budgets)})


def streamed_batches(budgets: tuple[int, ...]) -> list[int]:
    """The few batch sizes a streamed target is timed at: 1, the largest pass, and one in between."""
    passes = [b + 1 for b in budgets]
    middle = min(passes, key=lambda b: abs(b * b - passes[-1]))
    return sorted({1, middle, passes[-1]})


def draft_batches(n_beams: tuple[int, ...]) -> list[int]:
    """Batch sizes to time a draft at: powers of two up to the widest pass, and each max_n_beams."""
    widest = max(n_beams)
    return sorted({*(2**i for i in range(widest.bit_length()) if 2**i <= widest), *n_beams})


def calibration_budget(
    cal: Calibration, space: SearchSpace, draft: str, variant: str, ratio: float
) -> int | None:
    """The largest budget at which `draft` could still reach `ratio` x plain decoding under the
    optimistic prior with a single draft pass; None when no budget could."""
    plain = max(1.0 / (c.at(1) + cal.host_s) for c in cal.target_curves.values())
    target, draft_curve = cal.target_curves[variant], cal.draft_curves[(draft, variant)]
    prior = optimistic_prior()
    hopeful = [
        b
        for b in space.budgets
        if prior.at(b) / (draft_curve.at(1) + target.at(b + 1) + cal.host_s) >= ratio * plain
    ]
    return max(hopeful) if hopeful else None


def calibrate(
    pool: ModelPool,
    space: SearchSpace,
    objective: GenerationObjective,
    iterations_per_prompt: int = 8,
    hopeless_ratio: float = 0.5,
) -> Calibration:
    """Time the target variants and the drafts, then measure each draft's acceptance curve with the
    fastest target variant, at the largest budget that could still pay off. A draft that could not
    get near plain decoding even then is not measured (its predictions use the optimistic prior)."""
    start = time.perf_counter()
    cal = Calibration()
    variants = [variant_name(q, o) for q, o in space.variants]
    for variant in variants:
        log(f"calibrating: target {variant} forward times")
        cal.target_curves[variant] = target_curve(cal, pool.target(variant), variant, space)
    for draft in space.speculative_drafts:
        curves: dict[str, cm.LatencyCurve] = {}  # per weights variant the draft is made from
        for variant in variants:
            weights = pool.draft_variant(draft, variant)
            if weights not in curves:
                log(f"calibrating: draft {draft} ({weights}) forward times")
                model = pool.draft(draft, variant)
                curves[weights] = measure_forward_curve(
                    model, draft_batches(space.n_beams), time_limit_s=10.0
                )
            cal.draft_curves[(draft, variant)] = curves[weights]
    variant = min(variants, key=lambda v: cal.target_curves[v].at(1))
    quant, offload = space.variants[variants.index(variant)]
    widest = Candidate(NO_DRAFT, quant, 0, max(space.n_beams), max(space.beam_lens), offload)
    for draft in space.speculative_drafts:
        budget = calibration_budget(cal, space, draft, variant, hopeless_ratio)
        if budget is None:
            log(f"calibrating: {draft} cannot get near plain decoding at any budget; not measured")
            continue
        log(f"calibrating: acceptance curve of {draft} at budget {budget}")
        config = objective.config(replace(widest, draft=draft, budget=budget))
        # every K up to the budget is read off one tree, so it grows as deep and wide as it can
        config = replace(config, tree=replace(config.tree, draft_cost=0.0))
        cal.acceptance[draft] = measure_acceptance(
            pool.target(variant), pool.draft(draft, variant), objective.prompts, config, iterations_per_prompt
        )
    cal.seconds = time.perf_counter() - start
    return cal


def target_curve(cal: Calibration, model, variant: str, space: SearchSpace) -> cm.LatencyCurve:
    """The target's forward times over the space's passes: timed at each of them when it is in memory;
    timed at three and predicted by the streamed formula when its layers stream."""
    if streamed_layers(model) is None:
        return measure_forward_curve(model, target_batches(space.budgets))
    measured = measure_streamed(model, streamed_batches(space.budgets))
    cal.streamed[variant] = measured
    log(
        f"calibrating: {variant} streams {measured.n_layers - measured.resident_layers} layers at "
        f"{measured.read_bandwidth / 1e9:.2f} GB/s; compute {measured.compute.at(1):.2f} s at 1 token"
    )
    return measured.curve(target_batches(space.budgets))
