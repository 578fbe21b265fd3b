"""The models a tuning run measures, opened through the engine (engine.resolve / engine.load, as generate
opens them) and kept between trials in a `ModelPool` (loads are the expensive part).

Every trial is an `EngineSpec` (`trial_spec`): the candidate's draft and draft format, the target's
format and its compute dtype by the engine's rule, the tree, and under --max-memory the placement its
pair was planned for (tuning/space_plan.py: the tier, the budget the plan makes room for). So the spec a
trial measured is the one its profile saves and generate resolves again.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from specexec_cli.decoding.config import TreeConfig
from specexec_cli.engine import (
    Engine,
    EngineSpec,
    LoadedModels,
    Machine,
    Placement,
    Workload,
    compute_dtype,
    load,
    load_draft,
)
from specexec_cli.settings import FLOAT_FORMATS, WEIGHT_FORMATS
from specexec_cli.tuning.space import (
    NO_DRAFT,
    UNCAPPED,
    Candidate,
    generate_draft_name,
    parse_early_exit,
    split_draft_quant,
)

WEIGHT_QUANTS = tuple(f for f in WEIGHT_FORMATS if f not in FLOAT_FORMATS)
ALONE = "alone"  # the placement of a target planned with no separate draft (plain decoding, early exit)


@dataclass(frozen=True)
class PlacementKey:
    """What a placed target is planned for: `plan_for` (a separate draft's key, whose memory the plan
    counts, or ALONE), the tree budget, and a floor of resident layers (an early exit's). Trials whose
    keys are equal share one load."""

    plan_for: str
    budget: int | None = None
    resident_layers: int | None = None

    def __str__(self) -> str:
        floor = f", >= {self.resident_layers} resident" if self.resident_layers else ""
        budget = f" at budget {self.budget}" if self.budget else ""
        return f"planned for {self.plan_for}{budget}{floor}"


PairKeys = Callable[[str, str], PlacementKey]  # (draft key, variant) -> the placement it runs on


def split_variant(variant: str) -> tuple[str, str]:
    """'fp32@disk' -> ('fp32', 'disk'); 'fp32' -> ('fp32', '')."""
    quant, _, offload = variant.partition("@")
    return quant, offload


def trial_spec(candidate: Candidate, target: str, machine: Machine, caps: tuple[str, ...],
               max_branch_width: int, key: PlacementKey | None) -> EngineSpec:
    """The EngineSpec a trial of `candidate` runs: what generate resolves from the profile the tuner
    would save for it (`EngineSpec.profile_settings`)."""
    quant, offload = split_variant(candidate.variant)
    dtype = compute_dtype(machine, quant)
    draft, draft_format = None, "none"
    tree = TreeConfig()
    if not candidate.autoregressive:
        name, int8 = split_draft_quant(candidate.draft)
        draft, draft_format = generate_draft_name(name, target), "int8" if int8 else "none"
        # a cap at least the budget caps nothing (a tree is never deeper than its budget): no cap
        depth = None if candidate.max_beam_len >= candidate.budget else candidate.max_beam_len
        tree = TreeConfig(candidate.budget, candidate.max_n_beams, depth, max_branch_width)
    placement = None
    if offload:
        placement = Placement(offload=offload, max_memory=caps, plan_budget=key.budget if key else None)
    elif quant not in FLOAT_FORMATS:  # 4-bit / int8 weights load through the runtime, planned by it
        placement = Placement(offload="none" if machine.cpu else "auto")
    return EngineSpec(target=target, draft=draft, method="autoregressive" if draft is None else "specexec",
                      tree=tree, weight_format=quant, compute_dtype=dtype, draft_format=draft_format,
                      draft_dtype=dtype, device=machine.device, placement=placement)


def placement_key(candidate: Candidate, target: str) -> str:
    """What a placed target is planned for when `candidate` runs on it: its separate draft (whose memory
    the plan counts), or ALONE for plain decoding and for an early exit of the target itself (no extra
    weights): plain decoding is measured at equal memory, with the draft's share holding target layers."""
    early = parse_early_exit(candidate.draft)
    if candidate.autoregressive or (early is not None and early[0] == target):
        return ALONE
    return candidate.draft


class ModelPool:
    """Opens the engine of each trial and keeps what it loaded (`LoadedModels`): a draft loads once for
    every trial that uses it, a placed target once per placement (`pair_keys(draft, variant)`, the
    planned space's; without it a draft's placement is planned at `budget` and plain decoding's alone).
    Before a load, models the trial does not need are dropped if RAM runs short; under caps, a placed
    target replaces the others."""

    def __init__(self, target: str, machine: Machine, workload: Workload, caps: tuple[str, ...] = (),
                 budget: int | None = None, max_branch_width: int = 8, pair_keys: PairKeys | None = None,
                 first_variant: str | None = None) -> None:
        self.target_name, self.machine, self.workload = target, machine, workload
        self.caps, self.budget, self.max_branch_width = caps, budget, max_branch_width
        self.pair_keys, self.first_variant = pair_keys, first_variant
        self.loaded = LoadedModels()
        self.specs: dict[Candidate, EngineSpec] = {}  # what each measured candidate ran (placement pinned)
        self._tokenizer = None

    @property
    def load_seconds(self) -> float:
        return self.loaded.seconds

    @property
    def float_quant(self) -> str:
        return compute_dtype(self.machine, "gptq")

    def key_for(self, draft: str, variant: str) -> PlacementKey | None:
        """The placement the target `variant` is loaded in to run with `draft` (None: not placed)."""
        if not split_variant(variant)[1]:
            return None
        if self.pair_keys is not None:
            return self.pair_keys(draft, variant)
        if draft == NO_DRAFT:
            return PlacementKey(ALONE, 0)
        early = parse_early_exit(draft)
        if early is not None and early[0] == self.target_name:
            return PlacementKey(ALONE, self.budget, early[1])
        return PlacementKey(draft, self.budget)

    def spec(self, candidate: Candidate) -> EngineSpec:
        return trial_spec(candidate, self.target_name, self.machine, self.caps, self.max_branch_width,
                          self.key_for(candidate.draft, candidate.variant))

    def open(self, candidate: Candidate) -> Engine:
        """The engine `candidate` runs on, loading what is not loaded yet."""
        spec = self.spec(candidate)
        if spec.placement is not None and self.caps:
            self.loaded.drop_placed_targets(spec.placement)
        self._make_room()
        engine = load(spec, self.workload, self.loaded)
        self._tokenizer = self._tokenizer or engine.pair.tokenizer
        self.specs[candidate] = engine.spec
        return engine

    def _make_room(self, min_free_fraction: float = 0.25) -> None:
        memory = psutil.virtual_memory()
        for key in list(self.loaded.models)[:-1]:  # never the most recently used
            if memory.available >= min_free_fraction * memory.total:
                return
            del self.loaded.models[key]
            gc.collect()
            memory = psutil.virtual_memory()

    def set_tokenizer(self, tokenizer: Any) -> None:
        """The target's tokenizer, loaded on its own."""
        self._tokenizer = tokenizer

    def tokenizer(self):
        if self._tokenizer is None:
            from specexec_cli.models.load import load_tokenizer

            self._tokenizer = load_tokenizer(self.target_name)
        return self._tokenizer

    def models_for(self, candidate: Candidate) -> tuple[Any, Any | None]:
        """(target, draft) that `candidate` runs with: the target placed for the candidate's pair."""
        engine = self.open(candidate)
        return engine.pair.target, engine.pair.draft

    def pair_candidate(self, draft: str, variant: str) -> Candidate:
        """A candidate of the pair (draft, variant) at the budget its placement is planned for."""
        quant, offload = split_variant(variant)
        if draft == NO_DRAFT:
            return Candidate(NO_DRAFT, quant, offload=offload)
        key = self.key_for(draft, variant)
        budget = (key.budget if key is not None else None) or self.budget or 1
        return Candidate(draft, quant, budget, 1, UNCAPPED, offload)

    def target(self, variant: str, draft: str = NO_DRAFT) -> Any:
        """The target `variant`, placed (when it is a placed variant) to run with `draft`."""
        return self.models_for(self.pair_candidate(draft, variant))[0]

    def draft(self, key: str, variant: str) -> Any | None:
        """The draft `key` as it runs against the target `variant` (an early exit is cut from it)."""
        if key == NO_DRAFT:
            return None
        return self.models_for(self.pair_candidate(key, variant))[1]

    def separate_draft(self, key: str) -> Any:
        """A separate draft loaded on its own (to count its bytes), as trials load it."""
        return load_draft(self.spec(Candidate(key, self.float_quant, 1, 1, 1)), self.loaded)[0]

    def draft_variant(self, key: str, variant: str) -> str:
        """The weights a draft is made from for a trial on target `variant`: an early exit of the
        target is cut from that variant when it is a float one; every other draft (and an early exit
        of a 4-bit / int8 target, whose layers are bound only while the runtime runs them) comes from
        float weights."""
        early = parse_early_exit(key)
        if early is not None and early[0] == self.target_name and split_variant(variant)[0] in FLOAT_FORMATS:
            return variant
        return self.float_quant

    def plan_of(self, candidate: Candidate) -> Any | None:
        """The placement `candidate` ran on (None: not placed, or not measured)."""
        spec = self.specs.get(candidate)
        return spec.placement if spec is not None and candidate.offload else None

    def offload_settings(self, candidate: Candidate) -> dict:
        """Generate settings that place the target as it was for `candidate`: tier, buffers, resident
        layers."""
        place = self.plan_of(candidate)
        if place is None:
            return {"offload": "none"}
        settings = {"offload": place.offload}
        if place.offload != "none":
            settings.update(buffers=max(2, place.buffers), resident_layers=place.resident_layers)
        return settings
