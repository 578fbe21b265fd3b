"""Choose how a GPTQ weight is dequantized: the fused Triton kernel on CUDA, else the pure-torch reference.

The kernel (`gptq_triton`) is used when the tensors are on CUDA, triton imports, and the bit width and
dtypes are ones it handles, for either grouping (g_idx None, or an act-order g_idx). Everything else,
every CPU tensor included, goes to `quant.dequantize_gptq`; both give the same bits (see gptq_triton's
contract).
triton is imported the first time a CUDA weight asks for it, never on CPU. SPECEXEC_GPTQ_TRITON=0 turns
the kernel off. If the kernel cannot be built or launched (no C compiler for triton's launcher, an old
GPU), the first failure is logged once and the torch path serves from then on.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

from specexec_cli.runtime import quant

log = logging.getLogger(__name__)

_kernels: ModuleType | None = None
_state = "untried"  # "untried" | "ready" | "off"


def triton_kernels() -> ModuleType | None:
    """The `gptq_triton` module, imported on first use; None when triton is unavailable or turned off."""
    global _kernels, _state
    if _state == "untried":
        _state = "off"
        if os.environ.get("SPECEXEC_GPTQ_TRITON", "1") == "0":
            log.debug("GPTQ Triton kernel turned off by SPECEXEC_GPTQ_TRITON=0")
        else:
            try:
                from specexec_cli.runtime import gptq_triton
            except Exception as exc:  # ImportError, or a triton install that fails at import
                log.debug("GPTQ dequantization stays in torch: triton unavailable (%s)", exc)
            else:
                _kernels, _state = gptq_triton, "ready"
    return _kernels if _state == "ready" else None


def _disable(exc: Exception) -> None:
    global _state
    _state = "off"
    log.warning("GPTQ Triton kernel failed (%s: %s); dequantizing in torch from now on",
                type(exc).__name__, exc)


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    zero_offset: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`quant.dequantize_gptq` with the same arguments and result ([out, in] in `dtype`), fused into one
    kernel where it can be; both write into `out` (a contiguous [in, out] scratch) when given."""
    if qweight.is_cuda:
        kernels = triton_kernels()
        if kernels is not None and kernels.supports(bits, scales.dtype, dtype):
            try:
                return kernels.dequantize(qweight, qzeros, scales, bits, zero_offset, dtype, g_idx, out)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # compile or launch failure: fall back for good
                _disable(exc)
    return quant.dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype, out)
