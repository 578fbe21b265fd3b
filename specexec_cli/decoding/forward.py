"""One model forward over new tokens with an explicit attention pattern, appending to a KV cache.

Every decoder (autoregressive, SpecExec, SpecInfer) calls the model through `forward`, with a boolean
pattern `attend[i, j]`: may new token i see cache position j (j < past) or new token j - past. The
pattern becomes the additive 4-D mask transformers 5 passes to attention unchanged, so tree attention
works for any transformers causal LM that accepts a 4-D mask (Llama, Qwen2, Mistral, ...) and attends
with "sdpa" or "eager". Flash attention ignores or rejects a 4-D mask, so every decoder pins its models
to sdpa with `use_tree_attention` (the loaders also ask for sdpa).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache

TREE_ATTENTION = ("sdpa", "eager")  # attention implementations that apply an arbitrary 4-D mask


def use_tree_attention(model: torch.nn.Module) -> None:
    """Switch `model` to sdpa attention unless it already uses one that honours a 4-D tree mask."""
    if getattr(model.config, "_attn_implementation", None) not in TREE_ATTENTION:
        model.set_attn_implementation("sdpa")


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The name `model_class.forward` takes the KV cache under: transformers renamed `past_key_values`
    to `cache` (deprecated from 5.2x, removed in 5.40), so ask the signature instead of the version."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_cache() -> DynamicCache:
    """An empty KV cache."""
    return DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def causal_pattern(past: int, n_new: int, device: torch.device) -> torch.Tensor:
    """attend [n_new, past + n_new] for a plain chain of new tokens after `past` cached ones."""
    rows = torch.arange(n_new, device=device)[:, None]
    cols = torch.arange(past + n_new, device=device)[None, :]
    return cols <= rows + past


def forward(
    model: torch.nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,  # [T] token ids
    position_ids: torch.Tensor,  # [T] absolute positions
    attend: torch.Tensor,  # [T, past + T] bool
    keep: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Run the model on T new tokens; returns logits [T, V] (only the last `keep` rows [keep, V] when
    keep > 0, or the rows listed by a 1-D index tensor `keep`: the LM head then skips the rest) and
    appends T entries to `cache`."""
    dtype = model.dtype
    mask = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
    mask.masked_fill_(~attend, torch.finfo(dtype).min)
    out = model(
        input_ids=input_ids[None],
        attention_mask=mask[None, None],
        position_ids=position_ids[None],
        use_cache=True,
        logits_to_keep=keep,
        **{cache_keyword(type(model)): cache},
    )
    return out.logits[0]
