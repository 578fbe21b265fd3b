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
from specexec_cli.tuning.space import NO_DRAFT, Candidate, parse_early_exit, split_draft_quant

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
WEIGHT_QUANTS = ("nf4", "int8", "gptq", "awq", "w4a16")


LoadFn = Callable[[str, str, torch.device], tuple[Any, Any]]


@dataclass(frozen=True)
class Placement:
    """How a target variant is placed under --max-memory: the tier, the caps, and what else the memory
    plan must fit (the largest budget searched, the context, the draft)."""

    offload: str  # none | ram | disk
    max_memory: dict[str, int] = field(default_factory=dict)
    budget: int | None = None
    context_len: int | Callable[[Any], int] = 2048  # or a function of the tokenizer (a batch workload)
    draft: Any = None

    def for_tokenizer(self, tokenizer: Any) -> Placement:
        """This placement with its context worked out for `tokenizer` (a no-op when it is a number)."""
        if callable(self.context_len):
            return replace(self, context_len=int(self.context_len(tokenizer)))
        return self


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


def _registry_source(name: str, quant: str):
    from specexec_cli.models.load import local_source
    from specexec_cli.models.registry import QUANT_VARIANTS, resolve

    spec = resolve(name)
    if quant in QUANT_VARIANTS and spec.quantization != quant and spec.kind != "local":
        spec = spec.quantized_variant(quant)  # a quantized folder or hub id is its own variant
    return spec, str(local_source(spec) or spec.source)


def load_variant(name: str, quant: str, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) of `name` in quantization `quant` on `device`.

    Float variants load resident. 4-bit / int8 variants load through the offloaded runtime, which
    plans the tier (resident, host RAM or disk) and buffers; on a CPU they stay resident.
    """
    from specexec_cli.models.load import load_model, load_tokenizer

    if quant in FLOAT_DTYPES:
        return load_model(name, device=device, dtype=FLOAT_DTYPES[quant])
    from specexec_cli.runtime.target import load_offloaded_target

    spec, source = _registry_source(name, quant)
    offload = "none" if device.type == "cpu" else "auto"
    model = load_offloaded_target(
        source, device=device, quant=quant, offload=offload, resident_layers=None, buffers=2
    )
    return model, load_tokenizer(spec)


def load_placed_variant(name: str, quant: str, device: torch.device, placement: Placement) -> tuple[Any, Any]:
    """(model, tokenizer) of target `name` through the offloaded runtime in `placement`'s tier under its
    caps: the planner keeps as many layers resident as the largest budget leaves room for."""
    from specexec_cli.models.load import load_tokenizer

    spec, source = _registry_source(name, quant)
    tokenizer = load_tokenizer(spec)
    return load_planned(source, quant, device, placement.for_tokenizer(tokenizer)), tokenizer


def load_planned(source: Any, quant: str, device: torch.device, placement: Placement) -> Any:
    """load_offloaded_target at the placement's budget, or at the largest budget the plan allows when
    that one does not fit (the trials above it are then ruled out by the memory check or fail)."""
    from specexec_cli.runtime.target import load_offloaded_target

    kwargs = dict(
        device=device, quant=quant, offload=placement.offload, resident_layers=None, buffers=2,
        context_len=placement.context_len, draft=placement.draft, max_memory=placement.max_memory,
    )
    try:
        model = load_offloaded_target(source, budget=placement.budget, **kwargs)
    except SpecexecError:
        if placement.budget is None:
            raise
        model = load_offloaded_target(source, budget=None, **kwargs)
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


class ModelPool:
    """Loads the target per variant and drafts per key on first use, and keeps them.

    A variant is a quantization ("fp32"), or a quantization placed in an offload tier ("fp32@disk",
    see space.variant_name) loaded by `stream_fn` under `placement`'s caps and planned for what runs on
    it (`placement_key`: a draft, or ALONE). Early-exit drafts ("name[:n]") share the weights of the
    model they are cut from: from the target variant of the trial when cut from the target, else from
    the full model in float. Drafts keyed "name@int8" are the float draft quantized to int8
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
        plan_draft: str | None = None,
        first_variant: str | None = None,
    ) -> None:
        self.target_name, self.device, self.load_fn, self.stream_fn = target, device, load_fn, stream_fn
        self.placement = placement  # caps, budget, context of placed targets
        self.plan_draft = plan_draft or ALONE  # what calibration's placed targets are planned for
        self.first_variant = first_variant
        self.models: dict[tuple[str, str, str], Any] = {}  # (name, variant, placement) -> model
        self.plans: dict[tuple[str, str], Any] = {}  # (variant, placement) -> the runtime's plan
        self._tokenizer = None
        self._unchecked: list[Any] = []  # draft tokenizers loaded before the target's
        self.load_seconds = 0.0

    @property
    def float_quant(self) -> str:
        return "fp16" if self.device.type == "cuda" else "fp32"

    def _load(self, name: str, variant: str, keep: set[tuple[str, str, str]], plan_for: str = "") -> Any:
        key = (name, variant, plan_for)
        if key not in self.models:
            quant, offload = split_variant(variant)
            if offload:
                self._drop_placed_targets()
            self._make_room(keep)
            draft = self._plan_draft(plan_for, keep) if offload else None
            what = f"{variant}, planned for {plan_for}" if offload else variant
            log(f"loading {name} ({what})")
            start = time.perf_counter()
            base, draft_quant = split_draft_quant(name)
            if offload:
                budget = 0 if plan_for == ALONE else (self.placement.budget if self.placement else None)
                placement = replace(self.placement or Placement(offload), offload=offload, draft=draft,
                                    budget=budget)
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
            self.models[key] = model
        else:  # most recently used last
            self.models[key] = self.models.pop(key)
        return self.models[key]

    def _plan_draft(self, plan_for: str, keep: set[tuple[str, str, str]]) -> Any:
        """The separate draft a placed target's memory plan counts (loaded first), if any."""
        if plan_for in (ALONE, NO_DRAFT, "") or parse_early_exit(plan_for):
            return None
        return self._load(plan_for, self.float_quant, keep | {(plan_for, self.float_quant, "")})

    def _drop_placed_targets(self) -> None:
        """Under caps one placed target fits at a time: drop the others and the drafts cut from them."""
        for name, variant, plan_for in list(self.models):
            if split_variant(variant)[1] and (name == self.target_name or parse_early_exit(name)):
                del self.models[(name, variant, plan_for)]
        gc.collect()

    def _make_room(self, keep: set[tuple[str, str, str]], min_free_fraction: float = 0.25) -> None:
        memory = psutil.virtual_memory()
        for key in list(self.models):
            if memory.available >= min_free_fraction * memory.total:
                return
            if key not in keep:
                del self.models[key]
                gc.collect()
                memory = psutil.virtual_memory()

    def tokenizer(self):
        if self._tokenizer is None:
            self.target(self.first_variant or self.float_quant)
        return self._tokenizer

    def placement_for(self, variant: str, plan_for: str | None) -> str:
        """The placement key of a target variant: "" when it is not placed in a tier."""
        if not split_variant(variant)[1]:
            return ""
        return self.plan_draft if plan_for is None else plan_for

    def target(self, variant: str, plan_for: str | None = None) -> Any:
        """The target `variant`; a placed one planned for `plan_for` (a draft key or ALONE; None: the
        pool's plan_draft, as calibration measures it)."""
        placement = self.placement_for(variant, plan_for)
        key = (self.target_name, variant, placement)
        model = self._load(self.target_name, variant, {key}, placement)
        engine = getattr(model, "offload_engine", None)
        if engine is not None and engine.plan is not None:
            self.plans[(variant, placement)] = engine.plan
        return model

    def models_for(self, candidate: Candidate) -> tuple[Any, Any | None]:
        """(target, draft) that `candidate` runs with: the target placed for the candidate's draft."""
        target = self.target(candidate.variant, placement_key(candidate, self.target_name))
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
        placed = [k for k in self.models if k[0] == self.target_name and k[1] == variant]
        target_key = placed[-1] if placed else (self.target_name, variant, self.placement_for(variant, None))
        if early is None:
            return self._load(key, weights, {target_key, (key, weights, "")})
        base, n_layers = early
        if (key, weights, "") not in self.models:
            from specexec_cli.models.load import make_early_exit_draft

            if base == self.target_name and weights == variant:
                source = self.models[target_key] if target_key in self.models else self.target(variant)
            else:
                source = self._load(base, weights, {target_key, (base, weights, "")})
            self.models[(key, weights, "")] = make_early_exit_draft(source, n_layers)
        return self.models[(key, weights, "")]

    def plan_of(self, candidate: Candidate) -> Any | None:
        """The runtime's memory plan of the target `candidate` ran on (None: not placed, or not loaded)."""
        placement = self.placement_for(candidate.variant, placement_key(candidate, self.target_name))
        return self.plans.get((candidate.variant, placement))

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
