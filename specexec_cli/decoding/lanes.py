"""One prompt being decoded ("a lane" of a batch): its committed tokens, how much of them each model's
cache holds and its randomness; and the base every decoder builds on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from specexec_cli.decoding.config import SamplingConfig
from specexec_cli.decoding.forward import use_tree_attention
from specexec_cli.decoding.packed import PackedCache
from specexec_cli.decoding.sampling import TokenDraws
from specexec_cli.decoding.stats import PassStats


@dataclass
class Lane:
    """Cache invariants between iterations, with n committed tokens (prompt + output so far):
    the target cache holds `target_seen` <= n - 1 of them (the last committed token is fed as a tree
    root or as the next plain-decoding input); the draft cache holds `draft_seen` <= n of them."""

    key: int  # owner id of this lane's slots in the packed caches (unique per decoder)
    sequence: torch.Tensor  # [n] committed tokens, on the device
    draws: TokenDraws
    target_seen: int = 0
    draft_seen: int = 0
    remaining: int | None = None  # tokens still wanted (None: no limit): a deeper tree would be wasted
    sampling: SamplingConfig | None = None  # this prompt's own sampling (None: the decoder's config)

    @property
    def n(self) -> int:
        return self.sequence.numel()

    def extend(self, tokens: list[int]) -> None:
        """Append newly committed tokens (one host-to-device copy)."""
        if tokens:
            fresh = torch.tensor(tokens, dtype=self.sequence.dtype, device=self.sequence.device)
            self.sequence = torch.cat([self.sequence, fresh])


@dataclass(frozen=True)
class Piece:
    """Part of a joining prompt fed this iteration with no logits (chunked prefill, decoding/prefill.py):
    `lane.sequence[target_seen:end]` goes to the target and `[draft_seen:end]` to the draft, in the same
    passes as the decoding lanes' rows. `end` <= n - 1, so the invariants above hold after it."""

    lane: Lane
    end: int


def lane_samplings(lanes: list[Lane], default: SamplingConfig) -> list[SamplingConfig]:
    """Each lane's own sampling, else `default` (the run's)."""
    return [lane.sampling or default for lane in lanes]


class LaneDecoder:
    """What every decoder shares: the models, one packed KV cache per model, and the pass counters.

    A decoder serves any number of lanes: `step(lanes, pieces)` runs one iteration over all of them (one
    target pass) and returns each lane's new tokens, feeding `pieces` of joining prompts in the same
    passes; `remove(lane)` frees a finished lane's cache slots.
    """

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None, config: Any) -> None:
        self.target, self.draft, self.config = target, draft, config
        self.device = target.device
        use_tree_attention(target)
        if draft is not None:
            use_tree_attention(draft)
        self.target_cache = PackedCache(self.device)
        self.draft_cache = PackedCache(self.device)
        self.stats = PassStats()

    def step(self, lanes: list[Lane], pieces: tuple[Piece, ...] = ()) -> list[list[int]]:
        raise NotImplementedError

    def decode_rows(self, n_lanes: int) -> int:
        """About how many rows a target pass over `n_lanes` decoding lanes feeds (for chunked prefill)."""
        return n_lanes if self.draft is None else self.config.tree.budget + n_lanes

    def samplings(self, lanes: list[Lane]) -> list[SamplingConfig]:
        """How each lane draws its tokens: its own sampling, else the decoder's config's. Lanes with
        different temperatures, top-p or top-k share passes all the same (a server's requests)."""
        return lane_samplings(lanes, self.config.sampling)

    @torch.inference_mode()
    def remove(self, lane: Lane) -> None:
        self.target_cache.release(lane.key)
        self.draft_cache.release(lane.key)
