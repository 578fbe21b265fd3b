"""The batch workload `specexec tune --batch-prompts FILE` tunes for: its prompts, the batch sizes worth
trying on them, and the context the KV caches of the largest batch must hold (the memory plan's input).

A batch of N prompts packs its N caches into one (decoding/packed.py), so the context is the N longest
encoded prompts plus the new tokens for each, plus the draft's tree headroom (as engine.Workload.context).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specexec_cli.decoding.config import TreeConfig, tree_headroom
from specexec_cli.errors import UsageError
from specexec_cli.prompts import Prompt, collect_prompts, encode

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
MAX_BATCH_SIZE = 1024
GENERATE_NEW_TOKENS = 256  # generate's default --max-new-tokens: the profile is loaded again by generate


def read_batch_prompts(path: Path | str) -> list[Prompt]:
    """The prompts of a batch file, read as `generate -f` reads them (plain text or JSON Lines)."""
    return collect_prompts((), (str(path),), sys.stdin)


def batch_sizes_to_try(sizes: Sequence[int], n_prompts: int) -> tuple[int, ...]:
    """`sizes` capped by the number of prompts (a batch cannot hold more), sorted, without repeats."""
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH_SIZE:
        raise UsageError(f"--batch-sizes must lie in 1..{MAX_BATCH_SIZE}")
    return tuple(sorted({min(size, max(1, n_prompts)) for size in sizes}))


def batch_context(prompt_lengths: Sequence[int], batch_size: int, new_tokens: int, headroom: int) -> int:
    """Tokens the packed caches of `batch_size` prompts hold: the longest ones, each with its new tokens,
    plus `headroom` for the draft's tree."""
    longest = sorted(prompt_lengths, reverse=True)[: max(1, batch_size)] or [1]
    return sum(longest) + len(longest) * new_tokens + headroom


def space_tree(budgets: Sequence[int], n_beams: Sequence[int], beam_lens: Sequence[int]) -> TreeConfig:
    """The tree shape whose headroom bounds every candidate's: the most beams and the longest beams, at
    the budget whose tree_headroom is largest."""
    trees = [TreeConfig(budget, max(n_beams), max(beam_lens)) for budget in budgets]
    return max(trees, key=tree_headroom)


@dataclass(frozen=True)
class BatchWorkload:
    """The batch prompts and the sizes to try; `plan_context(tokenizer)` is what a placed target's
    memory plan must hold so that the largest batch's caches fit."""

    prompts: tuple[Prompt, ...]
    sizes: tuple[int, ...]
    new_tokens: int  # per prompt in the batch stage's measurement
    tree: TreeConfig  # bounds the tree headroom of every candidate
    floor: int = 0  # never plan less than this (the single-prompt plan context)

    @classmethod
    def read(cls, path: Path | str, sizes: Sequence[int], new_tokens: int, tree: TreeConfig,
             floor: int = 0) -> BatchWorkload:
        if new_tokens < 1:
            raise UsageError(f"--batch-new-tokens must be >= 1, got {new_tokens}")
        prompts = read_batch_prompts(path)
        return cls(tuple(prompts), batch_sizes_to_try(sizes, len(prompts)), new_tokens, tree, floor)

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def encoded(self, tokenizer: Any) -> list[list[int]]:
        """Token ids of the prompts the stage runs (as many as the largest batch), as generate encodes
        them (chat template, no system message)."""
        return [encode(tokenizer, p, None, True) for p in self.prompts[: self.largest]]

    def caches_context(self, tokenizer: Any) -> int:
        """The context for the largest batch, each prompt with generate's default new tokens (or the
        stage's, if more): sum of the N longest prompts + N x new tokens + tree headroom."""
        lengths = [len(encode(tokenizer, p, None, True)) for p in self.prompts]
        new_tokens = max(self.new_tokens, GENERATE_NEW_TOKENS)
        return batch_context(lengths, self.largest, new_tokens, tree_headroom(self.tree))

    def plan_context(self, tokenizer: Any) -> int:
        """What a placed target is planned for: `caches_context`, and never less than `floor`."""
        return max(self.floor, self.caches_context(tokenizer))
