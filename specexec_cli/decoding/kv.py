"""KV cache compaction: keep the committed prefix plus the accepted path, drop the rest.

Only the tail after `start` moves: the kept entries are gathered into place right after `start` and the
cache is cropped behind them, so the cost is proportional to what is kept, not to the whole cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def keep_tail(cache: DynamicCache, start: int, kept: torch.Tensor) -> None:
    """Keep positions [0, start) and then the positions `start + kept` (ascending [K]); drop the rest."""
    length = cache.get_seq_length()
    n_kept = kept.numel()
    if n_kept:
        source = kept + start
        for layer in cache.layers:
            # Advanced indexing copies the source first, so overlapping ranges are safe.
            layer.keys[:, :, start : start + n_kept] = layer.keys[:, :, source]
            layer.values[:, :, start : start + n_kept] = layer.values[:, :, source]
    to_remove = length - (start + n_kept)
    if to_remove > 0:
        cache.crop(-to_remove)
