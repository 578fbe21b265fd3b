"""The streaming engine: run a transformers causal LM whose decoder layers live in host RAM or on disk.

Embeddings, final norm and LM head stay on the compute device. Every offloaded decoder layer is one
contiguous byte buffer (pinned host RAM on CUDA, or ranges of the safetensors files / a blob file
for the disk tier). A ring of N device buffers ("slots"), each with its own copy stream and events on
CUDA, holds the layers in flight: while layer i computes, layers i+1 .. i+N-1 are loaded or loading.
The ring wraps, so the first layers of the next forward load while the draft model works.

The transformers model object is kept: a forward pre-hook on each decoder layer waits for its slot,
points the layer's parameters at views of the slot (or at weights dequantized from it), and a forward
hook (always called, also when the layer raises) unbinds them and hands the slot to the next load.
On a machine without a GPU the same code runs with the CPU as the device; loads then run on a
background thread (positioned file reads or host memcpy) instead of copy streams.

Errors in a load or a layer propagate to the caller; the next forward drains the ring and starts over.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.fsutil import expand_user
from specexec_cli.runtime import caps
from specexec_cli.runtime import plan as planner
from specexec_cli.runtime.disk import READ_THREADS, BlobWriter, CheckpointIndex, FileReader, ReadOp
from specexec_cli.runtime.layout import LayerLayout, align, build_param, dtype_bytes, is_upcast
from specexec_cli.runtime.loader import (
    FLOAT_QUANTS,
    QUANTS,
    LayerBuilder,
    LayerSource,
    ParamRef,
    WeightRef,
    checkpoint_param_refs,
    empty_skeleton,
    find_layers,
    gptq_config_of,
)

log = logging.getLogger(__name__)


# --- binding a layer's parameters to a buffer ----------------------------------------------------------


class BoundLayer:
    """A decoder layer whose parameters are rebuilt from a byte buffer before each call.

    Raw weights stored narrower than the compute dtype (float16 files computed in float32) are upcast
    into a scratch buffer the engine owns and reuses for every layer: allocating fresh float32 tensors
    for every layer of every pass costs page faults that dwarf the conversion (on a CPU, ~7x).
    """

    def __init__(self, index: int, module: nn.Module, layout: LayerLayout, dtype: torch.dtype) -> None:
        self.index = index
        self.module = module
        self.layout = layout
        self.dtype = dtype
        self.targets = []  # (owning module, attribute, recipe, meta placeholder, scratch range or None)
        self.scratch_numel = 0  # elements of `dtype` the upcast weights need
        for recipe in layout.recipes:
            owner_name, _, attr = recipe.name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            placeholder = nn.Parameter(
                torch.empty(recipe.shape, dtype=dtype, device="meta"), requires_grad=False
            )
            owner._parameters[attr] = placeholder
            span = None  # (start, end) in the scratch buffer
            if is_upcast(recipe, layout, dtype):
                numel = math.prod(recipe.shape)
                span = (self.scratch_numel, self.scratch_numel + numel)
                self.scratch_numel += align(numel, 64)
            self.targets.append((owner, attr, recipe, placeholder, span))

    def bind(self, views: dict[str, torch.Tensor], scratch: torch.Tensor | None = None) -> None:
        """Point the parameters at the stored tensors (views of a buffer from `layout.views`); upcast
        weights go into `scratch` (1-D, `dtype`, >= scratch_numel) when given."""
        for owner, attr, recipe, _, span in self.targets:
            if span is not None and scratch is not None:
                out = scratch[span[0] : span[1]].view(recipe.shape)
                out.copy_(views[recipe.parts[0][0].keys[0]])
                owner._parameters[attr] = out
            else:
                owner._parameters[attr] = build_param(recipe, views, self.dtype)

    def unbind(self) -> None:
        for owner, attr, _, placeholder, _ in self.targets:
            owner._parameters[attr] = placeholder


# --- pinned host memory --------------------------------------------------------------------------------


class PinnedPool:
    """Page-locked host buffers, and an account of what was pinned.

    `pin_memory=True` goes through PyTorch's caching host allocator, which rounds every block up to a
    power of two (a 1.7 GB layer would pin 2 GB). So an ordinary tensor is registered with
    cudaHostRegister first (exact size; unregistered on close). A failed cudaHostRegister leaves its
    error pending on the calling thread, and PyTorch's next kernel-launch check (cudaGetLastError)
    would report it against an unrelated kernel; `clear_error` consumes it at once. After one failure
    registration is not tried again: buffers come from `pin_memory=True` (rounding accepted, and
    counted), and if even that fails, from ordinary memory (copies are then synchronous and slower).
    Without CUDA the buffers are ordinary memory. The hooks exist so the fallbacks can be tested on CPU.
    """

    def __init__(self, cuda: bool, register: Callable[[int, int], int] | None = None,
                 unregister: Callable[[int], object] | None = None,
                 pinned_empty: Callable[[int], torch.Tensor] | None = None,
                 clear_error: Callable[[], None] | None = None) -> None:
        self.cuda = cuda
        self._register = register or _cuda_host_register
        self._unregister = unregister or _cuda_host_unregister
        self._pinned_empty = pinned_empty or _pinned_empty
        self._clear_error = clear_error or _clear_cuda_error
        self._try_register = cuda
        self._registered: list[torch.Tensor] = []
        self.registered_bytes = 0  # cudaHostRegister: exact
        self.allocator_bytes = 0  # pin_memory=True: requested
        self.allocator_reserved = 0  # pin_memory=True: what the caching host allocator holds for them
        self.unpinned_bytes = 0  # asked to pin but ordinary memory (CUDA only)
        self.errors: list[str] = []

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 [nbytes] host buffer, page-locked when on CUDA and possible."""
        if not self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        if self._try_register:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            try:
                err = int(self._register(buf.data_ptr(), nbytes))
            except (AssertionError, AttributeError, RuntimeError, TypeError) as exc:
                err, reason = -1, f"cudaHostRegister unavailable: {exc}"
            else:
                reason = f"cudaHostRegister failed with CUDA error {err}"
                if err != 0:
                    self._clear_error()
            if err == 0:
                self._registered.append(buf)
                self.registered_bytes += nbytes
                return buf
            self._try_register = False
            self.errors.append(reason)
            log.warning("%s; pinning with the caching host allocator instead", reason)
        try:
            buf = self._pinned_empty(nbytes)
        except RuntimeError as exc:
            self.errors.append(f"pin_memory failed: {exc}")
            log.warning("cannot pin %d bytes (%s); using pageable memory, loads will be slower", nbytes, exc)
            self.unpinned_bytes += nbytes
            return torch.empty(nbytes, dtype=torch.uint8)
        self.allocator_bytes += nbytes
        self.allocator_reserved += 1 << max(0, nbytes - 1).bit_length()  # power-of-two blocks
        return buf

    @property
    def pinned_bytes(self) -> int:
        return self.registered_bytes + self.allocator_bytes

    def summary(self) -> str:
        """One line: what is pinned and how."""
        if not self.cuda:
            return "pinned: none (no CUDA device)"
        gib = 1 << 30
        parts = [f"{self.registered_bytes / gib:.2f} GiB registered"]
        if self.allocator_bytes:
            parts.append(f"{self.allocator_bytes / gib:.2f} GiB via pin_memory "
                         f"({self.allocator_reserved / gib:.2f} GiB reserved)")
        if self.unpinned_bytes:
            parts.append(f"{self.unpinned_bytes / gib:.2f} GiB NOT pinned")
        return "pinned: " + ", ".join(parts)

    def close(self) -> None:
        for buf in self._registered:
            self._unregister(buf.data_ptr())
        self._registered.clear()


def _cuda_host_register(ptr: int, nbytes: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))


def _cuda_host_unregister(ptr: int) -> object:
    return torch.cuda.cudart().cudaHostUnregister(ptr)


def _pinned_empty(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _clear_cuda_error() -> None:
    """Consume this thread's pending (non-sticky) CUDA error. torch binds no cudaGetLastError, but every
    kernel launch is followed by one: the first tiny launch reports (and so clears) the stale error,
    the second must succeed, or the context is really broken and that error propagates."""
    try:
        torch.ones(1, device="cuda")
    except RuntimeError as exc:
        log.debug("cleared a pending CUDA error: %s", exc)
    torch.ones(1, device="cuda")


# --- the ring ------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    index: int
    buffer: torch.Tensor  # device uint8 [slot_bytes]
    staging: torch.Tensor | None = None  # pinned host uint8 [slot_bytes] (CUDA + disk tier)
    stream: torch.cuda.Stream | None = None
    ready: torch.cuda.Event | None = None  # recorded on `stream` when the copy into `buffer` is done
    free: torch.cuda.Event | None = None  # recorded on the compute stream when the layer is done


@dataclass
class _Pending:
    pos: int  # position among the streamed layers
    slot: _Slot
    future: Future | None


@dataclass
class StreamStats:
    forwards: int = 0
    bytes_streamed: int = 0
    load_wait_s: float = 0.0  # host time spent blocked on loads (CPU / disk tier; CUDA waits on-device)
    restarts: int = 0  # ring drains after an error or an out-of-order call


@dataclass
class OffloadEngine:
    """Owns the ring, the layer stores and the hooks of one offloaded model."""

    device: torch.device
    dtype: torch.dtype
    layers: list[BoundLayer]
    resident: dict[int, torch.Tensor]  # layer index -> device buffer, bound in place every call
    streamed: list[int]  # layer indices that stream, in call order
    host: dict[int, torch.Tensor] = field(default_factory=dict)  # ram tier: layer index -> host buffer
    reads: dict[int, list[ReadOp]] = field(default_factory=dict)  # disk tier: layer index -> file reads
    n_buffers: int = 2
    plan: planner.Plan | None = None
    cleanup_dir: str | None = None  # blob directory created by us, removed on close
    pinned: PinnedPool | None = None  # owner of the page-locked host buffers (CUDA)
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        self._cuda = self.device.type == "cuda"
        if self.pinned is None:
            self.pinned = PinnedPool(self._cuda)
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (layer, slot) -> typed views
        self._reader = FileReader(threads=READ_THREADS if self.reads else 1)
        scratch = max((bound.scratch_numel for bound in self.layers), default=0)
        self._scratch = torch.empty(scratch, dtype=self.dtype, device=self.device) if scratch else None
        self._queue: deque[_Pending] = deque()
        self._free: deque[_Slot] = deque()
        self._active: dict[int, _Slot] = {}
        self._next_pos = 0
        self._slots: list[_Slot] = []
        n_slots = min(self.n_buffers, len(self.streamed))
        if n_slots:
            slot_bytes = max(self.layers[i].layout.nbytes for i in self.streamed)
            for k in range(n_slots):
                slot = _Slot(k, torch.empty(slot_bytes, dtype=torch.uint8, device=self.device))
                if self._cuda:
                    slot.stream = torch.cuda.Stream(self.device)
                    slot.ready = torch.cuda.Event()
                    slot.free = torch.cuda.Event()
                    if self.reads:
                        slot.staging = self.pinned.empty(slot_bytes)
                self._slots.append(slot)
                self._free.append(slot)
        # CUDA from RAM: a load is an async copy enqueued inline; otherwise a background thread does it
        inline = self._cuda and not self.reads
        self._executor = (
            None if inline or not n_slots else ThreadPoolExecutor(1, thread_name_prefix="specexec-load")
        )
        self._pos_of = {layer: pos for pos, layer in enumerate(self.streamed)}
        self._handles = []
        for bound in self.layers:
            self._handles.append(bound.module.register_forward_pre_hook(self._make_pre_hook(bound.index)))
            self._handles.append(
                bound.module.register_forward_hook(self._make_post_hook(bound.index), always_call=True)
            )

    # hooks
    def _make_pre_hook(self, layer: int):
        def pre_hook(module, args):
            self._before(layer)

        return pre_hook

    def _make_post_hook(self, layer: int):
        def post_hook(module, args, output):
            self._after(layer)

        return post_hook

    def _before(self, layer: int) -> None:
        if layer == len(self.layers) - 1:  # the last layer: an early-exit draft's calls do not count
            self.stats.forwards += 1
        bound = self.layers[layer]
        if layer in self.resident:
            bound.bind(self._views_of(layer, -1, self.resident[layer]), self._scratch)
            return
        slot = self._acquire(self._pos_of[layer])
        self._active[layer] = slot
        try:
            bound.bind(self._views_of(layer, slot.index, slot.buffer), self._scratch)
        except BaseException:
            self._after(layer)
            raise

    def _views_of(self, layer: int, slot: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (layer, slot)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self.layers[layer].layout.views(buf)
        return views

    def _after(self, layer: int) -> None:
        self.layers[layer].unbind()
        slot = self._active.pop(layer, None)
        if slot is not None:
            self._release(slot)

    # ring
    def _acquire(self, pos: int) -> _Slot:
        if self._queue and self._queue[0].pos != pos:
            self._drain()  # an earlier forward failed part-way, or layers were called out of order
        if not self._queue:
            self._next_pos = pos
            self._fill()
        entry = self._queue.popleft()
        try:
            if entry.future is not None:
                if not entry.future.done():
                    start = time.perf_counter()
                    entry.future.result()
                    self.stats.load_wait_s += time.perf_counter() - start
                else:
                    entry.future.result()
        except BaseException:
            self._free.append(entry.slot)
            self._drain()
            raise
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(entry.slot.ready)
        return entry.slot

    def _release(self, slot: _Slot) -> None:
        if self._cuda:
            slot.free.record(torch.cuda.current_stream(self.device))
        self._free.append(slot)
        self._fill()

    def _fill(self) -> None:
        while self._free:
            slot = self._free.popleft()
            pos = self._next_pos
            self._next_pos = (pos + 1) % len(self.streamed)
            self.stats.bytes_streamed += self.layers[self.streamed[pos]].layout.nbytes
            if self._executor is None:
                self._load(pos, slot)
                future = None
            else:
                future = self._executor.submit(self._load, pos, slot)
            self._queue.append(_Pending(pos, slot, future))

    def _drain(self) -> None:
        """Wait for every load in flight and return all slots to the free list (the data is dropped)."""
        self.stats.restarts += 1
        for entry in self._queue:
            if entry.future is not None:
                exc = entry.future.exception()
                if exc is not None:
                    log.debug("dropped a failed prefetch of streamed layer %d: %s", entry.pos, exc)
            self._free.append(entry.slot)
        self._queue.clear()

    def _load(self, pos: int, slot: _Slot) -> None:
        """Fill `slot` with streamed layer `pos` (runs on the loader thread, or inline for CUDA+RAM)."""
        layer = self.streamed[pos]
        nbytes = self.layers[layer].layout.nbytes
        if self._cuda:
            if self.reads:
                slot.ready.synchronize()  # the previous copy out of this staging buffer is done
                self._reader.run(self.reads[layer], slot.staging)
                src = slot.staging
            else:
                src = self.host[layer]
            with torch.cuda.device(self.device), torch.cuda.stream(slot.stream):
                slot.stream.wait_event(slot.free)
                slot.buffer[:nbytes].copy_(src[:nbytes], non_blocking=True)
                slot.ready.record(slot.stream)
        elif self.reads:
            self._reader.run(self.reads[layer], slot.buffer)
        else:
            slot.buffer[:nbytes].copy_(self.host[layer])

    def layer_bytes(self, layer: int) -> torch.Tensor:
        """A copy of decoder layer `layer`'s stored bytes on the device (for inspection and tests)."""
        if layer in self.resident:
            return self.resident[layer].clone()
        nbytes = self.layers[layer].layout.nbytes
        if layer in self.host:
            return self.host[layer][:nbytes].to(self.device, copy=True)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        reader = FileReader()
        try:
            reader.run(self.reads[layer], buf)
        finally:
            reader.close()
        return buf.to(self.device)

    def layer_state_dict(self, layer: int) -> dict[str, torch.Tensor]:
        """Decoder layer `layer`'s parameters as the forward sees them (dequantized), by name in the layer."""
        bound = self.layers[layer]
        views = bound.layout.views(self.layer_bytes(layer))
        return {r.name: build_param(r, views, self.dtype).clone() for r in bound.layout.recipes}

    def synchronize(self) -> None:
        """Wait for all loads in flight (they stay queued for the next forward)."""
        for entry in self._queue:
            if entry.future is not None:
                entry.future.exception()
        if self._cuda:
            for slot in self._slots:
                slot.ready.synchronize()

    def close(self) -> None:
        """Stop the loader, remove hooks, close files and delete the blob directory we created."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._reader.close()
        if self._cuda:
            self.synchronize()
        self._queue.clear()
        self.host.clear()
        self._slots.clear()
        self._views.clear()
        self.pinned.close()
        if self.cleanup_dir:
            shutil.rmtree(self.cleanup_dir, ignore_errors=True)
            self.cleanup_dir = None


# --- loading -------------------------------------------------------------------------------------------


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | str | None, quant: str | None
) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} was asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if isinstance(dtype, str):
        names = {
            "fp16": "float16",
            "bf16": "bfloat16",
            "fp32": "float32",
            "fp64": "float64",
            "half": "float16",
        }
        dtype = getattr(torch, names.get(dtype, dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError("dtype must be one of float16, bfloat16, float32, float64")
    if quant in FLOAT_QUANTS:
        if dtype is not None and dtype != FLOAT_QUANTS[quant]:
            raise UsageError(
                f"--quant {quant} computes in {FLOAT_QUANTS[quant]}, but dtype {dtype} was given"
            )
        dtype = FLOAT_QUANTS[quant]
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub repo id resolved through the local hub cache / download."""
    path = expand_user(name)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as exc:
        raise SpecexecError(
            f"cannot find model {name!r}: not a directory, and the hub lookup failed ({exc})"
        ) from exc


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _model_facts(model: nn.Module, sources: list[LayerSource], dtype: torch.dtype, prefix: str, direct: bool):
    cfg = model.config
    seen, resident = set(), 0
    for name, p in model.named_parameters():
        if not name.startswith(prefix + ".") and id(p) not in seen:
            seen.add(id(p))
            resident += p.numel() * dtype_bytes(dtype)
    total = sum(s.layout.nbytes for s in sources)
    return planner.ModelFacts(
        n_layers=len(sources),
        layer_bytes=max(s.layout.nbytes for s in sources),
        total_layer_bytes=total,
        resident_bytes=resident,
        kv_bytes_per_token=kv_bytes_per_token(cfg, dtype),
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        * getattr(cfg, "num_experts_per_tok", 1),
        dtype_bytes=dtype_bytes(dtype),
        decode_bytes=max(s.layout.decoded_bytes(dtype) for s in sources),
        disk_cache_bytes=0 if direct else total,
    )


@dataclass
class _Prepared:
    """Everything decided before any weight is read: the skeleton, the layer layouts and the plan."""

    model: nn.Module
    index: CheckpointIndex | None
    prefix: str
    layer_list: nn.ModuleList
    sources: list[LayerSource]
    device: torch.device
    dtype: torch.dtype
    quant: str
    plan: planner.Plan


def model_bytes(model: nn.Module) -> int:
    """Bytes of a resident model's parameters and buffers (e.g. the draft), for the memory plan."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V bytes of every layer for one token."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes(dtype)


def _prepare(
    source, device, dtype, offload, quant, buffers, resident_layers, offload_dir, budget, context_len, draft,
    hardware, max_memory,
) -> _Prepared:
    if offload not in planner.OFFLOADS and offload != "auto":
        raise UsageError(f"--offload must be one of none, ram, disk, auto; got {offload!r}")
    if quant is not None and quant not in QUANTS and quant not in FLOAT_QUANTS:
        raise UsageError(f"--quant must be one of {', '.join(QUANTS)}; got {quant!r}")

    index, gptq = None, None
    if isinstance(source, nn.Module):
        model, config = source, source.config
        if quant == "gptq":
            raise UsageError("--quant gptq needs a GPTQ checkpoint directory, not a loaded model")
        if dtype is None and quant is None:
            dtype = model.dtype  # keep the loaded model's precision
    else:
        from transformers import AutoConfig

        directory = resolve_checkpoint(source)
        config = AutoConfig.from_pretrained(directory)
        gptq = gptq_config_of(config)
        if gptq is not None and quant not in (None, "gptq"):
            raise UsageError(f"{source} is a GPTQ checkpoint; use --quant gptq")
        if gptq is None and quant == "gptq":
            raise UsageError(
                f"--quant gptq needs a GPTQ checkpoint; {source} has no GPTQ quantization_config"
            )
        quant = "gptq" if gptq is not None else quant
    device, dtype = resolve_device_dtype(device, dtype, quant)
    if quant is None:
        quant = {v: k for k, v in FLOAT_QUANTS.items()}[dtype]
    if not isinstance(source, nn.Module):
        model = empty_skeleton(config, dtype)
        index = CheckpointIndex(directory)
    try:
        prefix, layer_list = find_layers(model)
        # plan from headers and shapes only (nothing is read yet except GPTQ g_idx)
        disk_root = Path(offload_dir) if offload_dir else Path(tempfile.gettempdir())
        if offload_dir and not disk_root.is_dir():
            raise UsageError(f"--offload-dir {offload_dir}: not a directory")
        hw = hardware or planner.probe_hardware(
            device, str(disk_root if disk_root.exists() else disk_root.parent)
        )
        hw = caps.apply_caps(hw, max_memory or {}, device.type, device.index)
        reserve = 256 << 20
        if device.type == "cuda":
            reserve += int(0.05 * torch.cuda.mem_get_info(device)[1])
        request = planner.PlanRequest(
            offload=offload,
            buffers=buffers,
            resident_layers=resident_layers,
            budget=budget,
            context_len=context_len,
            draft_bytes=model_bytes(draft) if draft is not None else 0,
            draft_kv_bytes_per_token=kv_bytes_per_token(draft.config, draft.dtype)
            if draft is not None
            else 0,
            reserve_bytes=reserve,
        )
        error = None
        for tier in planner.OFFLOADS if offload == "auto" else (offload,):
            # the disk tier reads checkpoint files in place unless layers need converting (nf4/int8,
            # model objects, or weights stored wider than the compute dtype)
            direct = (
                tier == "disk" and index is not None and quant not in ("nf4", "int8")
                and not _stored_wider(index, prefix, dtype)
            )
            sources = _layer_sources(model, layer_list, prefix, index, quant, dtype, gptq, direct,
                                     keep_narrow=tier != "none")
            facts = _model_facts(model, sources, dtype, prefix, direct)
            try:
                the_plan = planner.plan(hw, facts, replace(request, offload=tier))
                break
            except SpecexecError as exc:
                error = exc
        else:
            raise error
    except BaseException:
        if index is not None:
            index.close()
        raise
    return _Prepared(model, index, prefix, layer_list, sources, device, dtype, quant, the_plan)


def plan_target(source: str | os.PathLike | nn.Module, **options: Any) -> planner.Plan:
    """The memory plan `load_offloaded_target(source, **options)` would follow, without loading any
    weights. Takes the same keyword arguments; raises the same one-line SpecexecError when the run
    cannot fit."""
    call = inspect.signature(load_offloaded_target).bind(source, **options)
    call.apply_defaults()  # load_offloaded_target's signature holds the defaults for both
    prep = _prepare(*call.args)
    if prep.index is not None:
        prep.index.close()
    return prep.plan


def load_offloaded_target(
    source: str | os.PathLike | nn.Module,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    offload: str = "ram",
    quant: str | None = None,
    buffers: int = 2,
    resident_layers: int | None = 0,
    offload_dir: str | os.PathLike | None = None,
    budget: int | None = None,
    context_len: int = 2048,
    draft: nn.Module | None = None,
    hardware: planner.HardwareFacts | None = None,
    max_memory: dict[str, int] | None = None,
) -> nn.Module:
    """Load a causal LM whose decoder layers stream from host RAM or disk; a drop-in for the resident model.

    source: checkpoint directory, hub repo id (safetensors) or a loaded transformers causal LM (its
      layer weights are moved into the offload store and its parameters replaced; do not reuse it).
    device: compute device (default cuda if available, else cpu); dtype: compute dtype (default: the
      --quant's float type; fp16 on CUDA / fp32 on CPU for gptq, nf4, int8; a model object's own).
    offload: "none" (all layers resident on the device), "ram", "disk", or "auto" (first that fits).
    quant: fp16 | bf16 | fp32, gptq (checkpoint must be GPTQ), nf4 | int8 (bitsandbytes, quantized at
      load time); None: gptq for GPTQ checkpoints, else from dtype.
    buffers: ring size (>= 2); resident_layers: first R layers stay on the device (None: as many as fit).
    offload_dir: where the disk tier writes converted layers (nf4/int8 or a model object); default tmp.
    budget, context_len, draft: what else must fit on the device, for the memory plan (budget None:
      the plan picks the largest that fits, `model.offload_engine.plan.budget`).
    hardware: override the probed HardwareFacts (tests).
    max_memory: caps per memory pool ({"cpu": bytes, "cuda:0": bytes, "device": bytes}, see
      runtime/caps.py); the plan uses the smaller of each cap and the probe.
    Streamed layers are stored in the checkpoint's float dtype when it is narrower than the compute
      dtype (e.g. float16 files computed in float32 on a CPU) and upcast on the device per call.
    Raises SpecexecError (one line) before loading any weights when the run cannot fit.
    The engine is `model.offload_engine` (plan, stats, close()). Do not call `.to()` on the model.
    """
    prep = _prepare(
        source, device, dtype, offload, quant, buffers, resident_layers, offload_dir, budget, context_len,
        draft, hardware, max_memory,
    )
    model, index = prep.model, prep.index
    try:
        _load_resident_parts(model, index, prep.prefix, prep.device, prep.dtype)
        engine = _build_engine(
            model, prep.layer_list, prep.sources, index, prep.device, prep.dtype, prep.plan, offload_dir
        )
        if index is not None:
            _load_generation_config(model, index.directory)
    finally:
        if index is not None:
            index.close()
    model.offload_engine = engine
    weakref.finalize(model, engine.close)
    model.eval()
    return model


def _stored_wider(index: CheckpointIndex, prefix: str, dtype: torch.dtype) -> bool:
    """True when the checkpoint stores decoder-layer floats wider than `dtype` (reading them in place
    would stream more bytes than the computation needs)."""
    size = dtype_bytes(dtype)
    return any(
        loc.dtype.is_floating_point and dtype_bytes(loc.dtype) > size
        for name, loc in index.locations.items()
        if name.startswith(prefix + ".")
    )


def _layer_sources(
    model, layer_list, prefix, index, quant, dtype, gptq, direct, keep_narrow=False
) -> list[LayerSource]:
    """Layouts of every decoder layer, from checkpoint headers or from the layers' own tensors.
    keep_narrow: keep checkpoint floats narrower than `dtype` as stored (upcast per call)."""
    sources = []
    builder = LayerBuilder(index, quant, dtype, gptq, direct=direct, keep_narrow=keep_narrow)
    for i, layer in enumerate(layer_list):
        named = list(layer.named_parameters())
        params = [(n, tuple(p.shape)) for n, p in named]
        if index is not None:
            refs = checkpoint_param_refs(index, f"{prefix}.{i}.", params)
        else:
            refs = [ParamRef(n, tuple(p.shape), [[WeightRef("tensor", tensor=p.data)]]) for n, p in named]
        sources.append(builder.build(refs))
    return sources


def _build_engine(model, layer_list, sources, index, device, dtype, the_plan, offload_dir) -> OffloadEngine:
    """Fill the layer stores the plan asks for (device, host RAM, blob file) and hook the layers."""
    n = len(layer_list)
    streamed = list(range(the_plan.resident_layers, n))
    bound = [BoundLayer(i, layer_list[i], sources[i].layout, dtype) for i in range(n)]
    reader = FileReader()
    pinned = PinnedPool(device.type == "cuda")
    resident, host, reads = {}, {}, {}
    cleanup, writer = None, None
    try:
        if the_plan.offload == "disk" and streamed and sources[streamed[0]].reads is None:
            cleanup = tempfile.mkdtemp(prefix="specexec-offload-", dir=offload_dir)
            writer = BlobWriter(os.path.join(cleanup, "layers.bin"))
        for i, src in enumerate(sources):
            if i < the_plan.resident_layers:
                resident[i] = src.materialize(reader).to(device)
            elif the_plan.offload == "ram":
                host[i] = src.materialize(reader, out=pinned.empty(src.layout.nbytes))
            elif src.reads is not None:
                reads[i] = src.reads
            else:
                offset = writer.append(src.materialize(reader))
                reads[i] = [ReadOp(writer.path, offset, src.layout.nbytes, 0)]
            src.produce = None  # drop references to the source tensors (a model object's weights)
    except BaseException:
        pinned.close()
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    finally:
        reader.close()
        if writer is not None:
            writer.close()
    return OffloadEngine(
        device=device,
        dtype=dtype,
        layers=bound,
        resident=resident,
        streamed=streamed,
        host=host,
        reads=reads,
        n_buffers=max(the_plan.buffers, 1),
        plan=the_plan,
        cleanup_dir=cleanup,
        pinned=pinned,
    )


def _load_resident_parts(model: nn.Module, index: CheckpointIndex | None, prefix: str, device, dtype) -> None:
    """Embeddings, final norm, LM head (and every buffer) onto the device in the compute dtype."""
    tied = dict(
        getattr(model, "all_tied_weights_keys", None) or {}
    )  # {target: source}, e.g. lm_head <- embed
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(prefix + ".") or (name in tied and (index is None or name not in index)):
            continue
        if index is None:
            value = p.data
        elif name in index:
            value = index.read(name)
        else:
            raise SpecexecError(f"checkpoint has no tensor {name}")
        _set_param(model, name, value.to(device, dtype if value.is_floating_point() else value.dtype))
    for target, source in tied.items():
        if index is None or target not in index:
            src = model.get_parameter(source)
            owner_name, _, attr = target.rpartition(".")
            (model.get_submodule(owner_name) if owner_name else model)._parameters[attr] = src
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[bname] = buf.to(device)


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    if (directory / "generation_config.json").exists():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except Exception as exc:  # a broken generation_config.json should not stop loading
            log.warning("ignoring %s/generation_config.json: %s", directory, exc)
