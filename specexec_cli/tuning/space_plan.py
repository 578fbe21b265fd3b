"""Which pairs of the search space can run here, decided before any target loads.

Every (target format, offload tier, draft) pair is planned under the caps by the runtime's own planner
(tuning.memory.PlacementPlanner) at each budget of the space, largest first:

- a pair is kept at the largest budget whose plan fits (plain decoding: its 1-token pass);
- an early-exit draft of the target needs its N layers resident: when the planner would stream one of
  them, the pair is replanned with N resident layers;
- a pair is pointless where the same draft and format already run in an earlier tier that keeps every
  layer resident at every budget this pair can run (offload none, or the same all-resident placement),
  and on a CPU the ram tier is left out (its layer store is in
  the same RAM as resident layers: it fits only where offload none fits and copies every layer every
  pass);
- every other pair is left out with one line saying why.

The search then runs on what remains (`SearchSpace.allowed`); nothing remaining is a one-line error.
Each kept pair also gets the placement its trials load (`PairPlan.key`): planned for its draft, at the
largest budget the search will try on it, with the resident floor of an early exit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from specexec_cli.errors import SpecexecError
from specexec_cli.runtime.plan import Plan
from specexec_cli.tuning.memory import PlacementPlanner
from specexec_cli.tuning.pool import ALONE, PlacementKey
from specexec_cli.tuning.space import (
    DEFAULT_PLACEMENT,
    NO_DRAFT,
    SearchSpace,
    parse_early_exit,
    variant_name,
)

# The budget a pair's first placement is planned for, until calibration says which budgets can pay:
# large enough for the trees a streamed target pays for on a CPU, small enough to keep layers resident.
FIRST_PLAN_BUDGET = 256


@dataclass(frozen=True)
class PairPlan:
    """A pair that can run: its largest budget, what its placement is planned for (a separate draft's
    key, or ALONE for plain decoding and an early exit of the target, whose layers are the target's
    own), the resident floor it needs, the budget its placement is planned for, and the planner's plan
    there (None when the target's facts are unknown)."""

    draft: str
    variant: str
    max_budget: int  # 0 for plain decoding
    plan_for: str = ALONE
    resident_floor: int | None = None  # an early exit's layers, when the planner would stream them
    plan_budget: int = 0
    plan: Plan | None = None

    @property
    def key(self) -> PlacementKey:
        """The placement its trials load the target in."""
        return PlacementKey(self.plan_for, self.plan_budget, self.resident_floor)


@dataclass
class SpacePlan:
    """The planned space: the kept pairs by (draft, variant), and one line per pair left out."""

    pairs: dict[tuple[str, str], PairPlan]
    left_out: list[str]

    def restrict(self, space: SearchSpace) -> SearchSpace:
        """`space` holding only the kept pairs, each up to its largest budget."""
        allowed = tuple((d, v, p.max_budget) for (d, v), p in self.pairs.items())
        return replace(space, allowed=allowed)

    def key(self, draft: str, variant: str) -> PlacementKey:
        return self.pairs[(draft, variant)].key

    def resident_layers(self, draft: str, variant: str) -> int | None:
        """Resident layers of the pair's placement as planned (None: unknown)."""
        pair = self.pairs.get((draft, variant))
        return pair.plan.resident_layers if pair is not None and pair.plan is not None else None


def plan_space(space: SearchSpace, planner: PlacementPlanner, unified: bool,
               log: Callable[[str], None]) -> SpacePlan:
    """Plan every pair of `space` (see the module docstring); logs each pair left out."""
    pairs: dict[tuple[str, str], PairPlan] = {}
    left_out: list[str] = []

    def leave(line: str) -> None:
        left_out.append(line)
        log(f"left out: {line}")

    for quant, offload in space.variants:
        variant = variant_name(quant, offload)
        if offload == DEFAULT_PLACEMENT:  # no caps: the loader's own placement, screened per trial
            for draft in space.drafts:
                top = 0 if draft == NO_DRAFT else max(space.budgets)
                pairs[(draft, variant)] = PairPlan(draft, variant, top, plan_budget=top)
            continue  # (not placed: the pool loads it without a placement key)
        if unified and offload == "ram":
            leave(f"{variant}: on a CPU the ram tier keeps its layer store in the same RAM as resident "
                  f"layers, so it fits only where offload none fits and copies every layer every pass")
            continue
        for draft in space.drafts:
            pair, reason = _plan_pair(space, planner, draft, quant, offload)
            if pair is None:
                leave(f"{draft} on {variant}: {reason}")
                continue
            twin = _same_placement(pairs, pair, quant, offload)
            if twin is not None:
                leave(f"{draft} on {variant}: {twin} keeps every layer resident at every budget it can run")
                continue
            pairs[(draft, variant)] = pair
    if not pairs:
        first = left_out[0] if left_out else "the space is empty"
        raise SpecexecError(f"nothing in the search space can run under these caps; {first}")
    return SpacePlan(pairs, left_out)


def _plan_pair(space: SearchSpace, planner: PlacementPlanner, draft: str, quant: str,
               offload: str) -> tuple[PairPlan | None, str]:
    """The pair kept at its largest budget that fits, or (None, why not)."""
    variant = variant_name(quant, offload)
    early = parse_early_exit(draft)
    own_layers = early[1] if early is not None and early[0] == planner.target else None
    budgets = (0,) if draft == NO_DRAFT else tuple(reversed(space.budgets))
    reason = ""
    for budget in budgets:
        try:
            plan = planner.plan(draft, quant, offload, budget)
            floor = None
            if own_layers is not None and plan is not None and plan.resident_layers < own_layers:
                floor = own_layers  # replanned: an early exit runs on the target's first layers
                plan = planner.plan(draft, quant, offload, budget, resident_layers=own_layers)
        except SpecexecError as exc:
            reason = str(exc)
            continue
        first = budget if draft == NO_DRAFT else min(budget, FIRST_PLAN_BUDGET)
        first = max((b for b in space.budgets if b <= first), default=budget) if budget else 0
        if first != budget and plan is not None:
            first_plan = planner.plan(draft, quant, offload, first, resident_layers=floor)
        else:
            first_plan = plan
        plan_for = ALONE if draft == NO_DRAFT or own_layers is not None else draft
        return PairPlan(draft, variant, budget, plan_for, floor, first, first_plan), ""
    return None, reason


def _same_placement(pairs: dict[tuple[str, str], PairPlan], pair: PairPlan, quant: str,
                    offload: str) -> str | None:
    """The variant of a kept pair (same draft and format, an earlier tier) that makes this one pointless:
    tier none (every layer resident) at every budget this pair can run, or the same placement (every
    layer resident, the same device bytes)."""
    if pair.plan is None:
        return None
    for (draft, variant), other in pairs.items():
        other_quant, _, other_tier = variant.partition("@")
        if draft != pair.draft or other_quant != quant or other_tier == offload or other.plan is None:
            continue
        if other.max_budget < pair.max_budget:
            continue
        if other_tier == "none":
            return variant
        if not other.plan.buffers and not pair.plan.buffers and (
                other.plan.resident_layers == pair.plan.resident_layers
                and other.plan.device_bytes == pair.plan.device_bytes):
            return variant
    return None
