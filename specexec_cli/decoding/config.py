"""Plain dataclasses that describe one generation run: method, tree shape, sampling and stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specexec_cli.errors import UsageError

METHODS = ("specexec", "specinfer", "autoregressive")


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from a distribution; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the speculative tree.

    budget: tree tokens besides the root (the target validates budget + 1 tokens per pass).
    max_n_beams: most nodes the draft expands in one pass.
    max_beam_len: most draft passes per iteration (also bounds the tree depth).
    max_branch_width: most children added per expanded node (top-k of the draft).
    For SpecInfer the tree is max_n_beams sampled stems of length budget // max_n_beams.
    """

    budget: int = 128
    max_n_beams: int = 32
    max_beam_len: int = 16
    max_branch_width: int = 8

    def validate(self) -> None:
        for name in ("budget", "max_n_beams", "max_beam_len", "max_branch_width"):
            value = getattr(self, name)
            if value < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be >= 1, got {value}")


@dataclass(frozen=True)
class GenerationConfig:
    """Everything the decoding loop needs besides the models and the prompt."""

    method: str = "specexec"
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        self.sampling.validate()
        self.tree.validate()


def tree_headroom(tree: TreeConfig) -> int:
    """KV slots an iteration needs beyond the budget + 1 tree rows the memory planner already counts: the
    draft cache keeps a slot for every node the draft ran, trimmed ones included, up to
    (max_beam_len - 1) * max_n_beams of them (SpecExec; SpecInfer's stems stay within the budget)."""
    return max(0, (tree.max_beam_len - 1) * tree.max_n_beams - (tree.budget + 1))
