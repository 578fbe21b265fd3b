"""Which 4-bit (or 2/8-bit) format a checkpoint folder holds, and its tensors turned into GPTQ's.

The format comes from the folder: `config.json`'s `quantization_config`, else `quantize_config.json`
(older AutoGPTQ repos). Supported, all integer weights with per-group scales and zero points:

  format                 quant_method         tensors of one linear (checkpoint layout)
  GPTQ (AutoGPTQ,        "gptq"               qweight int32 [in/p, out] (packed along in),
   GPTQModel, TheBloke,                       qzeros int32 [groups, out/p], scales [groups, out], g_idx
   hugging-quants)                            v1 ("gptq") stores zero - 1, v2 ("gptq_v2") the zero
  AWQ GEMM (AutoAWQ)     "awq"                qweight int32 [in, out/8], qzeros [groups, out/8], both
                                              packed along out in the order 0 2 4 6 1 3 5 7; scales
  compressed-tensors     "compressed-tensors" weight_packed int32 [out, in/p], weight_scale [out, groups],
   pack-quantized W4A16                       weight_zero_point int32 [out/p, groups] (asymmetric only),
   (llm-compressor)                           weight_g_idx; ints stored plus 2**(bits-1)
  auto-round native      "auto-round"         packing_format "auto_round:auto_gptq" (GPTQ v1),
                                              "auto_round" / "auto_round:gptqmodel" (GPTQ v2) or
                                              "auto_round:auto_awq" (AWQ)

p = 32 / bits values per int32, low bits first. Every format dequantizes as
weight[o, i] = (q[i, o] - zero[g(i), o]) * scale[g(i), o], so AWQ and compressed-tensors linears are
repacked once, at load, into GPTQ v2 tensors holding the same integers and scales (exact: only the bit
positions move). The runtime then has one codec (quant.dequantize_gptq, and the Triton kernel on CUDA)
and one memory plan for all of them; GPTQ checkpoints keep their layout and stream from disk in place.

Bits and group size are read per linear from the tensor shapes, so GPTQModel's `dynamic` per-module
bits need no parsing; a width other than 2, 4 or 8 is refused naming the module. Modules left in 16-bit
(`modules_to_not_convert`, compressed-tensors' `ignore`, a quantized or plain lm_head) are found by
their tensor names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specexec_cli.errors import UsageError
from specexec_cli.runtime import quant

BITS = (2, 4, 8)
SUPPORTED = ("GPTQ (v1/v2, 2/4/8 bits, act-order), AWQ GEMM (4 bits), compressed-tensors pack-quantized "
             "(2/4/8-bit int weights), auto-round (auto_gptq, auto_awq, gptqmodel packing)")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of an AWQ word holds column AWQ_ORDER[k] of its 8
AWQ_UNDO = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c sits in nibble AWQ_UNDO[c]


@dataclass(frozen=True)
class QuantFormat:
    """A quantized checkpoint's format, as far as loading it needs."""

    method: str  # quant_method as written: "gptq", "awq", "compressed-tensors", "auto-round"
    packing: str  # tensor layout: "gptq", "awq" or "ct"
    bits: int = 4  # declared bits (per-linear bits come from the shapes)
    group_size: int = 128
    zero_offset: int = 1  # GPTQ packing: 1 for v1 (zero - 1 stored), 0 for v2
    desc_act: bool = False

    @property
    def variant(self) -> str:
        """The registry variant name this format is (`--quant gptq`, `awq` or `w4a16`)."""
        return {"awq": "awq", "ct": "w4a16"}.get(self.packing, "gptq")

    @property
    def label(self) -> str:
        return {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors",
                "auto-round": "auto-round"}.get(self.method, self.method)

    @property
    def reads_in_place(self) -> bool:
        """True when the disk tier can stream the checkpoint's own bytes (GPTQ layout)."""
        return self.packing == "gptq"

    def weight_names(self, prefix: str) -> tuple[str, ...]:
        """Checkpoint tensor names of the quantized linear `prefix` (without the optional g_idx)."""
        if self.packing == "ct":
            return (f"{prefix}.weight_packed", f"{prefix}.weight_scale")
        return (f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales")


def quantization_config_of(directory: str | Path, config: Any = None) -> dict[str, Any] | None:
    """The folder's quantization config dict: config.json's `quantization_config`, else
    `quantize_config.json`; None for an unquantized checkpoint."""
    qc = getattr(config, "quantization_config", None) if config is not None else None
    if qc is None and config is None and (Path(directory) / "config.json").is_file():
        qc = json.loads((Path(directory) / "config.json").read_text()).get("quantization_config")
    if qc is None and (Path(directory) / "quantize_config.json").is_file():
        qc = json.loads((Path(directory) / "quantize_config.json").read_text())
        qc.setdefault("quant_method", "gptq")  # AutoGPTQ wrote no quant_method there
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    return qc


def read_quant_format(directory: str | Path, config: Any = None) -> QuantFormat | None:
    """The QuantFormat of a checkpoint folder (None when it is not quantized); a UsageError naming the
    format and what is supported when it cannot be loaded."""
    qc = quantization_config_of(directory, config)
    return None if qc is None else format_from_dict(qc)


def _bits(qc: dict[str, Any], what: str, key: str = "bits") -> int:
    bits = int(qc.get(key, 4))
    if bits not in BITS:
        raise UsageError(f"{what} with {bits} bits is not supported (supported: 2, 4, 8 bits; {SUPPORTED})")
    return bits


def format_from_dict(qc: dict[str, Any]) -> QuantFormat:
    """Read a quantization config dict; refuse what cannot be loaded, in one line."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        g = quant.gptq_config_from_dict(qc)
        return QuantFormat("gptq", "gptq", g.bits, g.group_size, g.zero_offset, g.desc_act)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise UsageError(f"AWQ version {version!r} is not supported (only GEMM; {SUPPORTED})")
        if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
            raise UsageError(f"AWQ with {qc.get('bits', qc.get('w_bit'))} bits is not supported (only 4)")
        if not qc.get("zero_point", True):
            raise UsageError("AWQ without zero points is not supported (AutoAWQ GEMM with zero_point)")
        return QuantFormat("awq", "awq", 4, int(qc.get("group_size", qc.get("q_group_size", 128))), 0)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method in ("auto-round", "intel/auto-round"):
        return _auto_round(qc)
    known = "gptq, awq, compressed-tensors, auto-round"
    raise UsageError(f"checkpoint is quantized with {method or 'an unnamed method'!r}, which is not "
                     f"supported (supported quant_method: {known})")


def _compressed_tensors(qc: dict[str, Any]) -> QuantFormat:
    fmt = str(qc.get("format", "")).lower()
    groups = qc.get("config_groups") or {}
    formats = {str(g.get("format") or fmt).lower() for g in groups.values()} or {fmt}
    if formats != {"pack-quantized"}:
        fmt = next(iter(formats - {"pack-quantized"}))
        raise UsageError(f"compressed-tensors format {fmt!r} is not supported (only pack-quantized int "
                         f"weights, W4A16 and the like)")
    bits, group_size = 4, 128
    for name, group in groups.items():
        w = group.get("weights") or {}
        if group.get("input_activations"):
            raise UsageError(f"compressed-tensors group {name}: quantized activations are not supported "
                             f"(weight-only pack-quantized)")
        if str(w.get("type", "int")) != "int":
            raise UsageError(f"compressed-tensors group {name}: {w.get('type')} weights are not supported")
        bits = _bits(w, f"compressed-tensors group {name}", "num_bits")
        strategy = str(w.get("strategy", "group"))
        if strategy not in ("group", "channel"):
            raise UsageError(f"compressed-tensors strategy {strategy!r} is not supported (group, channel)")
        group_size = int(w.get("group_size") or -1) if strategy == "group" else -1
    return QuantFormat("compressed-tensors", "ct", bits, group_size, 0)


def _auto_round(qc: dict[str, Any]) -> QuantFormat:
    packing = str(qc.get("packing_format", "auto_round:auto_gptq")).lower()
    if str(qc.get("data_type", "int")) != "int":
        raise UsageError(f"auto-round data_type {qc.get('data_type')!r} is not supported (int weights)")
    bits = _bits(qc, "auto-round")
    group_size = int(qc.get("group_size", 128))
    if packing == "auto_round:auto_gptq":
        return QuantFormat("auto-round", "gptq", bits, group_size, 1)
    if packing in ("auto_round", "auto_round:gptqmodel"):
        return QuantFormat("auto-round", "gptq", bits, group_size, 0)
    if packing == "auto_round:auto_awq":
        if bits != 4:
            raise UsageError(f"auto-round AWQ packing with {bits} bits is not supported (only 4)")
        return QuantFormat("auto-round", "awq", 4, group_size, 0)
    raise UsageError(f"auto-round packing_format {packing!r} is not supported (auto_round:auto_gptq, "
                     f"auto_round:auto_awq, auto_round:gptqmodel)")


# --- one linear -> GPTQ tensors ----------------------------------------------------------------------


def linear_bits(fmt: QuantFormat, shapes: dict[str, tuple[int, ...]], n_in: int, prefix: str) -> int:
    """Bits of the quantized linear `prefix` from its packed tensor's shape ([out, in] has `n_in` inputs)."""
    packed = shapes["weight_packed"][1] if fmt.packing == "ct" else shapes["qweight"][0]
    if fmt.packing == "awq":
        bits = 32 * shapes["qweight"][1] // max(shapes["scales"][1], 1)
    else:
        bits = 32 * packed // max(n_in, 1)
    if bits not in BITS or (fmt.packing != "awq" and packed * 32 != bits * n_in):
        raise UsageError(f"{prefix}: {fmt.label} weight of {bits if bits else '?'} bits per value is not "
                         f"supported ({SUPPORTED})")
    return bits


def to_gptq(fmt: QuantFormat, tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """One linear's checkpoint tensors (names without the module prefix) -> GPTQ v2 tensors
    {"qweight" [in/p, out], "qzeros" [groups, out/p], "scales" [groups, out], optional "g_idx" [in]}
    holding the same integers and scales (zero_offset 0). GPTQ tensors pass through unchanged."""
    if fmt.packing == "gptq":
        return {k: tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx") if k in tensors}
    if fmt.packing == "awq":
        undo = torch.tensor(AWQ_UNDO)
        q = quant.unpack_cols(tensors["qweight"], 4)  # [in, out] in AWQ's nibble order
        z = quant.unpack_cols(tensors["qzeros"], 4)  # [groups, out]
        cols = (torch.arange(q.shape[1]) // 8) * 8 + undo.repeat(q.shape[1] // 8)
        q, z = q[:, cols], z[:, cols]
        return {"qweight": quant.pack_rows(q, 4), "qzeros": quant.pack_cols(z, 4),
                "scales": tensors["scales"]}
    # compressed-tensors: [out, ...] layouts, ints stored plus 2**(bits-1)
    q = quant.unpack_cols(tensors["weight_packed"], bits).t()  # [in, out]
    scales = tensors["weight_scale"].t().contiguous()  # [groups, out]
    if "weight_zero_point" in tensors:
        z = quant.unpack_rows(tensors["weight_zero_point"], bits)[: scales.shape[1]].t()  # [groups, out]
    else:  # symmetric: zero point 0, stored as 2**(bits-1)
        z = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int32)
    out = {"qweight": quant.pack_rows(q.contiguous(), bits), "qzeros": quant.pack_cols(z.contiguous(), bits),
           "scales": scales}
    if "weight_g_idx" in tensors:
        out["g_idx"] = tensors["weight_g_idx"].to(torch.int32)
    return out


def gptq_shapes(fmt: QuantFormat, shapes: dict[str, tuple[int, ...]], n_out: int, n_in: int,
                bits: int) -> dict[str, tuple[int, ...]]:
    """Shapes of `to_gptq`'s tensors for a linear [n_out, n_in] (without g_idx)."""
    if fmt.packing == "gptq":
        return {k: shapes[k] for k in ("qweight", "qzeros", "scales")}
    p = 32 // bits
    groups = shapes["scales"][0] if fmt.packing == "awq" else shapes["weight_scale"][1]
    return {"qweight": (n_in // p, n_out), "qzeros": (groups, n_out // p), "scales": (groups, n_out)}


def zero_offset(fmt: QuantFormat) -> int:
    """What to add to a stored zero of the GPTQ tensors `to_gptq` gives."""
    return fmt.zero_offset if fmt.packing == "gptq" else 0


def dense_weight(fmt: QuantFormat, tensors: dict[str, torch.Tensor], n_in: int, dtype: torch.dtype,
                 prefix: str = "") -> torch.Tensor:
    """One quantized linear dequantized to a dense [out, in] weight in `dtype` (e.g. a quantized lm_head,
    expanded once at load)."""
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    bits = linear_bits(fmt, shapes, n_in, prefix)
    t = to_gptq(fmt, tensors, bits)
    g_idx = t.get("g_idx")
    group_size = n_in // t["scales"].shape[0]
    if g_idx is not None and quant.gptq_is_trivial_g_idx(g_idx, group_size):
        g_idx = None
    return quant.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], g_idx, bits, zero_offset(fmt),
                                 dtype).contiguous()
