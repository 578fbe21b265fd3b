"""Describe every target decoder layer as a byte layout plus the means to fill it.

Works from a safetensors checkpoint directory (reading only headers until the bytes are needed) or
from an already loaded transformers model. For each layer it yields a `LayerSource`:
  - `reads` set: the layer's bytes come straight from the checkpoint files (disk tier, no
    conversion: 16-bit weights, GPTQ tensors as published); the layout mirrors the file ranges.
  - `reads` None: the bytes are packed on the host by `produce()` (casts, NF4/int8 quantization
    at load time, fused experts), into RAM buffers or into the disk tier's blob file.

Checkpoint names: a module parameter `model.layers.{i}.<p>` is read from the same name; quantized
linears from `<module>.qweight/qzeros/scales/g_idx` (GPTQ, AWQ, auto-round) or
`<module>.weight_packed/weight_scale/weight_zero_point/weight_g_idx` (compressed-tensors), turned
into GPTQ tensors by `qformat`; Mixtral-style fused expert parameters
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) from per-expert
`block_sparse_moe.experts.{e}.w1/w3/w2` (or `mlp.experts.{e}.gate_proj/up_proj/down_proj`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from specexec_cli.errors import SpecexecError
from specexec_cli.runtime import qformat, quant
from specexec_cli.runtime.disk import CheckpointIndex, FileReader, ReadOp, TensorLocation
from specexec_cli.runtime.layout import LayerLayout, ParamRecipe, WeightSpec, align, dtype_bytes

QUANTS = ("fp16", "bf16", "fp32", "gptq", "awq", "w4a16", "nf4", "int8")
PACKED_QUANTS = ("gptq", "awq", "w4a16")  # read from a quantized checkpoint (runtime/qformat.py)
# fp64 is not offered on the command line; it lets tests stream float64 models exactly
FLOAT_QUANTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
COALESCE_GAP = 64 << 10  # read a gap this small rather than issue a second read


@dataclass
class LayerSource:
    """One decoder layer: its layout, and either file reads or a host producer for its bytes."""

    layout: LayerLayout
    reads: list[ReadOp] | None = None
    produce: Callable[[], dict[str, torch.Tensor]] | None = None

    def materialize(self, reader: FileReader, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's bytes as a host uint8 tensor [layout.nbytes] (written into `out` if given)."""
        buf = torch.empty(self.layout.nbytes, dtype=torch.uint8) if out is None else out[: self.layout.nbytes]
        if self.reads is not None:
            reader.run(self.reads, buf)
        else:
            self.layout.pack(self.produce(), buf)
        return buf


@dataclass
class WeightRef:
    """Where one dense weight comes from: a checkpoint tensor, a GPTQ linear, or a host tensor."""

    kind: str  # "dense" | "quant" | "tensor"
    key: str = ""  # checkpoint name (dense) or module prefix (quant)
    tensor: torch.Tensor | None = None  # kind "tensor": the host tensor itself


@dataclass
class ParamRef:
    name: str
    shape: tuple[int, ...]
    parts: list[list[WeightRef]] = field(default_factory=list)
    stacked: bool = False


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """NF4/int8 quantize matrices (and fused expert stacks), not norms, biases or MoE routers."""
    return len(shape) >= 2 and not name.endswith("gate.weight")


# --- finding the checkpoint tensors of a layer ------------------------------------------------------


def _expert_keys(index: CheckpointIndex, base: str, which: str, n_experts: int) -> list[list[str]]:
    """Per-expert weight prefixes for a fused expert parameter ('gate_up_proj' or 'down_proj')."""
    patterns = [
        ("block_sparse_moe.experts.{e}.", {"gate_up_proj": ["w1", "w3"], "down_proj": ["w2"]}),
        ("mlp.experts.{e}.", {"gate_up_proj": ["w1", "w3"], "down_proj": ["w2"]}),
        ("mlp.experts.{e}.", {"gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}),
    ]
    for moe, names in patterns:
        first = base + moe.format(e=0) + names[which][0]
        if first + ".weight" in index or is_quantized_linear(index, first):
            return [[base + moe.format(e=e) + n for n in names[which]] for e in range(n_experts)]
    raise SpecexecError(f"checkpoint has no per-expert weights for {base}mlp.experts.{which}")


def is_quantized_linear(index: CheckpointIndex, module_prefix: str) -> bool:
    """True when the checkpoint holds `module_prefix` as a quantized linear (any supported format)."""
    return module_prefix + ".qweight" in index or module_prefix + ".weight_packed" in index


def _weight_ref(index: CheckpointIndex, module_prefix: str) -> WeightRef:
    if is_quantized_linear(index, module_prefix):
        return WeightRef("quant", module_prefix)
    if module_prefix + ".weight" in index:
        return WeightRef("dense", module_prefix + ".weight")
    raise SpecexecError(f"checkpoint has no tensor {module_prefix}.weight (nor a quantized one)")


def checkpoint_param_refs(
    index: CheckpointIndex, base: str, params: list[tuple[str, tuple[int, ...]]]
) -> list[ParamRef]:
    """Map each module parameter of the layer under `base` (e.g. 'model.layers.3.') to checkpoint names."""
    refs = []
    for name, shape in params:
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            groups = _expert_keys(index, base, leaf, shape[0])
            refs.append(
                ParamRef(name, shape, [[_weight_ref(index, k) for k in g] for g in groups], stacked=True)
            )
            continue
        candidates = [name, name.replace("mlp.", "block_sparse_moe.", 1)]
        ref = None
        for cand in candidates:
            if base + cand in index:
                ref = WeightRef("dense", base + cand)
                break
            if leaf == "weight" and is_quantized_linear(index, base + cand[: -len(".weight")]):
                ref = WeightRef("quant", base + cand[: -len(".weight")])
                break
        if ref is None:
            raise SpecexecError(f"checkpoint has no tensor for {base}{name}")
        refs.append(ParamRef(name, shape, [[ref]]))
    return refs


# --- building layouts --------------------------------------------------------------------------------


@dataclass
class _Stored:
    """A tensor to place in the layout: where it comes from in the file (direct) or how to make it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    location: TensorLocation | None = None  # direct read
    make: Callable[[], torch.Tensor] | None = None  # host producer


class LayerBuilder:
    """Turns ParamRefs into a LayerSource for one storage mode (quant, compute dtype, direct or packed)."""

    def __init__(
        self,
        index: CheckpointIndex | None,
        quant_name: str,
        dtype: torch.dtype,
        qfmt: qformat.QuantFormat | None,
        direct: bool,
        keep_narrow: bool = False,
    ) -> None:
        self.index = index
        self.quant = quant_name
        self.dtype = dtype
        self.qfmt = qfmt
        self.direct = direct
        self.keep_narrow = keep_narrow  # store checkpoint floats narrower than dtype as they are
        self._g_idx_trivial: dict[str, bool] = {}

    # one dense weight -> stored tensors + spec
    def _dense(self, ref: WeightRef, key: str, shape: tuple[int, ...], out: list[_Stored]) -> WeightSpec:
        if ref.kind == "tensor":
            src = ref.tensor
            dtype = self.dtype if src.is_floating_point() else src.dtype
            out.append(_Stored(key, dtype, shape, make=lambda: src.to(dtype)))
        else:
            loc = self.index.locations[ref.key]
            if tuple(loc.shape) != tuple(shape):
                raise SpecexecError(f"{ref.key}: checkpoint shape {loc.shape}, model expects {shape}")
            if self.direct:
                out.append(_Stored(key, loc.dtype, shape, location=loc))
            else:
                dtype = self.dtype if loc.dtype.is_floating_point else loc.dtype
                if self.keep_narrow and loc.dtype.is_floating_point and (
                    dtype_bytes(loc.dtype) < dtype_bytes(self.dtype)
                ):
                    dtype = loc.dtype  # e.g. float16 files computed in float32: upcast per call
                idx, k = self.index, ref.key
                out.append(_Stored(key, dtype, shape, make=lambda: idx.read(k).to(dtype)))
        return WeightSpec("raw", (key,), shape)

    def _linear(self, ref: WeightRef, key: str, shape: tuple[int, ...], out: list[_Stored]) -> WeightSpec:
        """A quantized linear [out, in]: GPTQ tensors read in place (direct) or made by `qformat.to_gptq`."""
        fmt = self.qfmt
        if fmt is None:
            raise SpecexecError(f"{ref.key} is stored quantized, but the checkpoint has no "
                                f"quantization_config")
        n_out, n_in = shape
        optional = ("weight_zero_point", "weight_g_idx") if fmt.packing == "ct" else ("g_idx",)
        names = [n.rsplit(".", 1)[1] for n in fmt.weight_names(ref.key)]
        names += [n for n in optional if f"{ref.key}.{n}" in self.index]
        locs = {n: self.index.locations[f"{ref.key}.{n}"] for n in names}
        shapes = {n: tuple(loc.shape) for n, loc in locs.items()}
        bits = qformat.linear_bits(fmt, shapes, n_in, ref.key)
        target = qformat.gptq_shapes(fmt, shapes, n_out, n_in, bits)
        got = (target["qweight"][1], target["qweight"][0] * (32 // bits))
        if got != (n_out, n_in):
            raise SpecexecError(f"{ref.key}: {fmt.label} weight is {list(got)}, model expects {list(shape)}")
        stored = ["qweight", "qzeros", "scales"]
        g_name = optional[-1]  # g_idx / weight_g_idx: kept only when it is not the trivial grouping
        if g_name in locs:
            g_key = f"{ref.key}.{g_name}"
            if g_key not in self._g_idx_trivial:
                self._g_idx_trivial[g_key] = quant.gptq_is_trivial_g_idx(
                    self.index.read(g_key), n_in // target["scales"][0]
                )
            if not self._g_idx_trivial[g_key]:
                stored.append("g_idx")
                target["g_idx"] = (n_in,)
        if self.direct and fmt.reads_in_place:
            for n in stored:
                out.append(_Stored(f"{key}.{n}", locs[n].dtype, locs[n].shape, location=locs[n]))
        else:
            idx, prefix, cache = self.index, ref.key, {}
            scale_dtype = locs["weight_scale" if fmt.packing == "ct" else "scales"].dtype

            def part(n: str) -> Callable[[], torch.Tensor]:
                def make() -> torch.Tensor:
                    if n not in cache:  # convert the whole linear once, hand out its tensors one by one
                        cache.update(qformat.to_gptq(fmt, {k: idx.read(f"{prefix}.{k}") for k in locs}, bits))
                    return cache.pop(n)

                return make

            for n in stored:
                dtype = scale_dtype if n == "scales" else torch.int32
                out.append(_Stored(f"{key}.{n}", dtype, target[n], make=part(n)))
        return WeightSpec("gptq", tuple(f"{key}.{n}" for n in stored), tuple(shape),
                          (bits, qformat.zero_offset(fmt)))

    def _quantized(
        self, name: str, shape: tuple[int, ...], dense: Callable[[], torch.Tensor], out: list[_Stored]
    ):
        """NF4 / int8 at load time: stored tensors are produced by quantizing the dense host weight."""
        numel = 1
        for s in shape:
            numel *= s
        cache: dict[str, torch.Tensor] = {}

        def part(k: str) -> Callable[[], torch.Tensor]:
            def make() -> torch.Tensor:
                if k not in cache:
                    w = dense()
                    cache.update(quant.quantize_nf4(w) if self.quant == "nf4" else quant.quantize_int8(w))
                return cache.pop(k)

            return make

        if self.quant == "nf4":
            packed, _ = quant.nf4_nbytes(numel)
            out.append(_Stored(f"{name}.packed", torch.uint8, (packed, 1), make=part("packed")))
            out.append(
                _Stored(
                    f"{name}.absmax", torch.float32, (-(-numel // quant.NF4_BLOCKSIZE),), make=part("absmax")
                )
            )
            return WeightSpec("nf4", (f"{name}.packed", f"{name}.absmax"), shape, (quant.NF4_BLOCKSIZE,))
        rows = numel // shape[-1]
        out.append(_Stored(f"{name}.cb", torch.int8, (rows, shape[-1]), make=part("cb")))
        out.append(_Stored(f"{name}.scb", torch.float32, (rows,), make=part("scb")))
        return WeightSpec("int8", (f"{name}.cb", f"{name}.scb"), shape)

    def _host_dense(self, ref: ParamRef) -> Callable[[], torch.Tensor]:
        """A producer of the full dense parameter on the host (fusing experts), in the compute dtype."""

        def one(w: WeightRef) -> torch.Tensor:
            t = w.tensor if w.kind == "tensor" else self.index.read(w.key)
            return t.to(self.dtype)

        def make() -> torch.Tensor:
            if not ref.stacked:
                return one(ref.parts[0][0])
            return torch.stack([torch.cat([one(w) for w in group], dim=0) for group in ref.parts])

        return make

    def build(self, refs: list[ParamRef]) -> LayerSource:
        stored: list[_Stored] = []
        recipes: list[ParamRecipe] = []
        for ref in refs:
            has_quant = any(w.kind == "quant" for g in ref.parts for w in g)
            if self.quant in ("nf4", "int8") and quantizable(ref.name, ref.shape) and not has_quant:
                spec = self._quantized(ref.name, ref.shape, self._host_dense(ref), stored)
                recipes.append(ParamRecipe(ref.name, ref.shape, ((spec,),)))
            elif ref.stacked and not self.direct and not has_quant:
                # fuse the experts once on the host: the parameter becomes a zero-copy view
                stored.append(_Stored(ref.name, self.dtype, ref.shape, make=self._host_dense(ref)))
                recipes.append(
                    ParamRecipe(ref.name, ref.shape, ((WeightSpec("raw", (ref.name,), ref.shape),),))
                )
            else:
                parts = []
                for e, group in enumerate(ref.parts):
                    specs = []
                    for j, w in enumerate(group):
                        key = ref.name if not ref.stacked else f"{ref.name}.{e}.{j}"
                        shape = ref.shape if not ref.stacked else self._part_shape(w)
                        if w.kind == "quant":
                            specs.append(self._linear(w, key, shape, stored))
                        else:
                            specs.append(self._dense(w, key, shape, stored))
                    parts.append(tuple(specs))
                recipes.append(ParamRecipe(ref.name, ref.shape, tuple(parts), stacked=ref.stacked))
        return self._place(stored, recipes)

    def _part_shape(self, w: WeightRef) -> tuple[int, ...]:
        if w.kind == "quant":
            fmt = self.qfmt
            names = [n.rsplit(".", 1)[1] for n in fmt.weight_names(w.key)]
            shapes = {n: tuple(self.index.locations[f"{w.key}.{n}"].shape) for n in names}
            if fmt.packing == "ct":
                return (shapes["weight_packed"][0], int(self.index.read(w.key + ".weight_shape")[1]))
            if fmt.packing == "awq":
                return (shapes["scales"][1], shapes["qweight"][0])
            return (shapes["qweight"][1], shapes["qweight"][0] * 32 // fmt.bits)
        return tuple(self.index.locations[w.key].shape)

    def _place(self, stored: list[_Stored], recipes: list[ParamRecipe]) -> LayerSource:
        layout = LayerLayout(recipes=recipes)
        if not self.direct:
            makers = {}
            for s in stored:
                layout.add(s.key, s.dtype, s.shape)
                makers[s.key] = s.make
            return LayerSource(layout, produce=lambda: {k: m() for k, m in makers.items()})
        # direct: mirror the file ranges; coalesce neighbours in the same file when alignment allows
        reads: list[ReadOp] = []
        cur: list = []  # [path, file_start, file_end, dst_start]
        for s in sorted(stored, key=lambda s: (s.location.path, s.location.offset)):
            loc = s.location
            gap = loc.offset - cur[2] if cur else -1
            limit = min(COALESCE_GAP, (cur[2] - cur[1]) // 8) if cur else 0  # waste at most 1/8 of a read
            if cur and loc.path == cur[0] and 0 <= gap <= limit and (loc.offset - cur[1]) % 16 == 0:
                cur[2] = max(cur[2], loc.offset + loc.nbytes)
            else:
                if cur:
                    reads.append(ReadOp(cur[0], cur[1], cur[2] - cur[1], cur[3]))
                dst = align(max([r.dst_offset + r.nbytes for r in reads], default=0))
                cur = [loc.path, loc.offset, loc.offset + loc.nbytes, dst]
            layout.add(s.key, s.dtype, s.shape, offset=cur[3] + loc.offset - cur[1])
        if cur:
            reads.append(ReadOp(cur[0], cur[1], cur[2] - cur[1], cur[3]))
        layout.nbytes = align(layout.nbytes)
        return LayerSource(layout, reads=reads)


# --- model skeletons ---------------------------------------------------------------------------------


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of a causal LM and its name prefix (e.g. 'model.layers')."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) == n:
            return name, module
    raise SpecexecError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def empty_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM with every parameter on the meta device (buffers such as RoPE tables are real),
    attending with sdpa (which applies the decoders' 4-D tree mask; flash attention would not)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model
