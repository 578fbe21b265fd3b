"""How one decoder layer is laid out as a single contiguous byte buffer, and how its parameters are
rebuilt from views into that buffer.

A layer buffer holds *stored tensors* (raw 16/32-bit weights, GPTQ qweight/qzeros/scales/g_idx,
NF4 codes and absmax, int8 rows and scales) at aligned byte offsets. Every module parameter of the
layer has a *recipe*: which stored tensors it comes from and with which codec. Raw weights in the
compute dtype become zero-copy views; everything else is decoded on the device just before the
layer runs (GPTQ through `gptq_dispatch`: one fused Triton kernel on CUDA, plain torch elsewhere).
Mixtral-style fused expert parameters ([experts, out, in]) are stacks of per-expert weights, each of
which may itself be raw or quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specexec_cli.runtime import gptq_dispatch, quant

ALIGN = 256  # byte alignment of every stored tensor inside a layer buffer


def align(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class StoredTensor:
    """One tensor inside a layer buffer."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the layer buffer
    nbytes: int


@dataclass(frozen=True)
class WeightSpec:
    """One dense weight rebuilt from stored tensors.

    codec: "raw" (keys: w), "gptq" (qweight, qzeros, scales[, g_idx]), "nf4" (packed, absmax),
    "int8" (cb, scb). shape is the decoded shape; args carry codec parameters
    (gptq: bits, zero_offset; nf4: blocksize).
    """

    codec: str
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    args: tuple[int, ...] = ()


@dataclass(frozen=True)
class ParamRecipe:
    """A module parameter of the layer (`name` relative to the layer) and how to build it.

    Not stacked: the parameter is parts[0][0]. Stacked (fused experts): parameter[e] is the
    concatenation along dim 0 of the weights in parts[e].
    """

    name: str
    shape: tuple[int, ...]
    parts: tuple[tuple[WeightSpec, ...], ...]
    stacked: bool = False


@dataclass
class LayerLayout:
    """Stored tensors of one layer and the recipes of its parameters."""

    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    recipes: list[ParamRecipe] = field(default_factory=list)
    nbytes: int = 0

    def add(
        self, key: str, dtype: torch.dtype, shape: tuple[int, ...], offset: int | None = None
    ) -> StoredTensor:
        """Place a tensor at `offset` (default: the next aligned offset after everything so far)."""
        nbytes = dtype_bytes(dtype) * _numel(shape)
        if offset is None:
            offset = align(self.nbytes)
        t = StoredTensor(key, dtype, tuple(shape), offset, nbytes)
        self.tensors[key] = t
        self.nbytes = max(self.nbytes, offset + nbytes)
        return t

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of the uint8 buffer `buf` [>= nbytes], one per stored tensor (no copies)."""
        out = {}
        for key, t in self.tensors.items():
            out[key] = buf[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape)
        return out

    def pack(self, tensors: dict[str, torch.Tensor], buf: torch.Tensor) -> None:
        """Copy host tensors (same keys, dtypes and shapes as the layout) into the buffer."""
        views = self.views(buf)
        for key, t in self.tensors.items():
            src = tensors[key]
            if src.dtype != t.dtype or tuple(src.shape) != t.shape:
                raise ValueError(
                    f"{key}: got {src.dtype} {tuple(src.shape)}, layout says {t.dtype} {t.shape}"
                )
            views[key].copy_(src)

    def expanded_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the layer with every parameter decoded once into `dtype` (plan.py's expanded layers)."""
        return sum(_numel(r.shape) * dtype_bytes(dtype) for r in self.recipes)

    def decoded_bytes(self, dtype: torch.dtype) -> int:
        """Device scratch for the parameters that are not zero-copy views (decoded each forward), plus
        the transient workspace of the largest GPTQ dequantization (quant.dequantize_gptq: 1-2 bytes per
        weight of unpacked integers; with an act-order g_idx also the gathered zeros and scales)."""
        total, workspace = 0, 0
        for r in self.recipes:
            if not is_view(r, self, dtype):
                total += _numel(r.shape) * dtype_bytes(dtype)
            for part in r.parts:
                for spec in part:
                    if spec.codec == "gptq":
                        per_weight = 2 + (1 + 4 if len(spec.keys) > 3 else 0)  # g_idx: gathers
                        workspace = max(workspace, _numel(spec.shape) * per_weight)
        return total + workspace


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def is_view(recipe: ParamRecipe, layout: LayerLayout, dtype: torch.dtype) -> bool:
    """True when the parameter is a plain view of the buffer (raw, already in the compute dtype)."""
    if recipe.stacked:
        return False
    spec = recipe.parts[0][0]
    return spec.codec == "raw" and layout.tensors[spec.keys[0]].dtype == dtype


def is_upcast(recipe: ParamRecipe, layout: LayerLayout, dtype: torch.dtype) -> bool:
    """True when the parameter is one raw float weight stored narrower than `dtype` (a plain upcast)."""
    if recipe.stacked or recipe.parts[0][0].codec != "raw":
        return False
    stored = layout.tensors[recipe.parts[0][0].keys[0]].dtype
    return stored.is_floating_point and stored != dtype and dtype_bytes(stored) < dtype_bytes(dtype)


def is_dequantized(recipe: ParamRecipe) -> bool:
    """True when the parameter is one GPTQ weight (dequantized per call, into reused scratch)."""
    return not recipe.stacked and recipe.parts[0][0].codec == "gptq"


def decode_weight(spec: WeightSpec, views: dict[str, torch.Tensor], dtype: torch.dtype,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Build one dense weight on the views' device (a GPTQ weight into `out` [in, out] when given)."""
    t = [views[k] for k in spec.keys]
    if spec.codec == "raw":
        w = t[0]
        return w if w.dtype == dtype else w.to(dtype)
    if spec.codec == "gptq":
        bits, zero_offset = spec.args
        g_idx = t[3] if len(t) > 3 else None
        return gptq_dispatch.dequantize_gptq(t[0], t[1], t[2], g_idx, bits, zero_offset, dtype, out)
    if spec.codec == "nf4":
        (blocksize,) = spec.args
        return quant.dequantize_nf4(t[0], t[1], spec.shape, dtype, blocksize)
    if spec.codec == "int8":
        return quant.dequantize_int8(t[0], t[1], spec.shape, dtype)
    raise ValueError(f"unknown codec {spec.codec!r}")


def build_param(recipe: ParamRecipe, views: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The parameter `recipe.name` in `dtype` on the views' device."""
    if not recipe.stacked:
        return decode_weight(recipe.parts[0][0], views, dtype)
    first = views[recipe.parts[0][0].keys[0]]
    out = torch.empty(recipe.shape, dtype=dtype, device=first.device)  # [experts, rows, cols]
    for e, group in enumerate(recipe.parts):
        row = 0
        for spec in group:
            w = decode_weight(spec, views, dtype)
            out[e, row : row + w.shape[0]].copy_(w)
            row += w.shape[0]
    return out
