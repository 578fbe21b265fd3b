"""Write a random GPTQ Llama checkpoint (one safetensors shard per decoder layer) that the offloaded
runtime loads exactly like a hub checkpoint: AutoGPTQ "v1" layout (qweight, qzeros, scales, g_idx),
symmetric (every zero point 8 at 4 bits), act-order off, float16 embeddings, norms and LM head.

The random layer tensors are drawn once and written under every layer's names: streaming and
dequantization cost does not depend on the values, and drawing 0.4 GB per 70B-shaped layer would
dominate the benchmark's setup.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Llama-2-70B: hidden 8192, MLP 28672, 64 heads of 128, 8 KV heads, vocab 32000
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8, head_dim=128, vocab_size=32000)
# the same structure (GQA 8:1), small enough for a CPU smoke run
SMOKE = dict(hidden_size=256, intermediate_size=896, num_attention_heads=8,
             num_key_value_heads=1, head_dim=32, vocab_size=512)


def linear_shapes(shape: dict) -> list[tuple[str, int, int]]:
    """(module name in the layer, out features, in features) of every linear of a Llama layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    return [
        ("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, q), ("mlp.gate_proj", i, h), ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
    ]


def streamed_layer_bytes(shape: dict, bits: int = 4, group_size: int = 128) -> int:
    """Bytes of one layer as the runtime streams it (qweight + qzeros + fp16 scales + norms; a trivial
    g_idx is not streamed), before the 256-byte alignment of each tensor."""
    p = 32 // bits
    total = 2 * 2 * shape["hidden_size"]  # two RMSNorm weights, fp16
    for _, n_out, n_in in linear_shapes(shape):
        groups = n_in // group_size
        total += n_in // p * n_out * 4 + groups * n_out // p * 4 + groups * n_out * 2
    return total


def _layer_tensors(shape: dict, bits: int, group_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    p = 32 // bits
    zero_word = 0
    for k in range(p):  # v1 stores zero - 1: a symmetric 4-bit zero point 8 is stored as 7 per value
        zero_word |= ((1 << (bits - 1)) - 1) << (k * bits)
    zero_word -= 1 << 32 if zero_word >= 1 << 31 else 0
    out = {}
    for name, n_out, n_in in linear_shapes(shape):
        if n_in % group_size or n_in % p or n_out % p:
            raise ValueError(f"{name} [{n_out}, {n_in}] does not pack at {bits} bits, group {group_size}")
        groups = n_in // group_size
        qweight = torch.empty(n_in // p, n_out, dtype=torch.int32)  # [in / p, out]
        out[f"{name}.qweight"] = qweight.random_(-(1 << 31), 1 << 31, generator=gen)
        out[f"{name}.qzeros"] = torch.full((groups, n_out // p), zero_word, dtype=torch.int32)
        scales = torch.rand(groups, n_out, generator=gen) * 0.002 + 0.002  # [groups, out]
        out[f"{name}.scales"] = scales.to(torch.float16)
        out[f"{name}.g_idx"] = (torch.arange(n_in) // group_size).to(torch.int32)  # trivial
    out["input_layernorm.weight"] = torch.ones(shape["hidden_size"], dtype=torch.float16)
    out["post_attention_layernorm.weight"] = torch.ones(shape["hidden_size"], dtype=torch.float16)
    return out


def write_checkpoint(directory: Path, shape: dict, n_layers: int, bits: int = 4, group_size: int = 128,
                     seed: int = 0) -> Path:
    """Write config.json, model.safetensors.index.json and one shard per layer (+ one for the rest)."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    h, vocab = shape["hidden_size"], shape["vocab_size"]
    n_files = n_layers + 1
    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], k: int) -> None:
        name = f"model-{k:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    rest = {
        "model.embed_tokens.weight": (torch.randn(vocab, h, generator=gen) * 0.02).to(torch.float16),
        "model.norm.weight": torch.ones(h, dtype=torch.float16),
        "lm_head.weight": (torch.randn(vocab, h, generator=gen) * 0.02).to(torch.float16),
    }
    save(rest, 1)
    del rest
    layer = _layer_tensors(shape, bits, group_size, gen)
    for i in range(n_layers):
        save({f"model.layers.{i}.{k}": t for k, t in layer.items()}, i + 2)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "num_hidden_layers": n_layers,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "quantization_config": {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory
