"""Weight formats the offloaded runtime streams: GPTQ packed ints, bitsandbytes NF4 and int8.

All dequantization here is plain torch (or bitsandbytes, which has CPU kernels since 0.45), so the
same code runs on CPU and CUDA. Weights stream in their packed form and are expanded on the device
just before the layer that uses them runs. On CUDA, GPTQ goes through `gptq_dispatch`, which fuses
`dequantize_gptq` into one Triton kernel (`gptq_triton`) where it can; `dequantize_gptq` stays the
reference that kernel matches bit for bit.

GPTQ format (as published on the hub by AutoGPTQ / GPTQModel, safetensors):
  qweight  int32 [in / (32/bits), out]   `32/bits` values per int32 along the *input* dim, low bits first
  qzeros   int32 [groups, out / (32/bits)] packed the same way along the *output* dim
  scales   fp16  [groups, out]
  g_idx    int32 [in]                     group of each input row (act-order / desc_act permutes it)
  weight[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]
Zero-point convention: the classic AutoGPTQ "v1" format (checkpoint_format "gptq", the one on the
hub) stores `zero - 1`, so zero = stored + 1; the "gptq_v2" format (GPTQModel's internal one) stores
the zero itself. Symmetric checkpoints still store their (constant) zeros, so `sym` needs no special
case when dequantizing.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch

from specexec_cli.errors import SpecexecError, UsageError

NF4_BLOCKSIZE = 64
GPTQ_BITS = (2, 4, 8)


# --- GPTQ ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTQConfig:
    """The parts of a GPTQ `quantization_config` that dequantization needs."""

    bits: int = 4
    group_size: int = 128  # -1: one group spanning the whole input dim
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1, zeros stored minus one) or "gptq_v2"

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero to get the real zero point."""
        return 1 if self.checkpoint_format == "gptq" else 0


def gptq_config_from_dict(qc: dict[str, Any]) -> GPTQConfig:
    """Read a `quantization_config` / `quantize_config.json` dict; refuse what cannot be dequantized."""
    bits = int(qc.get("bits", 4))
    if bits not in GPTQ_BITS:
        raise UsageError(
            f"GPTQ with {bits} bits is not supported (supported: {', '.join(map(str, GPTQ_BITS))})"
        )
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UsageError(f"GPTQ checkpoint_format {fmt!r} is not supported (use 'gptq' or 'gptq_v2')")
    return GPTQConfig(
        bits=bits,
        group_size=int(qc.get("group_size", 128)),
        desc_act=bool(qc.get("desc_act", False)),
        sym=bool(qc.get("sym", True)),
        checkpoint_format=fmt,
    )


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)  # [32 / bits]


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / p, C] -> int32 [R, C]: p = 32/bits values per word along dim 0, low bits first."""
    shifts = _shifts(bits, packed.device)
    vals = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # [R/p, p, C]
    return vals.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C / p] -> int32 [R, C]: p = 32/bits values per word along dim 1, low bits first."""
    shifts = _shifts(bits, packed.device)
    vals = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & ((1 << bits) - 1)  # [R, C/p, p]
    return vals.reshape(packed.shape[0], -1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> the int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `unpack_rows`: ints in [0, 2**bits) [R, C] -> int32 [R / p, C]."""
    p = 32 // bits
    rows, cols = values.shape
    if rows % p:
        raise ValueError(f"{rows} rows do not pack into int32 words of {p} values")
    v = values.to(torch.int64).reshape(rows // p, p, cols)
    words = (v << _shifts(bits, values.device).to(torch.int64).view(1, p, 1)).sum(dim=1)
    return _to_int32(words)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `unpack_cols`: ints in [0, 2**bits) [R, C] -> int32 [R, C / p]."""
    p = 32 // bits
    rows, cols = values.shape
    if cols % p:
        raise ValueError(f"{cols} columns do not pack into int32 words of {p} values")
    v = values.to(torch.int64).reshape(rows, cols // p, p)
    words = (v << _shifts(bits, values.device).to(torch.int64).view(1, 1, p)).sum(dim=2)
    return _to_int32(words)


def gptq_is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when row i is in group i // group_size (no act-order permutation)."""
    n = g_idx.numel()
    gs = n if group_size <= 0 else group_size
    if n % gs:
        return False
    expected = torch.arange(n, dtype=torch.int64, device=g_idx.device) // gs
    return bool(torch.equal(g_idx.to(torch.int64), expected))


def _unpack_row_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / p, C] packed along rows (p = 32/bits values per word, low bits first) -> uint8 [R, C].

    Reads each word as its 4 little-endian bytes, so every operation moves 1-byte values (4x less memory
    traffic than shifting int32 words): byte k of a word holds its values k*(8/bits) .. (k+1)*(8/bits)-1."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    rows, cols = packed.shape
    b = packed.contiguous().view(torch.uint8).view(rows, cols, 4).permute(0, 2, 1)  # [R/p, 4, C]
    if per_byte == 1:
        return b.reshape(rows * 4, cols)
    out = torch.empty(rows, 4, per_byte, cols, dtype=torch.uint8, device=packed.device)
    for j in range(per_byte):
        torch.bitwise_and(b if j == 0 else b >> (j * bits), mask, out=out[:, :, j])
    return out.view(rows * 32 // bits, cols)


def _unpack_col_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C / p] packed along columns -> uint8 [R, C] (see `_unpack_row_bytes`)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [8 / bits]
    b = packed.contiguous().view(torch.uint8).view(*packed.shape, 4, 1)
    return ((b >> shifts) & ((1 << bits) - 1)).view(packed.shape[0], -1)


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
    """GPTQ tensors -> dense weight [out, in] in `dtype` (a transposed view; F.linear accepts it).

    g_idx None means the trivial grouping (row i in group i // (in / groups)), which avoids a gather.
    (q - zero) is a small integer, exact in any float dtype, so the only rounding is the final product.
    The work dtype is the wider of `dtype` and the scales' dtype (float32 for float16 scales with
    bfloat16 compute). For float16/bfloat16 scales that product is exact in float32, so this equals
    float32(q - zero) * float32(scale) rounded once to `dtype`: the Triton kernel's arithmetic
    (gptq_triton's docstring), bit for bit `dequantize_gptq_reference`.
    The integers are unpacked and subtracted as bytes (int16 for 8 bits); the product is an in-place
    multiply of the converted differences (torch's mixed-dtype multiply is ~5x slower on a CPU).
    out: a contiguous [in, out] buffer of `dtype` to write into (reused scratch: a fresh multi-MB
    tensor per call costs page faults on a CPU); used when the work dtype is `dtype`.
    """
    if sys.byteorder != "little":
        return dequantize_gptq_reference(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype)
    work = torch.promote_types(dtype, scales.dtype)
    small = torch.int8 if bits < 8 else torch.int16  # holds q - zero, zero up to 2**bits
    q = _unpack_row_bytes(qweight, bits)  # uint8 [in, out]
    zeros = _unpack_col_bytes(qzeros, bits).to(small) + zero_offset  # [groups, out]
    q = q.view(torch.int8) if small == torch.int8 else q.to(small)  # values < 2**bits: same numbers
    n_in, n_out = q.shape
    if out is None or work != dtype:
        out = torch.empty(n_in, n_out, dtype=work, device=qweight.device)
    if g_idx is None:
        groups = scales.shape[0]
        diff = q.view(groups, n_in // groups, n_out)
        diff.sub_(zeros.unsqueeze(1))  # [groups, rows, out]
        w = out.view(groups, n_in // groups, n_out)
        w.copy_(diff)
        w.mul_(scales.to(work).unsqueeze(1))
    else:
        g = g_idx.to(torch.long)
        q.sub_(zeros.index_select(0, g))
        out.copy_(q)
        out.mul_(scales.to(work).index_select(0, g))  # [in, out]
    return out.t() if work == dtype else out.t().to(dtype)


def dequantize_gptq_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    zero_offset: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`dequantize_gptq` by int32 shifts: the plain formula, kept as the reference the byte path and the
    Triton kernel are tested against, and for big-endian hosts.

    g_idx None means the trivial grouping (row i in group i // (in / groups)), which avoids a gather.
    (q - zero) is a small integer, exact in any float dtype, so the only rounding is the final product.
    The work dtype is the wider of `dtype` and the scales' dtype (float32 for float16 scales with
    bfloat16 compute). For float16/bfloat16 scales that product is exact in float32, so this equals
    float32(q - zero) * float32(scale) rounded once to `dtype`: the Triton kernel's arithmetic
    (gptq_triton's docstring). This reference materializes ~40 bytes of intermediates per weight.
    """
    # compute where the scales are exact (fp16 scales with bf16 compute: in fp32, then one rounding)
    work = torch.promote_types(dtype, scales.dtype)
    q = unpack_rows(qweight, bits)  # [in, out]
    zeros = (unpack_cols(qzeros, bits) + zero_offset).to(work)  # [groups, out]
    scales = scales.to(work)  # [groups, out]
    n_in, n_out = q.shape
    if g_idx is None:
        groups = scales.shape[0]
        w = (q.view(groups, n_in // groups, n_out).to(work) - zeros.unsqueeze(1)) * scales.unsqueeze(1)
        w = w.view(n_in, n_out)
    else:
        g = g_idx.to(torch.long)
        w = (q.to(work) - zeros.index_select(0, g)) * scales.index_select(0, g)  # [in, out]
    return w.t() if work == dtype else w.t().to(dtype)


def quantize_gptq_reference(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int = 4,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """Pack known integers into GPTQ checkpoint tensors (used by tests and by the benchmark).

    q: ints [out, in] in [0, 2**bits); zeros: real zero points [groups, out]; scales [groups, out];
    g_idx [in]. Returns {"qweight", "qzeros", "scales", "g_idx"} in the checkpoint layout.
    """
    stored_zeros = zeros - (1 if checkpoint_format == "gptq" else 0)
    return {
        "qweight": pack_rows(q.t().contiguous(), bits),  # [in / p, out]
        "qzeros": pack_cols(stored_zeros & ((1 << bits) - 1), bits),  # [groups, out / p]
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


# --- bitsandbytes NF4 / int8 -------------------------------------------------------------------------


# Where bitsandbytes (on AVX512-bf16 CPUs) and the `kernels` package it asks say that the fused CPU NF4
# kernel could not be fetched from the hub: two warnings per import, several lines when offline.
HUB_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
HUB_KERNEL_NOTE = ("note: bitsandbytes' fused CPU NF4 kernel (a download from the kernels-community hub) is "
                   "unavailable; NF4 runs on bitsandbytes' built-in kernels")


class _HubKernelNote(logging.Filter):
    """Replaces those warnings by one line of ours (HUB_KERNEL_NOTE), said once per process."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "kernels-community" not in message and "publisher trust" not in message:
            return True
        if not _HubKernelNote.said:
            _HubKernelNote.said = True
            print(f"specexec: {HUB_KERNEL_NOTE}", file=sys.stderr, flush=True)
        return False


def install_hub_kernel_note() -> None:
    """Put the _HubKernelNote filter on the loggers that warn about the hub kernel (idempotent); done
    before bitsandbytes is first imported, by the CLI at start and by every NF4 / int8 path."""
    for name in HUB_KERNEL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HubKernelNote) for f in logger.filters):
            logger.addFilter(_HubKernelNote())


def _bnb_functional():
    install_hub_kernel_note()
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise SpecexecError("--quant nf4/int8 needs bitsandbytes (pip install bitsandbytes)") from exc
    return bnbf


def nf4_nbytes(numel: int, blocksize: int = NF4_BLOCKSIZE) -> tuple[int, int]:
    """Bytes of (packed codes, fp32 absmax) for an NF4 tensor of `numel` elements."""
    return (numel + 1) // 2, -(-numel // blocksize) * 4


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> dict[str, torch.Tensor]:
    """Dense weight (any shape) -> {"packed": uint8 [ceil(n/2), 1], "absmax": fp32 [ceil(n/blocksize)]}."""
    bnbf = _bnb_functional()
    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=False
    )
    return {"packed": packed, "absmax": state.absmax.to(torch.float32)}


_NF4_CODES: dict[torch.device, torch.Tensor] = {}


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    blocksize: int = NF4_BLOCKSIZE,
) -> torch.Tensor:
    """NF4 codes + per-block absmax -> dense weight of `shape` in `dtype`, on the codes' device."""
    bnbf = _bnb_functional()
    device = packed.device
    code = _NF4_CODES.get(device)
    if code is None:
        code = _NF4_CODES[device] = bnbf.get_4bit_type("nf4", device=device)
    state = bnbf.QuantState(
        absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize, quant_type="nf4", dtype=dtype
    )
    return bnbf.dequantize_4bit(packed, state)


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense weight [..., in] -> {"cb": int8 [rows, in], "scb": fp32 [rows]} (row-wise absmax / 127)."""
    bnbf = _bnb_functional()
    cb, scb, _ = bnbf.int8_vectorwise_quant(weight.reshape(-1, weight.shape[-1]).contiguous())
    return {"cb": cb, "scb": scb.to(torch.float32)}


def dequantize_int8(
    cb: torch.Tensor, scb: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Row-wise int8 -> dense weight of `shape` in `dtype`."""
    bnbf = _bnb_functional()
    return bnbf.int8_vectorwise_dequant(cb, scb).to(dtype).view(shape)
