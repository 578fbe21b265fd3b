"""GGUF -> transformers safetensors folder, the fast way, for architectures stored without permutation.

transformers can load a GGUF file (`from_pretrained(dir, gguf_file=...)`), but it parses the file's
metadata with `gguf.GGUFReader` (~17 s for a 150k-token vocabulary) once for the config, once for the
weights and once for the tokenizer, dequantizes on one core and builds a float32 model first. Here:
one fast parse (models/gguf_file.py), the config from transformers' own GGUF key mapping, tensors
dequantized on every core and written as float16 safetensors, and the tokenizer built by transformers
once per distinct vocabulary (the Qwen draft and target share one, so the second conversion copies it).

Only architectures whose GGUF tensors are the transformers tensors renamed (no q/k permutation) take
this path (FAST_ARCHITECTURES); bundled.py uses transformers' loader for the others. The result is
checked against transformers' own conversion in tests/test_models.py (slow suite).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from specexec_cli.errors import SpecexecError
from specexec_cli.models.gguf_file import GGUFFile

FAST_ARCHITECTURES = ("qwen2",)
SHARD_BYTES = 2 << 30  # float16 bytes per safetensors file


def output_bytes(gguf: GGUFFile, dtype_bytes: int = 2) -> int:
    """Bytes the converted weights take on disk (float16 by default)."""
    total = 0
    for info in gguf.tensors.values():
        numel = 1
        for dim in info.shape:
            numel *= dim
        total += numel * dtype_bytes
    return total


def hf_config(gguf: GGUFFile) -> Any:
    """The transformers config of the GGUF model, from transformers' GGUF key mapping."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    arch = gguf.architecture
    mapping = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    values: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
    for key, value in gguf.metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = mapping.get(prefix, {}).get(rest)
        if renamed not in (None, -1):
            values[renamed] = value
    values.pop("_model_name_or_path", None)
    values["tie_word_embeddings"] = "output.weight" not in gguf.tensors
    if "vocab_size" not in values and "tokenizer.ggml.tokens" in gguf.metadata:
        values["vocab_size"] = len(gguf.metadata["tokenizer.ggml.tokens"])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def tensor_names(gguf: GGUFFile, config: Any) -> dict[str, str]:
    """{transformers parameter name: GGUF tensor name} for every parameter of the model."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == gguf.architecture)
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    out = {}
    for hf_name, _ in skeleton.named_parameters():  # tied parameters appear once
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None or f"{gguf_name}.{suffix}" not in gguf.tensors:
            raise SpecexecError(f"{gguf.path.name}: no GGUF tensor for {hf_name}")
        out[hf_name] = f"{gguf_name}.{suffix}"
    return out


def write_weights(gguf: GGUFFile, names: dict[str, str], dest: Path, dtype: torch.dtype,
                  threads: int | None = None) -> None:
    """Dequantize every tensor (in parallel: numpy releases the GIL) and save safetensors shards."""
    import json

    from safetensors.torch import save_file

    def one(hf_name: str) -> tuple[str, torch.Tensor]:
        return hf_name, torch.from_numpy(gguf.dequantize(names[hf_name])).to(dtype)

    threads = threads or min(4, os.cpu_count() or 1)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    with ThreadPoolExecutor(threads) as pool:
        for hf_name, tensor in pool.map(one, names):
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][hf_name] = tensor
            size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dest / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dest / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(gguf: GGUFFile, dest: Path, cache: Path) -> None:
    """Save the tokenizer into `dest`, building it once per distinct GGUF vocabulary under `cache`."""
    from transformers import AutoTokenizer

    folder = cache / gguf.digest("tokenizer.")
    if not (folder / "tokenizer.json").is_file():
        tmp = cache / f".{folder.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    for file in folder.iterdir():
        shutil.copy2(file, dest / file.name)


def convert(gguf: GGUFFile, dest: Path, tokenizer_cache: Path, dtype: torch.dtype | None = None) -> Any:
    """Write config, generation config, weights (in `dtype`, default float16) and tokenizer of `gguf` into
    the existing folder `dest`; returns the generation config (the caller may add EOS ids and save it)."""
    from transformers import GenerationConfig

    dtype = dtype or torch.float16
    if gguf.architecture not in FAST_ARCHITECTURES:
        raise SpecexecError(f"no fast GGUF conversion for architecture {gguf.architecture!r}")
    config = hf_config(gguf)
    config.dtype = dtype
    config.architectures = [type_name(config)]
    write_weights(gguf, tensor_names(gguf, config), dest, dtype)
    config.save_pretrained(str(dest))
    write_tokenizer(gguf, dest, tokenizer_cache)
    return GenerationConfig.from_model_config(config)


def type_name(config: Any) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
