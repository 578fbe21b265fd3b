"""Memory feasibility before anything loads: will a candidate's target, draft and tree fit here?

Two checks share one job. Without --max-memory, the resident estimate of `memory_problem` (weights +
draft + the tree's activations against free RAM / GPU memory). With caps or an explicit offload tier,
the runtime's own planner (runtime.plan) on the probed facts with the caps applied, so that the tuner
rules out exactly what `load_offloaded_target` would refuse.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specexec_cli import hardware
from specexec_cli.errors import SpecexecError
from specexec_cli.runtime import plan as planner
from specexec_cli.runtime.caps import apply_caps
from specexec_cli.tuning.shape import ModelShape
from specexec_cli.tuning.space import NO_DRAFT, Candidate, parse_early_exit, split_draft_quant


def tree_activation_bytes(
    shape: ModelShape, budget: int, context: int, dtype_bytes: int = 4, lanes: int = 1
) -> int:
    """Peak working memory of one target pass over the tree tokens behind `context` tokens: the logits,
    one layer's attention scores and MLP activations, and the KV cache. A batch of `lanes` prompts
    shares the budget in a forest with one root each, behind their packed caches (`context` is then
    the sum of their contexts)."""
    tokens = budget + max(1, lanes)
    logits = tokens * shape.vocab_size * 4
    scores = shape.n_heads * tokens * (context + tokens) * dtype_bytes
    mlp = 2 * tokens * shape.intermediate_size * dtype_bytes
    kv = (context + tokens) * shape.kv_bytes_per_token(dtype_bytes)
    mask = tokens * (context + tokens) * dtype_bytes
    return int(logits + scores + mlp + kv + mask)


@dataclass(frozen=True)
class MemoryBudget:
    """Memory the run may use: free GPU bytes (None on a CPU-only run) and available host RAM."""

    device_free: int | None
    host_available: int
    headroom: float = 0.9  # use at most this share of either


def memory_problem(
    budget_mem: MemoryBudget,
    target_bytes: float,
    draft_bytes: float,
    activation_bytes: float,
    offloaded: bool = False,
    buffer_bytes: float = 0.0,
) -> str | None:
    """Why a configuration cannot fit, or None when it fits.

    CPU-only: target, draft and activations share host RAM. GPU resident: all of it on the GPU.
    GPU offloaded: the target's layers sit in host RAM; the draft, the layer buffers and the
    activations on the GPU.
    """
    host_cap = budget_mem.host_available * budget_mem.headroom
    if budget_mem.device_free is None:
        need = target_bytes + draft_bytes + activation_bytes
        return (
            None if need <= host_cap else f"needs {need / 1e9:.1f} GB of RAM, {host_cap / 1e9:.1f} GB usable"
        )
    device_cap = budget_mem.device_free * budget_mem.headroom
    if offloaded:
        if target_bytes > host_cap:
            return f"target needs {target_bytes / 1e9:.1f} GB of host RAM, {host_cap / 1e9:.1f} GB usable"
        need = draft_bytes + buffer_bytes + activation_bytes
    else:
        need = target_bytes + draft_bytes + activation_bytes
    if need > device_cap:
        return f"needs {need / 1e9:.1f} GB of GPU memory, {device_cap / 1e9:.1f} GB usable"
    return None


def model_shape(name: str) -> ModelShape | None:
    """The shape of a registry model, or of an early-exit draft of one; None when unknown."""
    from specexec_cli.models.registry import resolve

    early = parse_early_exit(name)
    base = early[0] if early else name
    try:
        spec = resolve(base)
    except SpecexecError:
        return None
    if None in (spec.n_layers, spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.n_heads):
        return None
    shape = ModelShape(
        n_layers=spec.n_layers,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads or spec.n_heads,
        head_dim=spec.head_dim or spec.hidden_size // spec.n_heads,
        tied_embeddings=bool(spec.tie_word_embeddings),
        n_experts=spec.n_experts,
        experts_per_token=spec.experts_per_token,
    )
    return shape.truncated(early[1]) if early else shape


def draft_weight_bytes(shape: ModelShape, float_quant: str, draft_quant: str | None) -> float:
    """A resident draft's weights: in float, or int8 (runtime/int8_cpu.py: every linear at 1 byte per
    weight but the MLP down projections, kept in float32; the embedding and head at 1 byte)."""
    if draft_quant != "int8":
        return shape.weight_bytes(float_quant)
    down = shape.n_layers * shape.hidden_size * shape.intermediate_size * shape.experts_per_token
    table = shape.vocab_size * shape.hidden_size
    tables = table * (1 if shape.tied_embeddings else 2)
    return shape.n_layers * shape.layer_bytes("int8") + 3.0 * down + tables


def model_facts(
    shape: ModelShape, quant: str, float_bytes: int, stored_bytes: float | None = None
) -> planner.ModelFacts:
    """The planner's view of a target from its shape: layer bytes in `quant` (or as stored, when the
    runtime streams float layers narrower than it computes: `stored_bytes` per weight), the rest in
    float, but for an untied input embedding stored narrower, which stays as stored (runtime/embedding.py)."""
    layer = int(shape.layer_bytes(quant))
    if stored_bytes is not None and quant in ("fp32", "fp16", "bf16"):
        layer = int(min(layer, shape.layer_params * stored_bytes))
    table = shape.vocab_size * shape.hidden_size
    if shape.tied_embeddings:
        resident = table * float_bytes
    else:
        resident = table * (float_bytes + min(float_bytes, stored_bytes or float_bytes))
    return planner.ModelFacts(
        n_layers=shape.n_layers,
        layer_bytes=layer,
        total_layer_bytes=layer * shape.n_layers,
        resident_bytes=int(resident),
        kv_bytes_per_token=shape.kv_bytes_per_token(float_bytes),
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size * shape.experts_per_token,
        dtype_bytes=float_bytes,
        decode_bytes=0 if quant in ("fp16", "bf16", "fp32") else shape.layer_params * float_bytes,
    )


def stored_float_bytes(name: str) -> int | None:
    """Bytes per weight of a registry model's local checkpoint files (config torch_dtype), if known."""
    from specexec_cli.models.load import local_source
    from specexec_cli.models.registry import resolve

    try:
        folder = local_source(resolve(name))
        dtype = json.loads((folder / "config.json").read_text()).get("torch_dtype") if folder else None
    except (SpecexecError, OSError, ValueError):
        return None
    return {"float16": 2, "bfloat16": 2, "float32": 4}.get(dtype)


def hardware_facts(
    probe: hardware.HardwareProbe, device: torch.device, caps: dict[str, int]
) -> planner.HardwareFacts:
    """The planner's facts from the probe, each pool capped by --max-memory (runtime.caps)."""
    host = probe.host.ram_available
    disk = probe.disk.free_bytes if probe.disk is not None else 10**13
    if device.type == "cuda":
        free = max((g.memory_free for g in probe.gpus), default=0)
        facts = planner.HardwareFacts(device_mem_free=free, host_ram_available=host, disk_free=disk)
    else:
        facts = planner.HardwareFacts(host, host, disk, unified=True)
    return apply_caps(facts, caps, device.type, device.index)


def variant_source(name: str, quant: str) -> tuple[Any, Any]:
    """(registry spec, what to load) of target `name` in format `quant`: the registry's quantized
    variant (gptq, awq, ...) when it has one, else the model itself; the source is its local folder
    (bundled and GGUF models converted first) or its hub id."""
    from specexec_cli.models.load import local_source
    from specexec_cli.models.registry import QUANT_VARIANTS, resolve

    spec = resolve(name)
    if quant in QUANT_VARIANTS and spec.quantization != quant and spec.kind != "local":
        spec = spec.quantized_variant(quant)  # a quantized folder or hub id is its own variant
    return spec, local_source(spec) or spec.source


def _local_folder(name: str, quant: str) -> Path | None:
    """The local checkpoint folder of `name` in `quant` (None for a hub id not in the local cache, or an
    unknown name): where the runtime's own facts can be read without a download."""
    try:
        _, source = variant_source(name, quant)
    except SpecexecError:
        return None
    if isinstance(source, Path):
        return source
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not cached: plan from the registry's shape instead
        return None


class PlacementPlanner:
    """The runtime's memory plan of a placed target before anything loads: format `quant` in tier
    `offload` under the caps, with a draft and a tree budget, on the probed machine.

    The facts are the runtime's own (runtime.target.target_facts on the local checkpoint: layer bytes
    as that tier stores them, what resident parts take), so the tuner refuses exactly what
    load_offloaded_target would refuse; a model only on the hub is planned from its registry shape.
    Drafts count as the runtime counts them: a separate draft's weights and KV cache on the device, an
    early exit of the target nothing (its layers are the target's own, kept resident)."""

    def __init__(self, target: str, probe: hardware.HardwareProbe, device: torch.device,
                 caps: dict[str, int] | None, context: int) -> None:
        self.target, self.device, self.context = target, device, context
        self.hardware = hardware_facts(probe, device, caps or {})
        gpu_total = max((g.memory_total for g in probe.gpus), default=0) if device.type == "cuda" else 0
        self.reserve = (256 << 20) + int(0.05 * gpu_total)  # as the runtime keeps free
        self.float_quant = "fp16" if device.type == "cuda" else "fp32"
        self.float_bytes = 2 if device.type == "cuda" else 4
        self.shape = model_shape(target)
        self._facts: dict[tuple[str, str], planner.ModelFacts | None] = {}
        self._drafts: dict[str, tuple[int, int]] = {}  # measured on the loaded draft (`count_draft`)

    def count_draft(self, key: str, model: torch.nn.Module) -> None:
        """Plan draft `key` with the bytes the loaded `model` really holds (as the runtime counts them:
        runtime.target.model_bytes) instead of its registry shape's estimate."""
        from specexec_cli.runtime.target import kv_bytes_per_token, model_bytes

        self._drafts[key] = (model_bytes(model), kv_bytes_per_token(model.config, model.dtype))

    def facts(self, quant: str, offload: str) -> planner.ModelFacts | None:
        """What the planner plans from for `quant` in tier `offload`; None when nothing is known."""
        key = (quant, offload)
        if key not in self._facts:
            folder = _local_folder(self.target, quant)
            if folder is not None:
                from specexec_cli.runtime.target import target_facts

                self._facts[key] = target_facts(folder, offload, self.device, quant=quant)
            elif self.shape is not None:
                stored = stored_float_bytes(self.target) if offload != "none" else None
                self._facts[key] = model_facts(self.shape, quant, self.float_bytes, stored)
            else:
                self._facts[key] = None
        return self._facts[key]

    def draft_facts(self, draft: str) -> tuple[int, int]:
        """(device bytes, KV bytes per token) of a draft key, as the runtime's plan counts them: measured
        when the draft was loaded (`count_draft`), else estimated from its registry shape (a lower
        bound: the real model also keeps e.g. a narrow copy of a tied embedding table)."""
        if draft in self._drafts:
            return self._drafts[draft]
        early = parse_early_exit(draft)
        if draft == NO_DRAFT or (early and early[0] == self.target):
            return 0, 0
        name, draft_quant = split_draft_quant(draft)
        shape = model_shape(early[0] if early else name)
        if shape is None:
            return 0, 0
        if early:
            shape = shape.truncated(early[1])
        return int(draft_weight_bytes(shape, self.float_quant, draft_quant)), shape.kv_bytes_per_token(
            self.float_bytes)

    def plan(self, draft: str, quant: str, offload: str, budget: int,
             resident_layers: int | None = None) -> planner.Plan | None:
        """The plan of this placement (budget 0: plain decoding's 1-token pass); raises SpecexecError
        (the runtime's one line) when it cannot fit; None when the target's facts are unknown."""
        facts = self.facts(quant, offload)
        if facts is None:
            return None
        draft_bytes, draft_kv = self.draft_facts(draft)
        request = planner.PlanRequest(offload=offload, resident_layers=resident_layers, budget=budget,
                                      context_len=self.context, draft_bytes=draft_bytes,
                                      draft_kv_bytes_per_token=draft_kv, reserve_bytes=self.reserve)
        return planner.plan(self.hardware, facts, request)


def memory_checker(
    target: str,
    probe: hardware.HardwareProbe,
    device: torch.device,
    context: int,
    caps: dict[str, int] | None = None,
    plan_context: int | None = None,
    lanes: int = 1,
    placements: PlacementPlanner | None = None,
) -> Callable[[Candidate], str | None]:
    """The feasibility test the search runs before loading anything.

    A candidate placed in an offload tier (under --max-memory) is checked by the runtime's planner
    (`PlacementPlanner`, or `placements` when given) at its budget, with its draft: the question the
    runtime asks before it loads (`plan_context`: the context the runtime plans for). Otherwise the
    resident estimate of `memory_problem`. For a batch workload, `context` (and `plan_context`) hold the
    packed caches of `lanes` prompts, whose trees share the budget."""
    target_shape = model_shape(target)
    gpu_free = max((g.memory_free for g in probe.gpus), default=None) if device.type == "cuda" else None
    budget_mem = MemoryBudget(device_free=gpu_free, host_available=probe.host.ram_available)
    float_quant = "fp16" if device.type == "cuda" else "fp32"
    placed = placements or PlacementPlanner(target, probe, device, caps, plan_context or context)

    def draft_bytes(candidate: Candidate) -> float:
        early = parse_early_exit(candidate.draft)
        if candidate.autoregressive or (early and early[0] == target):
            return 0.0
        name, draft_quant = split_draft_quant(candidate.draft)
        draft_shape = model_shape(early[0] if early else name)
        if draft_shape is None:
            return 0.0
        return draft_weight_bytes(draft_shape, float_quant, draft_quant)

    def check(candidate: Candidate) -> str | None:
        if candidate.offload:
            budget = 0 if candidate.autoregressive else max(1, candidate.budget)
            try:
                placed.plan(candidate.draft, candidate.quantization, candidate.offload, budget)
            except SpecexecError as exc:
                return str(exc)
            return None
        if target_shape is None:
            return None
        target_bytes = target_shape.weight_bytes(candidate.quantization)
        activations = tree_activation_bytes(target_shape, candidate.budget, context, lanes=lanes)
        offloaded = gpu_free is not None and target_bytes > 0.8 * gpu_free
        buffers = 2 * target_shape.layer_bytes(candidate.quantization)
        return memory_problem(
            budget_mem, target_bytes, draft_bytes(candidate), activations, offloaded, buffers
        )

    return check
