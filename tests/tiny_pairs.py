"""Tiny target/draft pairs built from a config, no download: random (float64, for exact comparisons) or
trained for a few seconds on a fixed Markov text (peaked like a real LM, for 16-bit exactness)."""

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


# --- trained pairs: peaked like a real LM ---------------------------------------------------------------

# A fixed "language": each token is followed by one of 3 successors with these probabilities, so a model
# that has learned it puts ~0.9 on its top token (a trained LM's peakedness) and a target and draft
# trained on the same text agree, as a real pair does.
SUCCESSOR_PROBS = (0.9, 0.08, 0.02)
FIRST_TOKEN = 4  # ids below are special tokens (<s>, </s>, <pad>, <unk>), never drawn


def markov_text(vocab: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """[n_tokens] token ids of a fixed random Markov chain over ids FIRST_TOKEN..vocab-1."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(FIRST_TOKEN, vocab, (vocab, len(SUCCESSOR_PROBS)), generator=gen)
    picks = torch.multinomial(torch.tensor(SUCCESSOR_PROBS), n_tokens, replacement=True, generator=gen)
    out, token = torch.empty(n_tokens, dtype=torch.long), FIRST_TOKEN
    for i, pick in enumerate(picks.tolist()):
        token = int(successors[token, pick])
        out[i] = token
    return out


def train_on(model: torch.nn.Module, text: torch.Tensor, steps: int, seed: int, seq: int = 64,
             batch: int = 16, lr: float = 3e-3) -> torch.nn.Module:
    """A few hundred AdamW steps of next-token cross-entropy on random windows of `text`; eval mode after."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, text.numel() - seq - 1, (batch,), generator=gen).tolist()
        window = torch.stack([text[s:s + seq + 1] for s in starts])  # [batch, seq + 1]
        logits = model(input_ids=window[:, :-1]).logits  # [batch, seq, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


_TRAINED: dict[tuple[str, int], tuple[dict, dict]] = {}


def trained_pair(family: str = "llama", vocab: int = 320,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 3-layer target and a 1-layer draft trained (float32, on this CPU, ~10 s once per process) on the
    same Markov text (`markov_text`), then cast to `dtype`: their next-token distributions are peaked
    (top-1 ~0.9) and they agree, so a 16-bit mismatch between two passes is a real one, not noise on
    nearly uniform logits."""
    key = (family, vocab)
    if key not in _TRAINED:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the result is reproducible
        try:
            text = markov_text(vocab, 20_000)
            target = train_on(tiny_model(family, 3, seed=0, vocab=vocab, dtype=torch.float32), text, 250, 0)
            draft = train_on(tiny_model(family, 1, seed=1, vocab=vocab, dtype=torch.float32), text, 150, 1)
        finally:
            torch.set_num_threads(threads)
        _TRAINED[key] = (target.state_dict(), draft.state_dict())
    models = []
    for n_layers, state in zip((3, 1), _TRAINED[key], strict=True):
        model = tiny_model(family, n_layers, seed=0, vocab=vocab, dtype=torch.float32)
        model.load_state_dict(state)
        models.append(model.to(dtype).eval())
    return models[0], models[1]
