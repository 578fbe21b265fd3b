"""Turn logits into the distribution a token is drawn from: temperature, then top-k, then top-p.

The order and the cut-off rules are those of transformers' logits warpers (TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper with min_tokens_to_keep=1), so that sampling here draws from exactly
the distribution `model.generate(do_sample=True, ...)` would. Ties at the top-k boundary are kept, and
top-p drops the least likely tokens whose total mass is at most 1 - top_p.
"""

from __future__ import annotations

import torch

from specexec_cli.decoding.config import SamplingConfig


def warp_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p to logits [..., V]; removed tokens get -inf.

    Greedy configs (temperature 0) return the logits unchanged: callers take the argmax.
    """
    if sampling.greedy:
        return logits
    scores = logits.float() / sampling.temperature
    vocab = scores.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_best = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        mass_at_or_below = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = mass_at_or_below <= 1.0 - sampling.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def probabilities(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution [..., V] a token is drawn from; one-hot at the argmax when greedy."""
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return warp_logits(logits, sampling).softmax(dim=-1)


def draw(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [..., V] -> LongTensor [...]: argmax when greedy, else a sample."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, sampling).softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def draw_from(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One sample from a single distribution [V] (already warped and normalised)."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finalizer: nearby inputs give unrelated 64-bit outputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class TokenDraws:
    """Where one prompt's randomness comes from.

    `at(position)` is a generator seeded from (seed, position): the token at output position t is drawn
    with the same random numbers whatever the tree looked like, however many tokens earlier iterations
    accepted and whichever prompts shared the pass. Since SpecExec's tree is only a lookup cache, its
    sampled output then equals plain sampling with the same seed token for token (up to rounding of
    the logits), and a prompt's output does not depend on its batch. `stream` is one sequential
    generator for what is not tied to an output position (SpecInfer's stems and coin flips).
    """

    def __init__(self, seed: int | None, device: torch.device) -> None:
        if seed is None:  # from torch's global generator, so torch.manual_seed still reproduces runs
            seed = int(torch.randint(0, 2**62, (), generator=None))
        self.seed, self.device = seed, torch.device(device)
        self.stream = torch.Generator(device=self.device)
        self.stream.manual_seed(_mix64(seed) >> 1)

    def at(self, position: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_mix64(_mix64(self.seed) ^ position) >> 1)
        return generator
