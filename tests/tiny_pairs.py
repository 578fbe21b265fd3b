"""Tiny random target/draft pairs built from a config: no download, float64 for exact comparisons."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
}
MIXTRAL_EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)


def tiny_model(family: str, n_layers: int, seed: int, vocab: int = 128, hidden: int = 64,
               dtype: torch.dtype = torch.float64, **config_overrides: object) -> torch.nn.Module:
    """A seeded random causal LM of `family` (see FAMILIES; mixtral gets 4 experts, 2 per token);
    `config_overrides` go to its config."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=1024, tie_word_embeddings=False)
    if family == "mixtral":
        settings.update(MIXTRAL_EXPERTS)
    config = config_cls(**{**settings, **config_overrides})
    return model_cls(config).to(dtype).eval()


def tiny_pair(family: str, vocab: int = 128, hidden: int = 64, related: bool = True,
              dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 3-layer target and a 1-layer draft; `related` makes the draft the target's first layer."""
    target = tiny_model(family, 3, seed=0, vocab=vocab, hidden=hidden, dtype=dtype)
    draft = tiny_model(family, 1, seed=1, vocab=vocab, hidden=hidden, dtype=dtype)
    if related:
        draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
        draft.model.layers[0].load_state_dict(target.model.layers[0].state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())
        draft.lm_head.load_state_dict(target.lm_head.state_dict())
    return target, draft
