"""Plain decoding: one target pass per token. The reference every speculative method must equal."""

from __future__ import annotations

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.forward import cache_length, causal_pattern, forward, new_cache, use_tree_attention
from specexec_cli.decoding.sampling import draw
from specexec_cli.decoding.stats import PassStats


class AutoregressiveDecoder:
    """Feeds the committed tokens the target has not seen and draws one token from the last position."""

    def __init__(self, target: torch.nn.Module, config: GenerationConfig,
                 generator: torch.Generator | None) -> None:
        self.target, self.config, self.generator = target, config, generator
        use_tree_attention(target)
        self.cache = new_cache()
        self.stats = PassStats()

    @torch.inference_mode()
    def step(self, sequence: torch.Tensor) -> list[int]:
        past, n = cache_length(self.cache), sequence.numel()
        positions = torch.arange(past, n, device=sequence.device)
        attend = causal_pattern(past, n - past, sequence.device)
        logits = self.stats.timed(
            "target", self.target.device,
            lambda: forward(self.target, self.cache, sequence[past:], positions, attend, keep=1)[-1],
        )
        self.stats.iterations += 1
        return [int(draw(logits, self.config.sampling, self.generator))]
