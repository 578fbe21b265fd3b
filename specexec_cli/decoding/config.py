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
    max_beam_len: most draft passes per iteration, which also bounds the tree depth; None: no cap, the
      tree grows while a pass pays for itself (decoding/growth.py) and nodes can still enter the budget.
    max_branch_width: most children added per expanded node (top-k of the draft).
    draft_cost: one draft pass's cost as a fraction of the target pass, fixed (0: depth is free);
      None: measured during the run.
    For SpecInfer the tree is max_n_beams sampled stems of length budget // max_n_beams.
    The defaults are every front door's (engine.resolve fills what a request and profile leave out).
    """

    budget: int = 64
    max_n_beams: int = 16
    max_beam_len: int | None = None
    max_branch_width: int = 8
    draft_cost: float | None = None

    def validate(self) -> None:
        for name in ("budget", "max_n_beams", "max_beam_len", "max_branch_width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be >= 1, got {value}")
        if self.draft_cost is not None and not (math.isfinite(self.draft_cost) and self.draft_cost >= 0):
            raise UsageError(f"--draft-cost must be a finite number >= 0, got {self.draft_cost}")


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
    # When the run stops, never which tokens the target picks: ignore_eos runs past EOS to the token limit;
    # stop_token_ids end it like EOS (the id is kept in the output); neither ends it before min_new_tokens.
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    # A batch's, not a prompt's: prompt tokens of joining prompts per target pass while others decode
    # (decoding/prefill.py). None: chosen from the run's measured pass times; 0: a prompt enters whole.
    prefill_chunk: int | None = None

    @property
    def stop_ids(self) -> frozenset[int]:
        """The token ids that end the run (once min_new_tokens are out)."""
        eos = frozenset() if self.ignore_eos else frozenset(self.eos_token_ids)
        return frozenset(self.stop_token_ids) | eos

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UsageError(f"min_tokens must lie in 0..{self.max_new_tokens} (the token limit), got "
                             f"{self.min_new_tokens}")
        if any(t < 0 for t in self.stop_token_ids):
            raise UsageError("stop_token_ids must be token ids >= 0")
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise UsageError(f"--prefill-chunk must be >= 0 (0: off), got {self.prefill_chunk}")
        self.sampling.validate()
        self.tree.validate()


def draft_slot_limit(tree: TreeConfig) -> int:
    """Most tree nodes the draft runs in one iteration: its cache keeps a slot for each, trimmed ones
    included. At most max_n_beams per pass after the catch-up pass, and at most twice the budget (a
    best-first tree has about one expanded node per two; growth stops before it would pass the limit)."""
    limit = 2 * tree.budget + tree.max_n_beams
    if tree.max_beam_len is not None:
        limit = min(limit, (tree.max_beam_len - 1) * tree.max_n_beams)
    return limit


def tree_headroom(tree: TreeConfig) -> int:
    """KV slots an iteration needs beyond the budget + 1 tree rows the memory planner already counts: the
    draft cache's slots of processed nodes (`draft_slot_limit`; SpecInfer's stems stay within the
    budget)."""
    return max(0, draft_slot_limit(tree) - (tree.budget + 1))
