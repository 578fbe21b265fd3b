"""GPTQ dequantization fused into one Triton kernel: unpack, (q - zero) * scale, write the compute dtype.

Importing this module imports triton; `gptq_dispatch` does so lazily and only for CUDA tensors, so a
CPU-only install never needs it. The pure-torch `quant.dequantize_gptq` is the reference this kernel
matches bit for bit. The arithmetic both follow (the "exactness contract"):

  d = q - zero                     integers (|d| <= 256 for 8 bits), exact
  w = float32(d) * float32(scale)  one IEEE float32 multiply, round to nearest even
  out = round_to_dtype(w)          one conversion to the output dtype, round to nearest even

For the usual scales (float16 or bfloat16) with at most 8 bits, float32(d) * float32(scale) has at most
9 + 11 significant bits, so the float32 product is exact and `out` is the correctly rounded true value:
the same bits as the reference's multiply in the output dtype when that is the scales' dtype. For
float32 scales both round twice in the same order (float32 product, then the output dtype).

Rounding to bfloat16 is done with integer ops (add 0x7FFF plus the lowest kept bit, drop 16 bits) rather
than a float cast, so the kernel rounds the same way on a GPU and under the Triton interpreter (whose
float32 -> bfloat16 cast truncates). Float16 uses the ordinary cast (round to nearest even in both).

Both groupings are handled: the trivial one (row i in group i // group_size) and act-order
(`desc_act`), where `g_idx[i]` names row i's group and each program gathers its rows' zeros and scales
through it, so the weight comes out in the checkpoint's own row order and the activations need no
permutation. Supported: 2, 4, 8 bits; output float16, bfloat16, float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BITS = (2, 4, 8)
OUT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_ROWS = 64  # unpacked input rows per program (BLOCK_W words of 32 / bits values)
BLOCK_N = 128  # output columns per program


@triton.jit
def _dequant_kernel(
    qweight_ptr,  # int32 [n_in / P, n_out]
    qzeros_ptr,  # int32 [groups, n_out / P]
    scales_ptr,  # fp16 / bf16 / fp32 [groups, n_out]
    g_idx_ptr,  # int32 [n_in]: the group of each input row (act-order); unused unless HAS_G_IDX
    out_ptr,  # [n_in, n_out] in the output dtype
    n_in,
    n_out,
    zero_cols,  # n_out / P: the row stride of qzeros
    group_size,
    zero_offset,
    BITS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_GROUP: tl.constexpr,  # every program's rows lie in one group (group_size % (BLOCK_W * P) == 0)
    HAS_G_IDX: tl.constexpr,  # rows are grouped by g_idx (act-order), not by row // group_size
    OUT_KIND: tl.constexpr,  # 0 float32, 1 float16, 2 bfloat16
):
    P: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BLOCK_R: tl.constexpr = BLOCK_W * P
    pid_w = tl.program_id(0)
    pid_n = tl.program_id(1)
    words = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW] packed rows
    rows = pid_w * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] unpacked rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < n_out
    packed = tl.load(
        qweight_ptr + words[:, None] * n_out + cols[None, :],
        mask=(words[:, None] < n_in // P) & col_ok[None, :],
        other=0,
    )  # [BW, BN] int32
    shifts = tl.arange(0, P) * BITS  # [P]
    q = (packed[:, None, :] >> shifts[None, :, None]) & MASK  # [BW, P, BN]: low bits first
    q = tl.reshape(q, (BLOCK_R, BLOCK_N))  # [BR, BN]: row r is value r % P of word r // P
    zero_shift = (cols % P) * BITS  # [BN]
    if ONE_GROUP:
        g = (pid_w * BLOCK_R) // group_size
        zword = tl.load(qzeros_ptr + g * zero_cols + cols // P, mask=col_ok, other=0)  # [BN]
        zero = ((zword >> zero_shift) & MASK) + zero_offset  # [BN]
        scale = tl.load(scales_ptr + g * n_out + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BN]
        w = (q - zero[None, :]).to(tl.float32) * scale[None, :]  # [BR, BN]
    else:
        row_ok = rows < n_in
        if HAS_G_IDX:
            g = tl.load(g_idx_ptr + rows, mask=row_ok, other=0)  # [BR]
        else:
            g = rows // group_size  # [BR]
        ok = row_ok[:, None] & col_ok[None, :]
        zword = tl.load(qzeros_ptr + g[:, None] * zero_cols + (cols // P)[None, :], mask=ok, other=0)
        zero = ((zword >> zero_shift[None, :]) & MASK) + zero_offset  # [BR, BN]
        scale = tl.load(scales_ptr + g[:, None] * n_out + cols[None, :], mask=ok, other=0.0)
        w = (q - zero).to(tl.float32) * scale.to(tl.float32)  # [BR, BN]
    if OUT_KIND == 2:  # float32 -> bfloat16, round to nearest even, in integers
        raw = w.to(tl.uint32, bitcast=True)
        raw = raw + 0x7FFF + ((raw >> 16) & 1)
        out = (raw >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT_KIND == 1:
        out = w.to(tl.float16)
    else:
        out = w
    offsets = rows.to(tl.int64)[:, None] * n_out + cols[None, :]  # [BR, BN]
    tl.store(out_ptr + offsets, out, mask=(rows[:, None] < n_in) & col_ok[None, :])


def supports(bits: int, scales_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the kernel handles this bit width, scale dtype and output dtype."""
    return bits in BITS and scales_dtype in SCALE_DTYPES and dtype in OUT_DTYPES


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    zero_offset: int,
    dtype: torch.dtype,
    g_idx: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ tensors -> dense weight [out, in] in `dtype` (a transposed view, like
    `quant.dequantize_gptq`); one kernel launch on the current stream. `out`: a contiguous [in, out]
    buffer of `dtype` on the same device to write into (the offload engine's reused scratch, which its
    memory plan counts); None allocates one.

    qweight int32 [in / p, out], qzeros int32 [groups, out / p], scales [groups, out], p = 32 / bits;
    g_idx int [in] for act-order checkpoints (None: row i is in group i // (in / groups)).
    """
    if not supports(bits, scales.dtype, dtype):
        raise ValueError(f"no Triton GPTQ kernel for {bits} bits, {scales.dtype} scales -> {dtype}")
    p = 32 // bits
    n_words, n_out = qweight.shape
    n_in = n_words * p
    groups = scales.shape[0]
    if n_in % groups or tuple(scales.shape) != (groups, n_out) or tuple(qzeros.shape) != (groups, n_out // p):
        raise ValueError(
            f"GPTQ shapes do not agree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} at {bits} bits"
        )
    if g_idx is not None and tuple(g_idx.shape) != (n_in,):
        raise ValueError(f"GPTQ g_idx has shape {tuple(g_idx.shape)}, the weight has {n_in} input rows")
    group_size = n_in // groups
    if out is None:
        out = torch.empty(n_in, n_out, dtype=dtype, device=qweight.device)  # [in, out]
    elif out.shape != (n_in, n_out) or out.dtype != dtype or not out.is_contiguous() or (
            out.device != qweight.device):
        raise ValueError(f"out must be a contiguous [{n_in}, {n_out}] {dtype} tensor on {qweight.device}")
    block_w = BLOCK_ROWS // p
    grid = (triton.cdiv(n_words, block_w), triton.cdiv(n_out, BLOCK_N))
    _dequant_kernel[grid](
        qweight.contiguous(),
        qzeros.contiguous(),
        scales.contiguous(),
        qweight if g_idx is None else g_idx.to(torch.int32).contiguous(),  # any pointer when unused
        out,
        n_in,
        n_out,
        qzeros.shape[1],
        group_size,
        zero_offset,
        BITS=bits,
        BLOCK_W=block_w,
        BLOCK_N=BLOCK_N,
        ONE_GROUP=g_idx is None and group_size % BLOCK_ROWS == 0,
        HAS_G_IDX=g_idx is not None,
        OUT_KIND=OUT_DTYPES[dtype],
    )
    return out.t()
