"""Quantized checkpoints made by their real producers, and the producers' own dequantization.

auto-round (a pure-python wheel) writes GPTQ (`auto_gptq`), AWQ (`auto_awq`), its native format
(`auto_round`: GPTQ packing when symmetric, AWQ packing when not) and compressed-tensors
pack-quantized (`llm_compressor`, packed by compressed-tensors' own `compress_module`). Round-to-nearest
(`iters=0, disable_opt_rtn=True`) needs no calibration data, so nothing is downloaded.

The references are the producers' code: AWQ's `dequantize_gemm` (auto-round's AWQ export), GPTQ's
torch `QuantLinear` from auto-round's extension (its trivial-group path: the g_idx branch mishandles
in != out features), compressed-tensors' `PackedQuantizationCompressor.decompress`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMATS = ("auto_gptq", "auto_awq", "auto_round", "llm_compressor")


def quantize(model: torch.nn.Module, tokenizer, out: Path, fmt: str, sym: bool, bits: int = 4,
             group_size: int = 128, layer_config: dict | None = None) -> Path:
    """Quantize `model` (float32, modified in place) with auto-round and save it as `fmt` under `out`;
    returns the checkpoint folder. `layer_config`: per-module overrides ({name: {"bits": 8}})."""
    from auto_round import AutoRound

    rounder = AutoRound(model, tokenizer, bits=bits, group_size=group_size, sym=sym, iters=0,
                        disable_opt_rtn=True, layer_config=layer_config)
    rounder.quantize_and_save(str(out), format=fmt)
    folders = [p.parent for p in out.rglob("config.json")]
    assert len(folders) == 1, folders
    return folders[0]


def quant_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def awq_reference(tensors: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> the producer's float16 weight [out, in]."""
    from auto_round.export.export_to_awq.utils import dequantize_gemm

    return dequantize_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, group_size).t()


def gptq_reference(tensors: dict[str, torch.Tensor], bits: int, group_size: int, n_in: int) -> torch.Tensor:
    """GPTQ v1 tensors (zero - 1 stored) -> the producer's float16 weight [out, in], by running its torch
    QuantLinear on the identity (one nonzero product per output: exact)."""
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    n_out = tensors["scales"].shape[1]
    layer = QuantLinear(bits, group_size, n_in, n_out, bias=False)
    layer.qweight.copy_(tensors["qweight"])
    layer.qzeros.copy_(tensors["qzeros"])
    layer.scales.copy_(tensors["scales"].to(layer.scales.dtype))
    if hasattr(layer, "g_idx"):
        del layer.g_idx  # the trivial-group path
    layer.post_init()
    with torch.no_grad():
        return layer(torch.eye(n_in, dtype=torch.float16)).t()


def compressed_tensors_reference(tensors: dict[str, torch.Tensor], qc: dict) -> torch.Tensor:
    """pack-quantized tensors -> compressed-tensors' own decompressed weight [out, in] (scale dtype)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = next(iter(qc["config_groups"].values()))
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]
