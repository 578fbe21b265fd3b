"""Page-locked host memory for the streaming engine: exact-size cudaHostRegister, with fallbacks."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class PinnedPool:
    """Page-locked host buffers, and an account of what was pinned.

    `pin_memory=True` goes through PyTorch's caching host allocator, which rounds every block up to a
    power of two (a 1.7 GB layer would pin 2 GB). So an ordinary tensor is registered with
    cudaHostRegister first (whole pages: the buffer starts on a page of its own and the registration
    covers its last page, so two small buffers never share a page, which CUDA would refuse to register
    twice; unregistered on close). A failed cudaHostRegister leaves its
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
            buf, span = _page_aligned(nbytes)
            try:
                err = int(self._register(buf.data_ptr(), span))
            except (AssertionError, AttributeError, RuntimeError, TypeError) as exc:
                err, reason = -1, f"cudaHostRegister unavailable: {exc}"
            else:
                reason = f"cudaHostRegister failed with CUDA error {err}"
                if err != 0:
                    self._clear_error()
            if err == 0:
                self._registered.append(buf)
                self.registered_bytes += span
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


PAGE = 4096


def _page_aligned(nbytes: int) -> tuple[torch.Tensor, int]:
    """An uninitialised uint8 [nbytes] host buffer that starts on a page boundary and owns every page it
    touches, and the whole-page length to register."""
    span = -(-nbytes // PAGE) * PAGE
    base = torch.empty(span + PAGE, dtype=torch.uint8)
    start = -base.data_ptr() % PAGE
    return base[start:start + nbytes], span  # the view keeps `base` (and its slack) alive


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
