"""Plain decoding: one target pass per token. The reference every speculative method must equal.

With several lanes, each pass feeds every lane the committed tokens the target has not seen, packed
into one sequence (and the pieces of joining prompts, decoding/prefill.py), and draws one token per lane
from its last row.
"""

from __future__ import annotations

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.forward import forward
from specexec_cli.decoding.lanes import Lane, LaneDecoder, Piece
from specexec_cli.decoding.packed import chain_pattern, lane_ranges, lane_rows
from specexec_cli.decoding.sampling import draw
from specexec_cli.decoding.tree_passes import keep_rows, span_ids, spans


class AutoregressiveDecoder(LaneDecoder):
    """Feeds the committed tokens the target has not seen and draws one token from each lane's last row."""

    def __init__(self, target: torch.nn.Module, config: GenerationConfig) -> None:
        super().__init__(target, None, config)

    @torch.inference_mode()
    def step(self, lanes: list[Lane], pieces: tuple[Piece, ...] = ()) -> list[list[int]]:
        cache, device = self.target_cache, self.device
        keys, starts, ends = spans(lanes, pieces, "target_seen", 0)
        counts = [end - start for start, end in zip(starts, ends, strict=True)]
        rows = lane_rows(keys, counts, device)  # [T]
        positions = lane_ranges(starts, ends, device)
        ids = span_ids(lanes, pieces, starts, ends)
        attend = torch.cat([cache.sees_past(rows), chain_pattern(rows, positions)], dim=1)
        logits = self.stats.timed("target", self.target.device, lambda: forward(
            self.target, cache.cache, ids, positions, attend, keep=keep_rows(counts, device, len(lanes))),
            tokens=ids.numel())  # [R, V]
        cache.appended(rows)
        for lane in lanes:
            lane.target_seen = lane.n
        for piece in pieces:
            piece.lane.target_seen = piece.end
        self.stats.iterations += 1
        samplings = self.samplings(lanes)
        if all(sampling.greedy for sampling in samplings):
            return [[token] for token in logits.argmax(dim=-1).tolist()]
        return [[int(draw(logits[i], sampling, lane.draws.at(lane.n)))]
                for i, (lane, sampling) in enumerate(zip(lanes, samplings, strict=True))]
