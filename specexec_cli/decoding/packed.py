"""Several prompts in one KV cache: which prompt owns each slot, the attention pattern that keeps
prompts apart, and compaction.

A key is stored with its rotary position already applied, so attention does not depend on where in the
cache a key sits: the entries of different prompts can interleave in one cache, and a pattern (new
token i may see slot j only if slot j belongs to i's prompt) keeps them apart. That lets one forward
pass serve several prompts with no padding: their new tokens are packed into one sequence, each row
with its own prompt's position ids. When a prompt finishes, its slots are squeezed out at once (one
gather of the cache, once per prompt), so the cache never holds more than the live prompts' tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from specexec_cli.decoding.kv import keep_tail


class PackedCache:
    """A DynamicCache shared by prompts ("lanes", told apart by an integer key) plus the owner of each
    slot. `owner` [L] lives on the device; the per-lane counts are host integers."""

    def __init__(self, device: torch.device) -> None:
        self.cache = DynamicCache()
        self.device = device
        self.owner = torch.empty(0, dtype=torch.long, device=device)  # [L] lane key of each slot

    @property
    def length(self) -> int:
        return self.owner.numel()

    def sees_past(self, row_lanes: torch.Tensor) -> torch.Tensor:
        """attend [T, L]: new rows of lanes `row_lanes` [T] may see the cached slots of their own lane."""
        return row_lanes[:, None] == self.owner[None, :]

    def appended(self, row_lanes: torch.Tensor) -> None:
        """Record the owners of the T slots the last forward appended."""
        self.owner = torch.cat([self.owner, row_lanes])
        assert self.owner.numel() == self.cache.get_seq_length()

    def keep_new(self, start: int, kept: torch.Tensor, kept_lanes: torch.Tensor) -> None:
        """Keep slots [0, start) and then the slots `start + kept` [K] (owners `kept_lanes` [K]); drop
        the rest of what was appended since `start`."""
        keep_tail(self.cache, start, kept)
        self.owner = torch.cat([self.owner[:start], kept_lanes])

    def release(self, key: int) -> None:
        """Drop every slot of lane `key` and close the gap (one host sync, once per prompt)."""
        if self.length == 0:
            return
        live = (self.owner != key).nonzero().squeeze(1)  # [L'] ascending
        if live.numel() < self.length:
            keep_tail(self.cache, 0, live)
            self.owner = self.owner[live]


def lane_rows(keys: list[int], counts: list[int], device: torch.device) -> torch.Tensor:
    """[sum(counts)]: lane key of each packed row, `counts[i]` rows of lane `keys[i]` in turn (built
    on the device from Python scalars: no host-to-device copy of a list)."""
    parts = [torch.full((c,), k, dtype=torch.long, device=device) for k, c in zip(keys, counts, strict=True)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)


def lane_ranges(starts: list[int], ends: list[int], device: torch.device) -> torch.Tensor:
    """[sum(ends - starts)]: the concatenated position ranges [starts[i], ends[i])."""
    parts = [torch.arange(s, e, device=device) for s, e in zip(starts, ends, strict=True)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)


def chain_pattern(row_lanes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """attend [T, T] among packed new rows that are plain chains of committed tokens: a row sees the
    rows of its own lane at or before its position."""
    same = row_lanes[:, None] == row_lanes[None, :]
    return same & (positions[None, :] <= positions[:, None])
