"""Loading the models a tuning run measures: target variants per quantization, drafts per key, kept in
a `ModelPool` between trials (loads are the expensive part)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from specexec_cli.tuning import log
from specexec_cli.tuning.space import NO_DRAFT, parse_early_exit

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
WEIGHT_QUANTS = ("nf4", "int8", "gptq")


LoadFn = Callable[[str, str, torch.device], tuple[Any, Any]]


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
    from specexec_cli.models.load import load_model, load_tokenizer, local_source
    from specexec_cli.models.registry import resolve

    if quant in FLOAT_DTYPES:
        return load_model(name, device=device, dtype=FLOAT_DTYPES[quant])
    from specexec_cli.runtime.offload import load_offloaded_target

    spec = resolve(name)
    if quant == "gptq":
        spec = spec.gptq_variant()
    source = local_source(spec) or spec.source
    offload = "none" if device.type == "cpu" else "auto"
    model = load_offloaded_target(
        source, device=device, quant=quant, offload=offload, resident_layers=None, buffers=2
    )
    return model, load_tokenizer(spec)


class ModelPool:
    """Loads the target per quantization and drafts per key on first use, and keeps them.

    Early-exit drafts ("name[:n]") share the weights of the model they are cut from: from the target
    variant of the trial when cut from the target, else from the full model in float.
    Before a load, models the current trial does not need are dropped if RAM runs short.
    """

    def __init__(self, target: str, device: torch.device, load_fn: LoadFn = load_variant) -> None:
        self.target_name, self.device, self.load_fn = target, device, load_fn
        self.models: dict[tuple[str, str], Any] = {}
        self.plans: dict[str, Any] = {}
        self._tokenizer = None
        self.load_seconds = 0.0

    @property
    def float_quant(self) -> str:
        return "fp16" if self.device.type == "cuda" else "fp32"

    def _load(self, name: str, quant: str, keep: set[tuple[str, str]]) -> Any:
        key = (name, quant)
        if key not in self.models:
            self._make_room(keep)
            log(f"loading {name} ({quant})")
            start = time.perf_counter()
            model, tokenizer = self.load_fn(name, quant, self.device)
            self.load_seconds += time.perf_counter() - start
            if name == self.target_name:
                self._tokenizer = self._tokenizer or tokenizer
            else:  # a draft must map text to the same ids as the target
                from specexec_cli.models.load import check_compatible

                check_compatible(self.tokenizer(), tokenizer)
            self.models[key] = model
        else:  # most recently used last
            self.models[key] = self.models.pop(key)
        return self.models[key]

    def _make_room(self, keep: set[tuple[str, str]], min_free_fraction: float = 0.25) -> None:
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
            self.target(self.float_quant)
        return self._tokenizer

    def target(self, quant: str) -> Any:
        model = self._load(self.target_name, quant, {(self.target_name, quant)})
        engine = getattr(model, "offload_engine", None)
        if engine is not None and engine.plan is not None:
            self.plans[quant] = engine.plan
        return model

    def draft_variant(self, key: str, quant: str) -> str:
        """The weights a draft is made from for a trial on target variant `quant`: an early exit of the
        target is cut from that variant when it is a float one; every other draft (and an early exit
        of a 4-bit / int8 target, whose layers are bound only while the runtime runs them) comes from
        float weights."""
        early = parse_early_exit(key)
        if early is not None and early[0] == self.target_name and quant in FLOAT_DTYPES:
            return quant
        return self.float_quant

    def draft(self, key: str, quant: str) -> Any | None:
        if key == NO_DRAFT:
            return None
        variant = self.draft_variant(key, quant)
        early = parse_early_exit(key)
        if early is None:
            return self._load(key, variant, {(self.target_name, quant), (key, variant)})
        base, n_layers = early
        if (key, variant) not in self.models:
            from specexec_cli.models.load import make_early_exit_draft

            source = self._load(base, variant, {(self.target_name, quant), (base, variant)})
            self.models[(key, variant)] = make_early_exit_draft(source, n_layers)
        return self.models[(key, variant)]

    def offload_settings(self, quant: str) -> dict:
        plan = self.plans.get(quant)
        if plan is None:
            return {"offload": "none"}
        settings = {"offload": plan.offload}
        if plan.offload != "none":
            settings.update(buffers=max(2, plan.buffers), resident_layers=plan.resident_layers)
        return settings

