"""Count the operations that make the host wait for a CUDA device, on any device (tests run on CPU).

On CUDA the host blocks when it needs a value computed on the device, or when it copies pageable host
data to the device. With a TorchDispatchMode (which sees every aten op, also those inside
transformers) plus a wrapper of `Tensor.tolist` (which reads CPU data without dispatching), these are
counted as they would happen on CUDA:

- `_local_scalar_dense`: `.item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`;
- `tolist`: a device-to-host copy of a whole tensor;
- `nonzero`, `masked_select`, `_unique2`, and `index` with a boolean index: outputs whose size depends
  on the data, so the host must learn it;
- `lift_fresh` of a tensor with dimensions: `torch.tensor(python list, device=...)`, a blocking copy
  from pageable host memory (a Python scalar becomes a 0-dim CPU tensor that kernels take by value:
  `t[i] = True` does not sync and is not counted).

`.item()`, `int(t)`, `float(t)`, `bool(t)` and `operator.index(t)` are also wrapped at the Python level,
because under inference mode the scalar read of a CPU tensor does not reach the dispatch mode.

Ops that stay on the host in a CUDA run (e.g. building a small list) are not told apart on CPU, so the
count is an upper bound of the syncs a CUDA run would make, which is the direction a budget needs.

On a CUDA device `count_cuda_syncs` counts the real thing: torch's sync debug mode warns at every
operation that blocks the host on the device (`torch.cuda.set_sync_debug_mode("warn")`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default: "scalar",
    torch.ops.aten.nonzero.default: "nonzero",
    torch.ops.aten.masked_select.default: "masked_select",
    torch.ops.aten._unique2.default: "unique",
}
SCALAR_READS = ("item", "__int__", "__float__", "__bool__", "__index__")


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """counts[kind] of host-device synchronisations seen while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.in_scalar_read = False  # a Python-level wrapper already counted this read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = SYNC_OPS.get(func)
        if kind is None and func is torch.ops.aten.index.Tensor and _has_bool_index(args):
            kind = "bool_mask_index"
        if func is torch.ops.aten.lift_fresh.default and args[0].dim() > 0:
            kind = "tensor_from_host"
        if func is torch.ops.aten._local_scalar_dense.default:
            kind = None if self.in_scalar_read else "scalar"
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """with count_syncs() as syncs: ...; then syncs.total and syncs.counts."""
    counter = SyncCounter()
    real = {name: getattr(torch.Tensor, name) for name in ("tolist", *SCALAR_READS)}

    def wrap(name: str, kind: str):
        def read(self, *args):
            counter.counts[kind] += 1
            counter.in_scalar_read = True
            try:
                return real[name](self, *args)
            finally:
                counter.in_scalar_read = False
        return read

    for name in real:
        setattr(torch.Tensor, name, wrap(name, "tolist" if name == "tolist" else "scalar"))
    try:
        with counter:
            yield counter
    finally:
        for name, method in real.items():
            setattr(torch.Tensor, name, method)


class CudaSyncCounter:
    """The syncs torch's CUDA sync debug mode reported (`counts["cuda_sync"]`)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextmanager
def count_cuda_syncs() -> Iterator[CudaSyncCounter]:
    """with count_cuda_syncs() as syncs: ...; then syncs.total: the synchronizing CUDA operations the
    block ran, as torch's sync debug mode reports them (one warning each)."""
    counter = CudaSyncCounter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counter.counts["cuda_sync"] = sum("synchronizing CUDA operation" in str(w.message) for w in caught)
