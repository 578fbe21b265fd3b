"""Load a transformers causal LM as an offloaded target: read the checkpoint's layout, plan the memory
(runtime/plan.py), load the resident parts and build the streaming engine (runtime/offload.py)."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.fsutil import expand_user
from specexec_cli.runtime import caps, int8_cpu
from specexec_cli.runtime import plan as planner
from specexec_cli.runtime.disk import BlobWriter, CheckpointIndex, FileReader, ReadOp
from specexec_cli.runtime.embedding import UpcastEmbedding, input_embedding_name, is_tied
from specexec_cli.runtime.layout import dtype_bytes
from specexec_cli.runtime.loader import (
    FLOAT_QUANTS,
    PACKED_QUANTS,
    QUANTS,
    LayerBuilder,
    LayerSource,
    ParamRef,
    WeightRef,
    checkpoint_param_refs,
    empty_skeleton,
    find_layers,
    is_quantized_linear,
)
from specexec_cli.runtime.offload import BoundLayer, OffloadEngine
from specexec_cli.runtime.pinned import PinnedPool
from specexec_cli.runtime.qformat import QuantFormat, dense_weight, read_quant_format

log = logging.getLogger(__name__)


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | str | None, quant: str | None
) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device} was asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if isinstance(dtype, str):
        names = {
            "fp16": "float16",
            "bf16": "bfloat16",
            "fp32": "float32",
            "fp64": "float64",
            "half": "float16",
        }
        dtype = getattr(torch, names.get(dtype, dtype), None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError("dtype must be one of float16, bfloat16, float32, float64")
    if quant in FLOAT_QUANTS:
        if dtype is not None and dtype != FLOAT_QUANTS[quant]:
            raise UsageError(
                f"--quant {quant} computes in {FLOAT_QUANTS[quant]}, but dtype {dtype} was given"
            )
        dtype = FLOAT_QUANTS[quant]
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub repo id resolved through the local hub cache / download."""
    path = expand_user(name)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as exc:
        raise SpecexecError(
            f"cannot find model {name!r}: not a directory, and the hub lookup failed ({exc})"
        ) from exc


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _model_facts(model: nn.Module, sources: list[LayerSource], dtype: torch.dtype, prefix: str, direct: bool,
                 narrow: dict[str, torch.dtype]):
    cfg = model.config
    seen, resident = set(), 0
    for name, p in model.named_parameters():
        if not name.startswith(prefix + ".") and id(p) not in seen:
            seen.add(id(p))
            resident += p.numel() * dtype_bytes(narrow.get(name, dtype))
    total = sum(s.layout.nbytes for s in sources)
    return planner.ModelFacts(
        n_layers=len(sources),
        layer_bytes=max(s.layout.nbytes for s in sources),
        total_layer_bytes=total,
        resident_bytes=resident,
        kv_bytes_per_token=kv_bytes_per_token(cfg, dtype),
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        * getattr(cfg, "num_experts_per_tok", 1),
        dtype_bytes=dtype_bytes(dtype),
        decode_bytes=max(s.layout.decoded_bytes(dtype) for s in sources),
        disk_cache_bytes=0 if direct else total,
        expand_bytes=max(0, max(s.layout.expanded_bytes(dtype) - s.layout.nbytes for s in sources)),
    )


@dataclass
class _Prepared:
    """Everything decided before any weight is read: the skeleton, the layer layouts and the plan."""

    model: nn.Module
    index: CheckpointIndex | None
    prefix: str
    layer_list: nn.ModuleList
    sources: list[LayerSource]
    device: torch.device
    dtype: torch.dtype
    quant: str
    plan: planner.Plan
    narrow: dict[str, torch.dtype]  # resident tensors kept in the checkpoint's narrower dtype
    qfmt: QuantFormat | None = None  # the checkpoint's quantized format
    facts: planner.ModelFacts | None = None  # what the plan was made from, for the chosen tier


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers on its device (e.g. the draft), of any int8 linears'
    packed weights (runtime/int8_cpu.py) and, for a model loaded by this runtime (a 4-bit draft), of the
    layers its offload engine holds on the device, for the memory plan."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    engine = getattr(model, "offload_engine", None)  # an offloaded model: what its engine holds
    held = engine.device_bytes() if engine is not None else 0
    return sum(t.numel() * t.element_size() for t in tensors.values()) + int8_cpu.packed_bytes(model) + held


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """K and V bytes of every layer for one token."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes(dtype)


def _prepare(
    source, device, dtype, offload, quant, buffers, resident_layers, offload_dir, budget, context_len, draft,
    hardware, max_memory,
) -> _Prepared:
    if offload not in planner.OFFLOADS and offload != "auto":
        raise UsageError(f"--offload must be one of none, ram, disk, auto; got {offload!r}")
    if quant is not None and quant not in QUANTS and quant not in FLOAT_QUANTS:
        raise UsageError(f"--quant must be one of {', '.join(QUANTS)}; got {quant!r}")

    index, qfmt = None, None
    if isinstance(source, nn.Module):
        model, config = source, source.config
        if quant in PACKED_QUANTS:
            raise UsageError(f"--quant {quant} needs a quantized checkpoint directory, not a loaded model")
        if dtype is None and quant is None:
            dtype = model.dtype  # keep the loaded model's precision
    else:
        from transformers import AutoConfig

        directory = resolve_checkpoint(source)
        config = AutoConfig.from_pretrained(directory)
        qfmt = read_quant_format(directory, config)
        if qfmt is not None and quant not in (None, qfmt.variant):
            raise UsageError(f"{source} is stored quantized ({qfmt.label}) and loads as it is: "
                             f"drop --quant {quant}")
        if qfmt is None and quant in PACKED_QUANTS:
            raise UsageError(
                f"--quant {quant} needs a {quant.upper()} checkpoint; {source} has no quantization_config"
            )
        quant = qfmt.variant if qfmt is not None else quant
    device, dtype = resolve_device_dtype(device, dtype, quant)
    if quant is None:
        quant = {v: k for k, v in FLOAT_QUANTS.items()}[dtype]
    if not isinstance(source, nn.Module):
        model = empty_skeleton(config, dtype)
        index = CheckpointIndex(directory)
    try:
        prefix, layer_list = find_layers(model)
        narrow = _narrow_resident(model, index, dtype)
        # plan from headers and shapes only (nothing is read yet except GPTQ g_idx)
        disk_root = Path(offload_dir) if offload_dir else Path(tempfile.gettempdir())
        if offload_dir and not disk_root.is_dir():
            raise UsageError(f"--offload-dir {offload_dir}: not a directory")
        hw = hardware or planner.probe_hardware(
            device, str(disk_root if disk_root.exists() else disk_root.parent)
        )
        hw = caps.apply_caps(hw, max_memory or {}, device.type, device.index)
        reserve = 256 << 20
        if device.type == "cuda":
            reserve += int(0.05 * torch.cuda.mem_get_info(device)[1])
        request = planner.PlanRequest(
            offload=offload,
            buffers=buffers,
            resident_layers=resident_layers,
            budget=budget,
            context_len=context_len,
            draft_bytes=model_bytes(draft) if draft is not None else 0,
            draft_kv_bytes_per_token=kv_bytes_per_token(draft.config, draft.dtype)
            if draft is not None
            else 0,
            reserve_bytes=reserve,
        )
        error = None
        for tier in planner.OFFLOADS if offload == "auto" else (offload,):
            # the disk tier reads checkpoint files in place unless layers need converting (nf4/int8,
            # model objects, or weights stored wider than the compute dtype)
            direct = (
                tier == "disk" and index is not None and quant not in ("nf4", "int8")
                and not _stored_wider(index, prefix, dtype) and (qfmt is None or qfmt.reads_in_place)
            )
            sources = _layer_sources(model, layer_list, prefix, index, quant, dtype, qfmt, direct,
                                     keep_narrow=tier != "none")
            facts = _model_facts(model, sources, dtype, prefix, direct, narrow)
            try:
                the_plan = planner.plan(hw, facts, replace(request, offload=tier))
                the_facts = facts
                break
            except SpecexecError as exc:
                error = exc
        else:
            raise error
    except BaseException:
        if index is not None:
            index.close()
        raise
    return _Prepared(model, index, prefix, layer_list, sources, device, dtype, quant, the_plan, narrow, qfmt,
                     the_facts)


def plan_target(source: str | os.PathLike | nn.Module, **options: Any) -> planner.Plan:
    """The memory plan `load_offloaded_target(source, **options)` would follow, without loading any
    weights. Takes the same keyword arguments; raises the same one-line SpecexecError when the run
    cannot fit."""
    call = _LOAD_SIGNATURE.bind(source, **options)
    call.apply_defaults()  # load_offloaded_target's signature holds the defaults for both
    prep = _prepare(*call.args)
    if prep.index is not None:
        prep.index.close()
    return prep.plan


# Room for any plan: target_facts plans against it only to reach the facts the planner would use.
_UNBOUNDED = planner.HardwareFacts(device_mem_free=1 << 60, host_ram_available=1 << 60, disk_free=1 << 60)


def target_facts(source: str | os.PathLike, offload: str, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, quant: str | None = None) -> planner.ModelFacts:
    """The ModelFacts `load_offloaded_target(source, offload=..., quant=...)` plans from in that tier
    (layer bytes as that tier stores them, resident parts, KV per token, what the disk tier converts),
    read from the checkpoint's config and headers without loading weights. With them a caller plans
    every budget, draft and cap itself (runtime.plan.plan) exactly as the loader would."""
    if offload not in planner.OFFLOADS:
        raise UsageError(f"target_facts takes one tier ({', '.join(planner.OFFLOADS)}), not {offload!r}")
    prep = _prepare(source, device, dtype, offload, quant, 2, 0, None, 0, 2048, None, _UNBOUNDED, None)
    if prep.index is not None:
        prep.index.close()
    return prep.facts


def load_offloaded_target(
    source: str | os.PathLike | nn.Module,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    offload: str = "ram",
    quant: str | None = None,
    buffers: int = 2,
    resident_layers: int | None = 0,
    offload_dir: str | os.PathLike | None = None,
    budget: int | None = None,
    context_len: int = 2048,
    draft: nn.Module | None = None,
    hardware: planner.HardwareFacts | None = None,
    max_memory: dict[str, int] | None = None,
) -> nn.Module:
    """Load a causal LM whose decoder layers stream from host RAM or disk; a drop-in for the resident model.

    source: checkpoint directory, hub repo id (safetensors) or a loaded transformers causal LM (its
      layer weights are moved into the offload store and its parameters replaced; do not reuse it).
    device: compute device (default cuda if available, else cpu); dtype: compute dtype (default: the
      --quant's float type; fp16 on CUDA / fp32 on CPU for gptq, nf4, int8; a model object's own).
    offload: "none" (all layers resident on the device), "ram", "disk", or "auto" (first that fits).
    quant: fp16 | bf16 | fp32, gptq (checkpoint must be GPTQ), nf4 | int8 (bitsandbytes, quantized at
      load time); None: gptq for GPTQ checkpoints, else from dtype.
    buffers: ring size (>= 2); resident_layers: first R layers stay on the device (None: as many as fit).
    offload_dir: where the disk tier writes converted layers (nf4/int8 or a model object); default tmp.
    budget, context_len, draft: what else must fit on the device, for the memory plan (budget None:
      the plan picks the largest that fits, `model.offload_engine.plan.budget`).
    hardware: override the probed HardwareFacts (tests).
    max_memory: caps per memory pool ({"cpu": bytes, "cuda:0": bytes, "device": bytes}, see
      runtime/caps.py); the plan uses the smaller of each cap and the probe.
    Streamed layers are stored in the checkpoint's float dtype when it is narrower than the compute
      dtype (e.g. float16 files computed in float32 on a CPU) and upcast on the device per call.
    Raises SpecexecError (one line) before loading any weights when the run cannot fit.
    The engine is `model.offload_engine` (plan, stats, close()). Do not call `.to()` on the model.
    """
    prep = _prepare(
        source, device, dtype, offload, quant, buffers, resident_layers, offload_dir, budget, context_len,
        draft, hardware, max_memory,
    )
    model, index = prep.model, prep.index
    try:
        _load_resident_parts(model, index, prep.prefix, prep.device, prep.dtype, prep.narrow, prep.qfmt)
        engine = _build_engine(
            model, prep.layer_list, prep.sources, index, prep.device, prep.dtype, prep.plan, offload_dir
        )
        if index is not None:
            _load_generation_config(model, index.directory)
    finally:
        if index is not None:
            index.close()
    model.offload_engine = engine
    weakref.finalize(model, engine.close)
    model.eval()
    return model



# plan_target binds its options as load_offloaded_target takes them (captured here: a test that wraps
# load_offloaded_target must not change what plan_target accepts)
_LOAD_SIGNATURE = inspect.signature(load_offloaded_target)


def _stored_wider(index: CheckpointIndex, prefix: str, dtype: torch.dtype) -> bool:
    """True when the checkpoint stores decoder-layer floats wider than `dtype` (reading them in place
    would stream more bytes than the computation needs)."""
    size = dtype_bytes(dtype)
    return any(
        loc.dtype.is_floating_point and dtype_bytes(loc.dtype) > size
        for name, loc in index.locations.items()
        if name.startswith(prefix + ".")
    )


def _layer_sources(
    model, layer_list, prefix, index, quant, dtype, qfmt, direct, keep_narrow=False
) -> list[LayerSource]:
    """Layouts of every decoder layer, from checkpoint headers or from the layers' own tensors.
    keep_narrow: keep checkpoint floats narrower than `dtype` as stored (upcast per call)."""
    sources = []
    builder = LayerBuilder(index, quant, dtype, qfmt, direct=direct, keep_narrow=keep_narrow)
    for i, layer in enumerate(layer_list):
        named = list(layer.named_parameters())
        params = [(n, tuple(p.shape)) for n, p in named]
        if index is not None:
            refs = checkpoint_param_refs(index, f"{prefix}.{i}.", params)
        else:
            refs = [ParamRef(n, tuple(p.shape), [[WeightRef("tensor", tensor=p.data)]]) for n, p in named]
        sources.append(builder.build(refs))
    return sources


def _build_engine(model, layer_list, sources, index, device, dtype, the_plan, offload_dir) -> OffloadEngine:
    """Fill the layer stores the plan asks for (device, host RAM, blob file) and hook the layers."""
    n = len(layer_list)
    streamed = list(range(the_plan.resident_layers, n))
    bound = [BoundLayer(i, layer_list[i], sources[i].layout, dtype) for i in range(n)]
    reader = FileReader()
    pinned = PinnedPool(device.type == "cuda")
    resident, expanded, host, reads = {}, {}, {}, {}
    cleanup, writer = None, None
    try:
        if the_plan.offload == "disk" and streamed and sources[streamed[0]].reads is None:
            cleanup = tempfile.mkdtemp(prefix="specexec-offload-", dir=offload_dir)
            writer = BlobWriter(os.path.join(cleanup, "layers.bin"))
        for i, src in enumerate(sources):
            if i < the_plan.expanded_layers:
                expanded[i] = bound[i].expand(src.materialize(reader).to(device))
            elif i < the_plan.resident_layers:
                resident[i] = src.materialize(reader).to(device)
            elif the_plan.offload == "ram":
                host[i] = src.materialize(reader, out=pinned.empty(src.layout.nbytes))
            elif src.reads is not None:
                reads[i] = src.reads
            else:
                offset = writer.append(src.materialize(reader))
                reads[i] = [ReadOp(writer.path, offset, src.layout.nbytes, 0)]
            src.produce = None  # drop references to the source tensors (a model object's weights)
    except BaseException:
        pinned.close()
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    finally:
        reader.close()
        if writer is not None:
            writer.close()
    return OffloadEngine(
        device=device,
        dtype=dtype,
        layers=bound,
        resident=resident,
        expanded=expanded,
        streamed=streamed,
        host=host,
        reads=reads,
        n_buffers=max(the_plan.buffers, 1),
        plan=the_plan,
        cleanup_dir=cleanup,
        pinned=pinned,
    )


def _narrow_resident(model: nn.Module, index: CheckpointIndex | None,
                     dtype: torch.dtype) -> dict[str, torch.dtype]:
    """{name: stored dtype} of the resident tensors kept as the checkpoint stores them: an input embedding
    that is only gathered (not tied to the LM head) stored in a float narrower than `dtype`
    (runtime/embedding.py)."""
    name = input_embedding_name(model)
    if index is None or name is None or name not in index or is_tied(model):
        return {}
    stored = index.locations[name].dtype
    if stored.is_floating_point and dtype_bytes(stored) < dtype_bytes(dtype):
        return {name: stored}
    return {}


def _load_resident_parts(model: nn.Module, index: CheckpointIndex | None, prefix: str, device, dtype,
                         narrow: dict[str, torch.dtype] | None = None,
                         qfmt: QuantFormat | None = None) -> None:
    """Embeddings, final norm, LM head (and every buffer) onto the device in the compute dtype; the
    tensors in `narrow` in their stored dtype (an input embedding then upcasts the rows it gathers); a
    quantized LM head (GPTQ `lm_head: true`) dequantized once."""
    narrow = narrow or {}
    tied = dict(
        getattr(model, "all_tied_weights_keys", None) or {}
    )  # {target: source}, e.g. lm_head <- embed
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if name.startswith(prefix + ".") or (name in tied and (index is None or name not in index)):
            continue
        if index is None:
            value = p.data
        elif name in index:
            value = index.read(name)
        elif qfmt is not None and name.endswith(".weight") and is_quantized_linear(index, name[:-7]):
            prefix_q = name[: -len(".weight")]
            parts = {k[len(prefix_q) + 1:]: index.read(k) for k in index.locations
                     if k.startswith(prefix_q + ".")}
            value = dense_weight(qfmt, parts, p.shape[1], dtype, prefix_q)
        else:
            raise SpecexecError(f"checkpoint has no tensor {name}")
        if name in narrow:
            embed = model.get_input_embeddings()
            table = value.to(device, narrow[name])
            model.set_input_embeddings(UpcastEmbedding(table, dtype, embed.padding_idx))
            continue
        _set_param(model, name, value.to(device, dtype if value.is_floating_point() else value.dtype))
    for target, source in tied.items():
        if index is None or target not in index:
            src = model.get_parameter(source)
            owner_name, _, attr = target.rpartition(".")
            (model.get_submodule(owner_name) if owner_name else model)._parameters[attr] = src
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[bname] = buf.to(device)


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    if (directory / "generation_config.json").exists():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except Exception as exc:  # a broken generation_config.json should not stop loading
            log.warning("ignoring %s/generation_config.json: %s", directory, exc)
