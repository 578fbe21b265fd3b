"""Memory planner: will this target / draft / budget run here, and with how many buffers and resident layers?

Pure functions over two small fact sheets, so every decision is testable without hardware:
  HardwareFacts  free device memory, available host RAM, free disk (and whether the "device" is the
                 CPU itself, in which case device memory and host RAM are one pool)
  ModelFacts     layer count and bytes per layer in the chosen quantization, resident bytes
                 (embeddings, final norm, LM head), KV bytes per token, vocab and widths
A refusal is a `SpecexecError` with one line saying what does not fit and by how much, raised before
any weights are loaded.

Device memory of a run = resident target parts + draft + resident layers + ring buffers + one layer's
dequantized weights (quantized targets) + KV caches for context + tree + one target pass's workspace
(logits for budget+1 rows x vocab in the model dtype and in float32, the additive tree mask,
MLP activations) + a reserve.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace

from specexec_cli.errors import DoesNotFit, SpecexecError, UsageError

OFFLOADS = ("none", "ram", "disk")


def gb(n: float) -> str:
    """Bytes for a message: '36.2 GB', or MB / kB below a gigabyte."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.0f} kB"


@dataclass(frozen=True)
class HardwareFacts:
    device_mem_free: int
    host_ram_available: int
    disk_free: int
    unified: bool = False  # the compute device is the CPU: one pool for "device" and host


@dataclass(frozen=True)
class ModelFacts:
    n_layers: int
    layer_bytes: int  # streamed bytes of the largest decoder layer (= one ring buffer)
    total_layer_bytes: int  # all decoder layers in the chosen quantization
    resident_bytes: int  # embeddings + final norm + LM head, always on the device
    kv_bytes_per_token: int  # K and V of every layer for one token
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per token (MoE: times experts per token)
    dtype_bytes: int = 2
    decode_bytes: int = 0  # device scratch for one layer's dequantized weights (0: zero-copy views)
    disk_cache_bytes: int = 0  # what the disk tier writes first (converted layers); 0: read in place
    expand_bytes: int = 0  # extra bytes to hold one resident layer decoded once (0: nothing to decode)


@dataclass(frozen=True)
class PlanRequest:
    offload: str = "ram"  # none | ram | disk | auto
    buffers: int = 2
    resident_layers: int | None = 0  # None: as many as fit once the budget is provided for
    budget: int | None = None  # tree tokens besides the root (0: plain decoding); None: the largest that fits
    max_budget: int = 4096
    context_len: int = 2048  # prompt + new tokens the KV caches must hold
    draft_bytes: int = 0
    draft_kv_bytes_per_token: int = 0
    reserve_bytes: int = 0  # kept free on the device (CUDA context, allocator slack)
    expand: bool = True  # decode resident layers once with the memory left (ModelFacts.expand_bytes)


@dataclass(frozen=True)
class Plan:
    offload: str
    buffers: int  # ring buffers actually used (0 when every layer is resident)
    resident_layers: int
    budget: int
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    expanded_layers: int = 0  # resident layers decoded once at load (4-bit, or fp16 computed in fp32)

    def summary(self) -> str:
        expanded = f" expanded={self.expanded_layers}" if self.expanded_layers else ""
        return (
            f"offload={self.offload} resident_layers={self.resident_layers}{expanded} buffers={self.buffers} "
            f"budget={self.budget} device={gb(self.device_bytes)} host={gb(self.host_bytes)} "
            f"disk={gb(self.disk_bytes)}"
        )


# --- byte counts ------------------------------------------------------------------------------------


def pass_bytes(model: ModelFacts, tokens: int, context_len: int) -> int:
    """Workspace of one target pass over `tokens` rows: logits (dtype + fp32), mask, activations."""
    logits = tokens * model.vocab_size * (model.dtype_bytes + 4)
    mask = tokens * (context_len + tokens) * model.dtype_bytes
    activations = tokens * (4 * model.hidden_size + 3 * model.intermediate_size) * model.dtype_bytes
    return logits + mask + activations


def kv_bytes(model: ModelFacts, req: PlanRequest, budget: int) -> int:
    return (req.context_len + budget + 1) * (model.kv_bytes_per_token + req.draft_kv_bytes_per_token)


def weights_device_bytes(model: ModelFacts, req: PlanRequest, resident: int, buffers: int) -> int:
    """Device bytes that do not depend on the budget."""
    streamed = model.n_layers - resident
    layer_avg = model.total_layer_bytes / max(model.n_layers, 1)
    return int(
        model.resident_bytes
        + req.draft_bytes
        + req.reserve_bytes
        + resident * layer_avg
        + (buffers * model.layer_bytes if streamed else 0)
        + model.decode_bytes
    )


def budget_device_bytes(model: ModelFacts, req: PlanRequest, budget: int) -> int:
    return kv_bytes(model, req, budget) + pass_bytes(model, budget + 1, req.context_len + budget + 1)


def host_bytes(model: ModelFacts, offload: str, resident: int, buffers: int, unified: bool) -> int:
    """Host RAM the offload tier needs besides the device side (layer store, pinned staging)."""
    streamed = model.n_layers - resident
    if streamed <= 0 or offload == "none":
        return 0
    if offload == "ram":
        return int(model.total_layer_bytes * streamed / model.n_layers)
    return 0 if unified else buffers * model.layer_bytes  # disk: pinned staging per buffer


def max_budget(model: ModelFacts, req: PlanRequest, free: int) -> int:
    """Largest budget in [0, req.max_budget] whose KV cache and pass workspace fit in `free` bytes."""
    lo, hi = 0, req.max_budget
    if budget_device_bytes(model, req, 0) > free:
        return -1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if budget_device_bytes(model, req, mid) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- the decision -------------------------------------------------------------------------------------


def plan(hw: HardwareFacts, model: ModelFacts, req: PlanRequest) -> Plan:
    """Decide resident layers, ring buffers and budget, or raise SpecexecError saying what does not fit."""
    if req.offload == "auto":
        for tier in OFFLOADS:
            try:
                return plan(hw, model, replace(req, offload=tier))
            except SpecexecError as exc:
                last = exc
        raise last  # the last tier's reason, with its type
    if req.offload not in OFFLOADS:
        raise UsageError(f"--offload must be one of none, ram, disk, auto; got {req.offload!r}")
    if req.buffers < 2:
        raise UsageError(f"--buffers must be >= 2, got {req.buffers}")
    if req.resident_layers is not None and not 0 <= req.resident_layers <= model.n_layers:
        raise UsageError(f"--resident-layers must be in [0, {model.n_layers}], got {req.resident_layers}")

    if req.offload == "none":
        resident = model.n_layers
    else:
        resident = req.resident_layers or 0
    buffers = req.buffers if resident < model.n_layers else 0
    # in the unified case the device pool also holds the host-side layer store
    device_pool = hw.host_ram_available if hw.unified else hw.device_mem_free

    def host_need(r: int, b: int) -> int:
        return host_bytes(model, req.offload, r, b, hw.unified)

    # 1. host RAM (ram tier) and disk (disk tier converting layers first)
    if not hw.unified:
        need = host_need(resident, buffers)
        if need > hw.host_ram_available:
            hint = "use --offload disk or a 4-bit variant" if req.offload == "ram" else "use fewer --buffers"
            raise SpecexecError(
                f"target needs {gb(need)} of host RAM, {gb(hw.host_ram_available)} available; {hint}"
            )
    if req.offload == "disk" and model.disk_cache_bytes > hw.disk_free:
        raise SpecexecError(
            f"--offload disk needs {gb(model.disk_cache_bytes)} of free disk for the converted layers, "
            f"{gb(hw.disk_free)} free; use --offload-dir on a bigger disk or a checkpoint read in place"
        )

    # 2. weights that must be on the device whatever the budget
    fixed = weights_device_bytes(model, req, resident, buffers) + (
        host_need(resident, buffers) if hw.unified else 0
    )
    smallest = fixed + budget_device_bytes(model, req, 0)
    if smallest > device_pool:
        what = "device memory" if not hw.unified else "RAM (the CPU is the device)"
        if req.offload == "none":
            hint = "use --offload ram"
        elif hw.unified and req.offload == "ram":
            hint = "use --offload disk or a 4-bit variant"
        else:
            hint = "use a 4-bit --quant, fewer --resident-layers or a smaller draft"
        raise DoesNotFit(
            f"target needs {gb(smallest)} of {what} ({_parts(model, req, resident, buffers)}), "
            f"{gb(device_pool)} free; {hint}"
        )

    # 3. the budget
    left = device_pool - fixed
    best = max_budget(model, req, left)
    if req.budget is not None:
        if req.budget < 0:
            raise UsageError(f"--budget must be >= 1, got {req.budget}")
        need = budget_device_bytes(model, req, req.budget)
        if need > left:
            raise DoesNotFit(
                f"budget {req.budget} needs {gb(need)} of device memory for KV cache, tree mask and logits, "
                f"{gb(left)} left after weights and buffers; the largest budget that fits is {best}"
            )
        budget = req.budget
    else:
        if best < 1:
            raise DoesNotFit(
                f"no tree budget fits: {gb(left)} of device memory left after weights and buffers"
            )
        budget = best

    # 4. resident layers: fill what the budget leaves (auto), never changing what was asked for
    if req.resident_layers is None and req.offload != "none":
        spare = left - budget_device_bytes(model, req, budget)
        layer_avg = model.total_layer_bytes / model.n_layers
        while resident < model.n_layers:
            nxt = resident + 1
            b = req.buffers if nxt < model.n_layers else 0
            extra = weights_device_bytes(model, req, nxt, b) - weights_device_bytes(
                model, req, resident, buffers
            )
            if hw.unified:
                extra += host_need(nxt, b) - host_need(resident, buffers)
            if extra > spare or layer_avg <= 0:
                break
            spare -= extra
            resident, buffers = nxt, b

    # 5. expanded layers: resident layers decoded once (no per-pass dequantization or upcast), in what
    #    memory is left
    device = weights_device_bytes(model, req, resident, buffers) + budget_device_bytes(model, req, budget)
    expanded = 0
    if req.expand and model.expand_bytes > 0 and resident:
        spare = device_pool - device - (host_need(resident, buffers) if hw.unified else 0)
        expanded = max(0, min(resident, spare // model.expand_bytes))
        device += expanded * model.expand_bytes
    return Plan(
        offload=req.offload,
        buffers=buffers,
        resident_layers=resident,
        budget=budget,
        device_bytes=device,
        host_bytes=host_need(resident, buffers),
        disk_bytes=model.disk_cache_bytes if req.offload == "disk" else 0,
        expanded_layers=expanded,
    )


def _parts(model: ModelFacts, req: PlanRequest, resident: int, buffers: int) -> str:
    parts = [f"embeddings/head {gb(model.resident_bytes)}"]
    if req.draft_bytes:
        parts.append(f"draft {gb(req.draft_bytes)}")
    if resident:
        parts.append(f"{resident} resident layers {gb(model.total_layer_bytes * resident / model.n_layers)}")
    if buffers and resident < model.n_layers:
        parts.append(f"{buffers} layer buffers {gb(buffers * model.layer_bytes)}")
    if model.decode_bytes:
        parts.append(f"dequantized layer {gb(model.decode_bytes)}")
    kv = budget_device_bytes(model, req, 0)
    parts.append(f"KV cache for {req.context_len} tokens and a 1-token pass {gb(kv)}")
    return ", ".join(parts)


def probe_hardware(device, disk_path: str = ".") -> HardwareFacts:
    """Measure free device memory, available host RAM and free disk at `disk_path` right now."""
    import psutil
    import torch

    device = torch.device(device)
    host = psutil.virtual_memory().available
    disk = shutil.disk_usage(disk_path).free
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return HardwareFacts(device_mem_free=free, host_ram_available=host, disk_free=disk)
    return HardwareFacts(device_mem_free=host, host_ram_available=host, disk_free=disk, unified=True)
