"""Memory feasibility before anything loads: will a candidate's target, draft and tree fit here?

Two checks share one job. Without --max-memory, the resident estimate of `memory_problem` (weights +
draft + the tree's activations against free RAM / GPU memory). With caps or an explicit offload tier,
the runtime's own planner (runtime.plan) on the probed facts with the caps applied, so that the tuner
rules out exactly what `load_offloaded_target` would refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specexec_cli import hardware
from specexec_cli.errors import SpecexecError
from specexec_cli.tuning.shape import ModelShape
from specexec_cli.tuning.space import Candidate, parse_early_exit


def tree_activation_bytes(shape: ModelShape, budget: int, context: int, dtype_bytes: int = 4) -> int:
    """Peak working memory of one target pass over budget + 1 tree tokens behind `context` tokens:
    the logits, one layer's attention scores and MLP activations, and the KV cache."""
    tokens = budget + 1
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


def memory_checker(
    target: str, probe: hardware.HardwareProbe, device: torch.device, context: int
) -> Callable[[Candidate], str | None]:
    """The feasibility test the search runs before loading anything (memory_problem)."""
    target_shape = model_shape(target)
    gpu_free = max((g.memory_free for g in probe.gpus), default=None) if device.type == "cuda" else None
    budget_mem = MemoryBudget(device_free=gpu_free, host_available=probe.host.ram_available)
    float_quant = "fp16" if device.type == "cuda" else "fp32"

    def check(candidate: Candidate) -> str | None:
        if target_shape is None:
            return None
        target_bytes = target_shape.weight_bytes(candidate.quantization)
        early = parse_early_exit(candidate.draft)
        draft_bytes = 0.0
        if not candidate.autoregressive and not (early and early[0] == target):
            draft_shape = model_shape(early[0] if early else candidate.draft)
            draft_bytes = draft_shape.weight_bytes(float_quant) if draft_shape else 0.0
        activations = tree_activation_bytes(target_shape, candidate.budget, context)
        offloaded = gpu_free is not None and target_bytes > 0.8 * gpu_free
        buffers = 2 * target_shape.layer_bytes(candidate.quantization)
        return memory_problem(budget_mem, target_bytes, draft_bytes, activations, offloaded, buffers)

    return check

