"""Loading the models a tuning run measures: target variants per quantization (and offload tier under
--max-memory), drafts per key, kept in a `ModelPool` between trials (loads are the expensive part)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import psutil
import torch

from specexec_cli.errors import SpecexecError
from specexec_cli.tuning import log
from specexec_cli.tuning.memory import variant_source
from specexec_cli.tuning.space import NO_DRAFT, Candidate, parse_early_exit, split_draft_quant

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
WEIGHT_QUANTS = ("nf4", "int8", "gptq", "awq", "w4a16")


LoadFn = Callable[[str, str, torch.device], tuple[Any, Any]]


@dataclass(frozen=True)
class Placement:
    """How a target variant is placed under --max-memory: the tier, the caps, and what else the memory
    plan must fit (the budget the placement is planned for, the context, the draft), and a floor of
    resident layers (an early-exit draft needs its layers on the device; None: as many as fit)."""

    offload: str  # none | ram | disk
    max_memory: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    context_len: int | Callable[[Any], int] = 2048  # or a function of the tokenizer (a batch workload)
    draft: Any = None
    resident_layers: int | None = None

    def for_tokenizer(self, tokenizer: Any) -> Placement:
        """This placement with its context worked out for `tokenizer` (a no-op when it is a number)."""
        if callable(self.context_len):
            return replace(self, context_len=int(self.context_len(tokenizer)))
        return self


@dataclass(frozen=True)
class PlacementKey:
    """What a placed target is planned for: `plan_for` (a separate draft's key, whose memory the plan
    counts, or ALONE), the tree budget, and a floor of resident layers. Trials whose keys are equal
    share one load."""

    plan_for: str
    budget: int | None = None
    resident_layers: int | None = None

    def __str__(self) -> str:
        floor = f", >= {self.resident_layers} resident" if self.resident_layers else ""
        budget = f" at budget {self.budget}" if self.budget else ""
        return f"planned for {self.plan_for}{budget}{floor}"


# Loads a target variant placed under the caps; the placement's context may be a function of the
# tokenizer, which the loader resolves with Placement.for_tokenizer once it has loaded the tokenizer.
StreamFn = Callable[[str, str, torch.device, Placement], tuple[Any, Any]]


def split_variant(variant: str) -> tuple[str, str]:
    """'fp32@disk' -> ('fp32', 'disk'); 'fp32' -> ('fp32', '')."""
    quant, _, offload = variant.partition("@")
    return quant, offload


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(quant: str, device: torch.device) -> torch.dtype:
    """The float dtype a quantization computes in on `device`."""
    if quant in FLOAT_DTYPES:
        return FLOAT_DTYPES[quant]
    return torch.float16 if device.type == "cuda" else torch.float32


def load_variant(name: str, quant: str, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) of `name` in quantization `quant` on `device`.

    Float variants load resident. 4-bit / int8 variants load through the offloaded runtime, which
    plans the tier (resident, host RAM or disk) and buffers; on a CPU they stay resident.
    """
    from specexec_cli.models.load import load_model, load_tokenizer

    if quant in FLOAT_DTYPES:
        return load_model(name, device=device, dtype=FLOAT_DTYPES[quant])
    from specexec_cli.runtime.target import load_offloaded_target

    spec, source = variant_source(name, quant)
    offload = "none" if device.type == "cpu" else "auto"
    model = load_offloaded_target(
        source, device=device, quant=quant, offload=offload, resident_layers=None, buffers=2
    )
    return model, load_tokenizer(spec)


def load_placed_variant(name: str, quant: str, device: torch.device, placement: Placement) -> tuple[Any, Any]:
    """(model, tokenizer) of target `name` through the offloaded runtime in `placement`'s tier under its
    caps: the planner keeps as many layers resident as the largest budget leaves room for."""
    from specexec_cli.models.load import load_tokenizer

    spec, source = variant_source(name, quant)
    tokenizer = load_tokenizer(spec)
    return load_planned(source, quant, device, placement.for_tokenizer(tokenizer)), tokenizer


def load_planned(source: Any, quant: str, device: torch.device, placement: Placement,
                 hardware: Any = None) -> Any:
    """load_offloaded_target at the placement's budget, or at the largest budget the plan allows when
    that one does not fit (the trials above it are then ruled out by the memory check or fail)."""
    from specexec_cli.runtime.target import load_offloaded_target, plan_target

    kwargs = dict(
        device=device, quant=quant, offload=placement.offload, buffers=2, context_len=placement.context_len,
        draft=placement.draft, max_memory=placement.max_memory, hardware=hardware,
    )
    resident = None
    if placement.resident_layers:  # a floor: as many as fit when that is enough, else exactly the floor
        auto = plan_target(source, budget=placement.budget, resident_layers=None, **kwargs)
        resident = None if auto.resident_layers >= placement.resident_layers else placement.resident_layers
    try:
        model = load_offloaded_target(source, budget=placement.budget, resident_layers=resident, **kwargs)
    except SpecexecError:
        if placement.budget is None:
            raise
        model = load_offloaded_target(source, budget=None, resident_layers=resident, **kwargs)
    log(f"offload plan ({quant}): {model.offload_engine.plan.summary()}")
    return model


ALONE = "alone"  # the placement of a target planned with no draft and no tree (plain decoding)


def placement_key(candidate: Candidate, target: str) -> str:
    """What a placed target is planned for when `candidate` runs on it: its separate draft (whose memory
    the plan counts), or ALONE for plain decoding and for an early exit of the target itself (no extra
    weights): plain decoding is measured at equal memory, with the draft's share holding target layers."""
    early = parse_early_exit(candidate.draft)
    if candidate.autoregressive or (early is not None and early[0] == target):
        return ALONE
    return candidate.draft


PairKeys = Callable[[str, str], PlacementKey]  # (draft key, variant) -> the placement it runs on


class ModelPool:
    """Loads the target per variant and drafts per key on first use, and keeps them.

    A variant is a quantization ("fp32"), or a quantization placed in an offload tier ("fp32@disk",
    see space.variant_name) loaded by `stream_fn` under `placement`'s caps and planned for what runs on
    it: `pair_keys(draft, variant)` gives the PlacementKey (the planned space's placements,
    tuning/space_plan.py); without it a draft's placement is planned at `placement.budget` and plain
    decoding's alone (`placement_key`). Early-exit drafts ("name[:n]") share the weights of the model
    they are cut from: from the target variant of the trial when cut from the target, else from the
    full model in float. Drafts keyed "name@int8" are the float draft quantized to int8
    (runtime/int8_cpu.py). Before a load, models the current trial does not need are dropped if RAM runs
    short; under caps, a placed target replaces the others.
    """

    def __init__(
        self,
        target: str,
        device: torch.device,
        load_fn: LoadFn = load_variant,
        stream_fn: StreamFn = load_placed_variant,
        placement: Placement | None = None,
        first_variant: str | None = None,
        pair_keys: PairKeys | None = None,
    ) -> None:
        self.target_name, self.device, self.load_fn, self.stream_fn = target, device, load_fn, stream_fn
        self.placement = placement  # caps, budget, context of placed targets
        self.first_variant = first_variant
        self.pair_keys = pair_keys
        self.models: dict[tuple[str, str, PlacementKey | None], Any] = {}  # (name, variant, key) -> model
        self.plans: dict[tuple[str, PlacementKey], Any] = {}  # (variant, key) -> the runtime's plan
        self._tokenizer = None
        self._unchecked: list[Any] = []  # draft tokenizers loaded before the target's
        self.load_seconds = 0.0
        self.on_draft_loaded: Callable[[str, Any], None] | None = None  # (key, model): the plan counts it

    @property
    def float_quant(self) -> str:
        return "fp16" if self.device.type == "cuda" else "fp32"

    def key_for(self, draft: str, variant: str) -> PlacementKey | None:
        """The placement the target `variant` is loaded in to run with `draft` (None: not placed)."""
        if not split_variant(variant)[1]:
            return None
        if self.pair_keys is not None:
            return self.pair_keys(draft, variant)
        if draft == NO_DRAFT:
            return PlacementKey(ALONE, 0)
        budget = self.placement.budget if self.placement else None
        early = parse_early_exit(draft)
        if early is not None and early[0] == self.target_name:  # its layers must stay resident
            return PlacementKey(ALONE, budget, early[1])
        return PlacementKey(draft, budget)

    def _load(self, name: str, variant: str, keep: set, key: PlacementKey | None = None) -> Any:
        slot = (name, variant, key)
        if slot not in self.models:
            quant, offload = split_variant(variant)
            if offload:
                self._drop_placed_targets()
            self._make_room(keep)
            draft = self._plan_draft(key.plan_for, keep) if key is not None else None
            log(f"loading {name} ({variant}, {key})" if key is not None else f"loading {name} ({variant})")
            start = time.perf_counter()
            base, draft_quant = split_draft_quant(name)
            if key is not None:
                placement = replace(self.placement or Placement(offload), offload=offload, draft=draft,
                                    budget=key.budget, resident_layers=key.resident_layers)
                model, tokenizer = self.stream_fn(name, quant, self.device, placement)
            else:
                model, tokenizer = self.load_fn(base, quant, self.device)
                if draft_quant == "int8":
                    from specexec_cli.runtime.int8_cpu import quantize_draft_int8

                    model = quantize_draft_int8(model)
            self.load_seconds += time.perf_counter() - start
            if name == self.target_name:
                self._tokenizer = self._tokenizer or tokenizer
            self._unchecked.append(tokenizer)
            if self._tokenizer is not None:  # a draft must map text to the same ids as the target
                from specexec_cli.models.load import check_compatible

                for other in self._unchecked:
                    if other is not self._tokenizer:
                        check_compatible(self._tokenizer, other)
                self._unchecked.clear()
            self.models[slot] = model
            if name != self.target_name and parse_early_exit(name) is None and self.on_draft_loaded:
                self.on_draft_loaded(name, model)
        else:  # most recently used last
            self.models[slot] = self.models.pop(slot)
        return self.models[slot]

    def _plan_draft(self, plan_for: str, keep: set) -> Any:
        """The separate draft a placed target's memory plan counts (loaded first), if any."""
        if plan_for in (ALONE, NO_DRAFT, "") or parse_early_exit(plan_for):
            return None
        return self.separate_draft(plan_for, keep)

    def separate_draft(self, key: str, keep: set = frozenset()) -> Any:
        """A separate (not early-exit) draft, in float or int8 ("name@int8")."""
        return self._load(key, self.float_quant, set(keep) | {(key, self.float_quant, None)})

    def _drop_placed_targets(self) -> None:
        """Under caps one placed target fits at a time: drop the others and the drafts cut from them."""
        for name, variant, key in list(self.models):
            if split_variant(variant)[1] and (name == self.target_name or parse_early_exit(name)):
                del self.models[(name, variant, key)]
        gc.collect()

    def _make_room(self, keep: set, min_free_fraction: float = 0.25) -> None:
        memory = psutil.virtual_memory()
        for slot in list(self.models):
            if memory.available >= min_free_fraction * memory.total:
                return
            if slot not in keep:
                del self.models[slot]
                gc.collect()
                memory = psutil.virtual_memory()

    def set_tokenizer(self, tokenizer: Any) -> None:
        """The target's tokenizer, loaded on its own: drafts are checked against it as they load."""
        self._tokenizer = tokenizer

    def tokenizer(self):
        if self._tokenizer is None:
            variant = self.first_variant or self.float_quant
            self.target(variant, NO_DRAFT)
        return self._tokenizer

    def target(self, variant: str, draft: str = NO_DRAFT) -> Any:
        """The target `variant`, placed (when it is a placed variant) to run with `draft`."""
        key = self.key_for(draft, variant)
        model = self._load(self.target_name, variant, {(self.target_name, variant, key)}, key)
        engine = getattr(model, "offload_engine", None)
        if key is not None and engine is not None and engine.plan is not None:
            self.plans[(variant, key)] = engine.plan
        return model

    def models_for(self, candidate: Candidate) -> tuple[Any, Any | None]:
        """(target, draft) that `candidate` runs with: the target placed for the candidate's draft."""
        target = self.target(candidate.variant, candidate.draft)
        return target, self.draft(candidate.draft, candidate.variant)

    def draft_variant(self, key: str, variant: str) -> str:
        """The weights a draft is made from for a trial on target `variant`: an early exit of the
        target is cut from that variant when it is a float one; every other draft (and an early exit
        of a 4-bit / int8 target, whose layers are bound only while the runtime runs them) comes from
        float weights."""
        early = parse_early_exit(key)
        if early is not None and early[0] == self.target_name and split_variant(variant)[0] in FLOAT_DTYPES:
            return variant
        return self.float_quant

    def draft(self, key: str, variant: str) -> Any | None:
        if key == NO_DRAFT:
            return None
        weights = self.draft_variant(key, variant)
        early = parse_early_exit(key)
        target_slot = (self.target_name, variant, self.key_for(key, variant))
        if early is None:
            return self.separate_draft(key, {target_slot})
        base, n_layers = early
        cut_from_target = base == self.target_name and weights == variant
        slot = (key, weights, target_slot[2] if cut_from_target else None)
        if slot not in self.models:
            from specexec_cli.models.load import make_early_exit_draft

            if cut_from_target:
                source = self.target(variant, key)
            else:
                source = self._load(base, weights, {target_slot, (base, weights, None)})
            self.models[slot] = make_early_exit_draft(source, n_layers)
        return self.models[slot]

    def plan_of(self, candidate: Candidate) -> Any | None:
        """The runtime's memory plan of the target `candidate` ran on (None: not placed, or not loaded)."""
        key = self.key_for(candidate.draft, candidate.variant)
        return self.plans.get((candidate.variant, key)) if key is not None else None

    def offload_settings(self, candidate: Candidate) -> dict:
        """Generate settings that place the target as it was for `candidate`: tier, buffers, resident
        layers."""
        plan = self.plan_of(candidate)
        if plan is None:
            return {"offload": "none"}
        settings = {"offload": plan.offload}
        if plan.offload != "none":
            settings.update(buffers=max(2, plan.buffers), resident_layers=plan.resident_layers)
        return settings
