"""Load a causal LM and its tokenizer from any source, and the checks a draft/target pair needs.

`load_model` accepts a registry alias, a bundled name, a hub id, a local folder or a .gguf file.
GGUF files are converted once into the specexec cache (see `bundled.convert_gguf`). Hub downloads
happen only when HF_HUB_OFFLINE is not set. Also: `check_compatible` (draft and target must share a
vocabulary), `make_early_exit_draft` (a draft made of a model's first layers) and `eos_token_ids`.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import socket
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.models import bundled
from specexec_cli.models.integrity import check_model_folder
from specexec_cli.models.registry import ModelSpec, hub_cache_dir, hub_offline, resolve

HUB_ERRORS_NOT_FOUND = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def gguf_cache_folder(path: Path) -> Path:
    """Cache folder for the conversion of a GGUF file, keyed by its path, size and mtime."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^\w.-]+", "_", path.stem)[:80]
    return bundled.models_cache_dir() / f"gguf-{stem}-{key}"


def gguf_folder(path: Path) -> Path:
    """Converted safetensors folder for a .gguf file, converting it on first use."""
    dest = gguf_cache_folder(path)
    if bundled.is_converted(dest):
        return dest
    bundled.log(f"converting {path.name} to safetensors in {dest} (first use, can take minutes)")
    stat = path.stat()
    source = {"gguf": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        return bundled.convert_gguf(path.parent, path.name, dest, source)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SpecexecError(f"cannot convert GGUF file {path}: {_first_line(exc)}") from exc


def local_source(spec: ModelSpec) -> Path | None:
    """The folder to load `spec` from, converting bundled or GGUF weights first; None for the hub."""
    if spec.kind == "bundled":
        folder = bundled.bundled_folder(spec.name)
    elif spec.kind == "gguf":
        folder = gguf_folder(spec.path)
    elif spec.kind == "local":
        folder = spec.path
    else:
        return None
    check_model_folder(folder)
    return folder


def _from_folder(loader: Any, folder: Path, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise SpecexecError(f"cannot load model from {folder}: {_first_line(exc)}") from exc


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (one quick TCP connect), or None if it can or a proxy is set.

    Saves the minute huggingface_hub spends retrying when there is no network at all.
    """
    if any(os.environ.get(var) for var in PROXY_VARS):
        return None
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc})"
    return None


def _from_hub(loader: Any, hub_id: str, **kwargs: Any) -> Any:
    """Load from the local hub cache; download only if that fails and downloads are allowed."""
    cache_dir = str(hub_cache_dir())
    try:
        return loader.from_pretrained(hub_id, cache_dir=cache_dir, local_files_only=True, **kwargs)
    except OSError as exc:
        local_error = exc
    if hub_offline():
        raise SpecexecError(
            f"model {hub_id} not found locally and the hub is unreachable: HF_HUB_OFFLINE is set "
            f"({_first_line(local_error)})"
        )
    reason = hub_unreachable_reason()
    if reason is not None:
        raise SpecexecError(f"model {hub_id} not found locally and the hub is unreachable: {reason}")
    try:
        return loader.from_pretrained(hub_id, cache_dir=cache_dir, **kwargs)
    except Exception as exc:  # network errors come from several libraries (httpx, huggingface_hub)
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & set(HUB_ERRORS_NOT_FOUND):
            raise SpecexecError(
                f"model {hub_id} is not on the hub or needs a login (huggingface-cli login): "
                f"{_first_line(exc)}"
            ) from exc
        if isinstance(exc, OSError) or "httpx" in type(exc).__module__ or "HTTPError" in names:
            raise SpecexecError(
                f"model {hub_id} not found locally and the hub is unreachable: {_first_line(exc)}"
            ) from exc
        raise


def load_tokenizer(name_or_path: str | ModelSpec) -> Any:
    """The tokenizer of a model, from the same sources as `load_model`."""
    from transformers import AutoTokenizer

    spec = name_or_path if isinstance(name_or_path, ModelSpec) else resolve(name_or_path)
    folder = local_source(spec)
    if folder is not None:
        return _from_folder(AutoTokenizer, folder)
    return _from_hub(AutoTokenizer, spec.hub_id)


def quantized_format(spec: ModelSpec) -> Any | None:
    """The QuantFormat (runtime/qformat.py) of a local folder or of a hub id in the local hub cache;
    None for 16-bit checkpoints and for hub ids not downloaded yet (a registry variant is known by
    `spec.quantization`). A bundled model is converted to 16-bit safetensors: no conversion is needed to
    say so."""
    from specexec_cli.runtime.qformat import format_from_dict, quantization_config_of

    if spec.kind == "bundled":
        return None
    folder = local_source(spec)
    if folder is None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.hub_id, "config.json", cache_dir=str(hub_cache_dir()))
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
    qc = quantization_config_of(folder)
    return None if qc is None else format_from_dict(qc)


def is_quantized(name_or_path: str | ModelSpec) -> bool:
    """True when the model's weights are stored quantized (GPTQ, AWQ, compressed-tensors, auto-round):
    this runtime loads those itself (runtime/target.py), never through transformers' quantizers."""
    spec = name_or_path if isinstance(name_or_path, ModelSpec) else resolve(name_or_path)
    return bool(spec.quantization) or quantized_format(spec) is not None


def _load_quantized(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A quantized checkpoint with every layer on the device, decoded once where memory allows."""
    from specexec_cli.runtime.target import load_offloaded_target

    folder = local_source(spec)
    source = str(folder) if folder is not None else spec.hub_id
    model = load_offloaded_target(source, device=device, dtype=dtype, offload="none", budget=0)
    return model, load_tokenizer(spec)


def load_model(
    name_or_path: str | ModelSpec,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    quantization: str | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode on `device` with weights in `dtype`.

    name_or_path: registry alias, bundled name, hub id, local folder or .gguf file (or a ModelSpec).
    quantization: None, or "gptq" / "awq" / "w4a16" to load the registry's 4-bit variant of a known
      model. A quantized checkpoint (any of them, or a folder) loads through runtime/target.py.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = name_or_path if isinstance(name_or_path, ModelSpec) else resolve(name_or_path)
    if quantization is not None:
        spec = spec.quantized_variant(quantization)
    device = torch.device(device)
    if is_quantized(spec):
        return _load_quantized(spec, device, dtype)
    # sdpa applies the 4-D tree mask; flash attention would ignore or reject it
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}
    folder = local_source(spec)
    if folder is not None:
        tokenizer = _from_folder(AutoTokenizer, folder)
        model = _from_folder(AutoModelForCausalLM, folder, **kwargs)
        keep_embedding_narrow(model, folder)
    else:
        tokenizer = _from_hub(AutoTokenizer, spec.hub_id)
        model = _from_hub(AutoModelForCausalLM, spec.hub_id, **kwargs)
    model.eval()
    return model, tokenizer


def keep_embedding_narrow(model: Any, folder: Path) -> bool:
    """Store the input embedding in the checkpoint's own float dtype when it is narrower than the loaded
    one and not tied to the LM head (runtime/embedding.py): lossless, and half the table's memory for a
    float16 checkpoint computed in float32. Returns whether it did."""
    from specexec_cli.runtime.disk import CheckpointIndex
    from specexec_cli.runtime.embedding import input_embedding_name, narrow_input_embedding

    name = input_embedding_name(model)
    try:
        index = CheckpointIndex(folder)
    except (SpecexecError, OSError, ValueError):
        return False  # not a safetensors folder: keep what transformers loaded
    try:
        location = index.locations.get(name) if name else None
    finally:
        index.close()
    return location is not None and narrow_input_embedding(model, location.dtype)


# --- draft / target compatibility -------------------------------------------------------------


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of special added tokens (their names may differ between compatible releases)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids = {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None)
    return ids


def _first_difference(target: dict[str, int], draft: dict[str, int], allowed: set[int]) -> str | None:
    by_id_t = {v: k for k, v in target.items()}
    by_id_d = {v: k for k, v in draft.items()}
    for token_id in sorted(set(by_id_t) | set(by_id_d)):
        a, b = by_id_t.get(token_id), by_id_d.get(token_id)
        if a != b and token_id not in allowed:
            return f"id {token_id} is {a!r} in the target but {b!r} in the draft"
    return None


def check_compatible(target_tokenizer: Any, draft_tokenizer: Any) -> None:
    """Raise SpecexecError unless both tokenizers map text to the same ids.

    Compares the whole vocabulary id by id, except that an id that is a special token in both may
    carry different names (releases rename reserved tokens, e.g. Llama 3 -> 3.1), then the eos,
    bos and pad ids where both tokenizers set them. Tokenizers are compared, not embedding sizes:
    models often have more embedding rows than tokens.
    """
    t_vocab, d_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if len(t_vocab) != len(d_vocab):
        raise SpecexecError(
            f"draft and target tokenizers differ: {len(d_vocab)} tokens in the draft, "
            f"{len(t_vocab)} in the target; pick a draft from the same model family"
        )
    renamable = _special_ids(target_tokenizer) & _special_ids(draft_tokenizer)
    difference = _first_difference(t_vocab, d_vocab, renamable)
    if difference is not None:
        raise SpecexecError(
            f"draft and target tokenizers differ: {difference}; pick a draft from the same model family"
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        a, b = getattr(target_tokenizer, attr, None), getattr(draft_tokenizer, attr, None)
        if a is not None and b is not None and a != b:
            raise SpecexecError(
                f"draft and target tokenizers differ: {attr.split('_')[0]} is {b} in the draft "
                f"but {a} in the target"
            )


def _as_ids(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every end-of-sequence id: the generation config's (int or list) then the tokenizer's."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        ids += _as_ids(generation_config.eos_token_id)
    if not ids:
        ids += _as_ids(getattr(model.config, "eos_token_id", None))
    ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(ids))


# --- early-exit draft -------------------------------------------------------------------------


def make_early_exit_draft(model: Any, n_layers: int) -> Any:
    """A model of the same class made of `model`'s first `n_layers` decoder layers.

    Embeddings, those layers, the final norm, rotary embedding and LM head are shared with
    `model` (no copies): the draft costs no extra weight memory and follows in-place changes.
    An offloaded target (specexec_cli.runtime) must keep those layers resident on the device.
    """
    config = model.config
    total = config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise UsageError(f"--draft first-layers:{n_layers}: the target has {total} layers (use 1..{total})")
    base_name = model.base_model_prefix
    base = getattr(model, base_name, None)
    if base is None or not isinstance(getattr(base, "layers", None), torch.nn.ModuleList):
        raise SpecexecError(f"cannot make an early-exit draft of {type(model).__name__}: no layer list")
    engine = getattr(model, "offload_engine", None)  # a target whose layers the runtime binds per call
    if engine is not None:
        held = set(engine.resident) | set(engine.expanded)  # resident as stored, or decoded once
        streamed = [i for i in range(n_layers) if i not in held]
        if streamed:
            raise SpecexecError(
                f"an early-exit draft of {n_layers} layers needs them on the device, but the offloaded "
                f"target streams layer {streamed[0]}; pass --resident-layers {n_layers} or a separate draft"
            )
    draft_config = copy.deepcopy(config)
    draft_config.num_hidden_layers = n_layers
    if isinstance(getattr(draft_config, "layer_types", None), list):
        draft_config.layer_types = draft_config.layer_types[:n_layers]
    with torch.device("meta"):
        draft = type(model)(draft_config)
    draft_base = getattr(draft, base_name)
    for child_name, child in base.named_children():
        shared = torch.nn.ModuleList(list(child)[:n_layers]) if child_name == "layers" else child
        setattr(draft_base, child_name, shared)
    for child_name, child in model.named_children():
        if child_name != base_name:
            setattr(draft, child_name, child)
    bound_per_call = f"{base_name}.layers." if engine is not None else None
    leftover = [
        name
        for name, t in draft.state_dict(keep_vars=True).items()
        if t.is_meta and not (bound_per_call and name.startswith(bound_per_call))
    ]
    leftover += [name for name, t in draft.named_buffers() if t.is_meta]
    if leftover:
        raise SpecexecError(f"early-exit draft of {type(model).__name__}: unshared tensors {leftover[:3]}")
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.train(model.training)
    return draft
