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

import logging
import math
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from specexec_cli.runtime import plan as planner
from specexec_cli.runtime.disk import FileReader, ReadOp, read_threads
from specexec_cli.runtime.layout import (
    LayerLayout,
    align,
    build_param,
    decode_weight,
    is_dequantized,
    is_upcast,
)
from specexec_cli.runtime.pinned import PinnedPool

log = logging.getLogger(__name__)


# --- binding a layer's parameters to a buffer ----------------------------------------------------------


class BoundLayer:
    """A decoder layer whose parameters are rebuilt from a byte buffer before each call.

    Raw weights stored narrower than the compute dtype (float16 files computed in float32) are upcast,
    and GPTQ weights dequantized, into a scratch buffer the engine owns and reuses for every layer:
    allocating fresh float32 tensors for every layer of every pass costs page faults that dwarf the
    conversion (on a CPU, ~7x for an upcast, ~2x for a dequantization).
    """

    def __init__(self, index: int, module: nn.Module, layout: LayerLayout, dtype: torch.dtype) -> None:
        self.index = index
        self.module = module
        self.layout = layout
        self.dtype = dtype
        self.targets = []  # (owning module, attribute, recipe, meta placeholder, scratch range or None)
        self.scratch_numel = 0  # elements of `dtype` the upcast and dequantized weights need
        for recipe in layout.recipes:
            owner_name, _, attr = recipe.name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            placeholder = nn.Parameter(
                torch.empty(recipe.shape, dtype=dtype, device="meta"), requires_grad=False
            )
            owner._parameters[attr] = placeholder
            span = None  # (start, end) in the scratch buffer
            if is_upcast(recipe, layout, dtype) or is_dequantized(recipe):
                numel = math.prod(recipe.shape)
                span = (self.scratch_numel, self.scratch_numel + numel)
                self.scratch_numel += align(numel, 64)
            self.targets.append((owner, attr, recipe, placeholder, span))

    def bind(self, views: dict[str, torch.Tensor], scratch: torch.Tensor | None = None) -> None:
        """Point the parameters at the stored tensors (views of a buffer from `layout.views`); upcast
        and dequantized weights go into `scratch` (1-D, `dtype`, >= scratch_numel) when given."""
        for owner, attr, recipe, _, span in self.targets:
            if span is not None and scratch is not None:
                spec = recipe.parts[0][0]
                if spec.codec == "raw":
                    out = scratch[span[0] : span[1]].view(recipe.shape)
                    out.copy_(views[spec.keys[0]])
                else:  # dequantized into the scratch as [in, out]; the parameter is its [out, in] view
                    out = decode_weight(spec, views, self.dtype, scratch[span[0] : span[1]].view(
                        recipe.shape[::-1]))
                owner._parameters[attr] = out
            else:
                owner._parameters[attr] = build_param(recipe, views, self.dtype)

    def bind_dense(self, params: dict[str, torch.Tensor]) -> None:
        """Point the parameters at dense tensors by recipe name (an expanded layer's, see `expand`)."""
        for owner, attr, recipe, _, _ in self.targets:
            owner._parameters[attr] = params[recipe.name]

    def expand(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every parameter decoded once from the layer's buffer into its own dense tensor in `dtype`."""
        views = self.layout.views(buf)
        return {r.name: build_param(r, views, self.dtype).contiguous().clone() for r in self.layout.recipes}

    def unbind(self) -> None:
        for owner, attr, _, placeholder, _ in self.targets:
            owner._parameters[attr] = placeholder


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
    expanded: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # resident layers decoded once
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
        self._reader = FileReader(threads=read_threads() if self.reads else 1)
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
        if layer in self.expanded:
            bound.bind_dense(self.expanded[layer])
            return
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

    def device_bytes(self) -> int:
        """Device bytes the engine holds: resident and expanded layers, ring buffers, upcast scratch."""
        tensors = [*self.resident.values(), *(t for p in self.expanded.values() for t in p.values()),
                   *(slot.buffer for slot in self._slots)]
        if self._scratch is not None:
            tensors.append(self._scratch)
        return sum(t.numel() * t.element_size() for t in tensors)

    def layer_bytes(self, layer: int) -> torch.Tensor:
        """A copy of decoder layer `layer`'s stored bytes on the device (for inspection and tests; an
        expanded layer keeps no stored bytes)."""
        if layer in self.expanded:
            raise ValueError(f"layer {layer} is expanded: its stored bytes were dropped "
                             f"(layer_state_dict has its weights)")
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
        if layer in self.expanded:
            return {name: t.clone() for name, t in self.expanded[layer].items()}
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
        self.expanded.clear()
        self._slots.clear()
        self._views.clear()
        self.pinned.close()
        if self.cleanup_dir:
            shutil.rmtree(self.cleanup_dir, ignore_errors=True)
            self.cleanup_dir = None
