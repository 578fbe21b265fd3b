"""Model passes shared by the tree decoders (SpecExec and SpecInfer), for one prompt or a batch.

A batch grows one tree per prompt, held as a forest (decoding/tree.py) whose root r is lane r's last
committed token. Each pass packs the new tokens of every lane into one sequence and keeps the lanes
apart with the attention pattern (decoding/packed.py), so one draft pass serves every tree and ONE
target pass validates all of them.

Cache invariants between iterations are those of decoding/lanes.py. During tree growth the draft cache
holds every lane's committed tokens followed by one slot per processed tree node (`base` marks where
the tree slots start). After validation both caches keep, per lane, the committed prefix plus the
accepted path (for the draft, the part of the path it processed; an accepted leaf it never ran is fed
by the next catch-up, so its KV is computed, never left as zeros).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specexec_cli.decoding.forward import forward
from specexec_cli.decoding.lanes import Lane, Piece
from specexec_cli.decoding.packed import PackedCache, chain_pattern, lane_ranges, lane_rows
from specexec_cli.decoding.stats import PassStats
from specexec_cli.decoding.tree import Tree, lookup_of


def device_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """[len(values)] long tensor built on the device from Python ints (no pageable host copy)."""
    return torch.cat([torch.full((1,), v, dtype=torch.long, device=device) for v in values])


def keep_rows(counts: list[int], device: torch.device, n_kept: int | None = None) -> int | torch.Tensor:
    """`logits_to_keep` for the last packed row of each of the first `n_kept` lanes (default: all; an
    int when that is the one last row)."""
    n_kept = len(counts) if n_kept is None else n_kept
    if n_kept == 1 and len(counts) == 1:
        return 1
    ends, total = [], 0
    for count in counts[:n_kept]:
        total += count
        ends.append(total - 1)
    return device_ints(ends, device)


def spans(lanes: list[Lane], pieces: tuple[Piece, ...], seen: str, end_of_lane: int
          ) -> tuple[list[int], list[int], list[int]]:
    """(keys, starts, ends) of the committed tokens a pass feeds: each lane's from its `seen` count
    ("target_seen" or "draft_seen") to n + end_of_lane, then each piece's to its end."""
    keys = [lane.key for lane in lanes] + [piece.lane.key for piece in pieces]
    starts = [getattr(lane, seen) for lane in lanes] + [getattr(piece.lane, seen) for piece in pieces]
    ends = [lane.n + end_of_lane for lane in lanes] + [piece.end for piece in pieces]
    return keys, starts, ends


def span_ids(lanes: list[Lane], pieces: tuple[Piece, ...], starts: list[int], ends: list[int]
             ) -> torch.Tensor:
    """The token ids of `spans`, packed."""
    sequences = [lane.sequence for lane in lanes] + [piece.lane.sequence for piece in pieces]
    return torch.cat([seq[s:e] for seq, s, e in zip(sequences, starts, ends, strict=True)])


@dataclass
class Roots:
    """Per-root facts of an iteration's forest, on the device: lane key and position of each root."""

    keys: torch.Tensor  # [R]
    positions: torch.Tensor  # [R] = n - 1 for a lane with n committed tokens

    @classmethod
    def of(cls, lanes: list[Lane], device: torch.device) -> Roots:
        return cls(device_ints([lane.key for lane in lanes], device),
                   device_ints([lane.n - 1 for lane in lanes], device))

    def node_lanes(self, tree: Tree, nodes: torch.Tensor | slice) -> torch.Tensor:
        return self.keys[tree.roots[nodes]]

    def node_positions(self, tree: Tree, nodes: torch.Tensor | slice) -> torch.Tensor:
        return self.positions[tree.roots[nodes]] + tree.depths[nodes]


def draft_catch_up(draft: torch.nn.Module, cache: PackedCache, lanes: list[Lane], stats: PassStats,
                   pieces: tuple[Piece, ...] = ()) -> torch.Tensor:
    """Feed each lane's committed tokens the draft has not seen, and the `pieces` of joining prompts;
    returns the lanes' roots' logits [R, V]."""
    device = lanes[0].sequence.device
    keys, starts, ends = spans(lanes, pieces, "draft_seen", 0)
    counts = [end - start for start, end in zip(starts, ends, strict=True)]
    rows = lane_rows(keys, counts, device)  # [T]
    positions = lane_ranges(starts, ends, device)
    ids = span_ids(lanes, pieces, starts, ends)
    attend = torch.cat([cache.sees_past(rows), chain_pattern(rows, positions)], dim=1)
    logits = stats.timed("draft", draft.device, lambda: forward(draft, cache.cache, ids, positions, attend,
                                                                keep=keep_rows(counts, device, len(lanes))),
                         tokens=ids.numel())
    cache.appended(rows)
    for lane in lanes:
        lane.draft_seen = lane.n
    for piece in pieces:
        piece.lane.draft_seen = piece.end
    return logits


def draft_tree_pass(draft: torch.nn.Module, cache: PackedCache, tree: Tree, roots: Roots,
                    nodes: torch.Tensor, base: int, stats: PassStats) -> torch.Tensor:
    """Run the draft on tree `nodes` [B] (their ancestors already processed); returns logits [B, V]."""
    device = tree.device
    slots = tree.slot_node  # [S] node held by each tree slot of the draft cache, -1 if trimmed
    assert cache.length == base + slots.numel()
    lanes = roots.node_lanes(tree, nodes)  # [B]
    sees_slot = tree.ancestors[nodes][:, slots.clamp(min=0)] & (slots >= 0)  # [B, S]
    attend = torch.cat(
        [
            cache.sees_past(lanes)[:, :base],  # the committed tokens of the node's own lane
            sees_slot,
            torch.eye(nodes.numel(), dtype=torch.bool, device=device),
        ],
        dim=1,
    )
    positions = roots.node_positions(tree, nodes)
    logits = stats.timed("draft", draft.device,
                         lambda: forward(draft, cache.cache, tree.tokens[nodes], positions, attend),
                         tokens=nodes.numel())
    cache.appended(lanes)
    tree.mark_processed(nodes)
    return logits


def target_tree_pass(target: torch.nn.Module, cache: PackedCache, lanes: list[Lane], tree: Tree,
                     roots: Roots, stats: PassStats, pieces: tuple[Piece, ...] = ()) -> torch.Tensor:
    """One target pass over every lane's committed tokens it lacks, the `pieces` of joining prompts and
    the whole forest; returns the forest's logits [tree.size, V]. Rows: [pending tokens of each lane |
    pieces | forest nodes]."""
    device = tree.device
    past, size = cache.length, tree.size
    keys, seen, ends = spans(lanes, pieces, "target_seen", -1)
    counts = [end - start for start, end in zip(seen, ends, strict=True)]
    pending_rows = lane_rows(keys, counts, device)  # [P]
    pending_positions = lane_ranges(seen, ends, device)
    n_pending = pending_rows.numel()
    row_lanes = torch.cat([pending_rows, roots.node_lanes(tree, slice(0, size))])  # [P + size]
    positions = torch.cat([pending_positions, roots.node_positions(tree, slice(0, size))])
    ids = torch.cat([span_ids(lanes, pieces, seen, ends), tree.tokens[:size]])
    attend = torch.zeros(n_pending + size, past + n_pending + size, dtype=torch.bool, device=device)
    attend[:, :past] = cache.sees_past(row_lanes)
    attend[:, past : past + n_pending] = ((row_lanes[:, None] == pending_rows[None, :])
                                          & (pending_positions[None, :] <= positions[:, None]))
    attend[n_pending:, past + n_pending :] = tree.ancestors[:size, :size]
    # the LM head runs on the tree rows only: the pending committed tokens need no logits
    logits = stats.timed("target", target.device,
                         lambda: forward(target, cache.cache, ids, positions, attend, keep=size),
                         tokens=n_pending + size)
    cache.appended(row_lanes)
    stats.checked_tokens += size - tree.n_roots
    return logits


def commit_paths(target_cache: PackedCache, draft_cache: PackedCache, tree: Tree, lanes: list[Lane],
                 paths: list[list[int]], target_start: int, draft_base: int,
                 pieces: tuple[Piece, ...] = ()) -> None:
    """Cut both caches back to each lane's committed prefix plus its accepted path (tree nodes after its
    root), keep the pieces' rows, and advance the lanes' seen counts. `target_start`: the target cache's
    length before the tree pass; `draft_base`: the draft cache's length when tree growth began (after
    the catch-up that fed the pieces to the draft)."""
    device = tree.device
    n_pending = (sum(lane.n - 1 - lane.target_seen for lane in lanes)
                 + sum(piece.end - piece.lane.target_seen for piece in pieces))
    # Target: keep the pending rows, then per lane its root and path (the root is node r for lane r).
    kept_nodes = [node for r, path in enumerate(paths) for node in (r, *path)]
    kept = torch.cat([torch.arange(n_pending, device=device),
                      n_pending + torch.tensor(kept_nodes, dtype=torch.long, device=device)])
    kept_lanes = torch.cat([target_cache.owner[target_start : target_start + n_pending],
                            lane_rows([lane.key for lane in lanes], [1 + len(p) for p in paths], device)])
    target_cache.keep_new(target_start, kept, kept_lanes)
    # Draft: the processed part of a path is a prefix of it (a node is processed after its parent).
    path_nodes, offset = [], n_pending
    for path in paths:
        path_nodes.append(kept[offset + 1 : offset + 1 + len(path)] - n_pending)
        offset += 1 + len(path)
    slots = [tree.draft_slot[nodes] for nodes in path_nodes]  # [P_r] each, -1 where the draft never ran it
    flags = (torch.cat(slots) >= 0).tolist() if any(paths) else []  # one transfer for every lane
    n_processed, at = [], 0
    for path in paths:
        run = 0
        while run < len(path) and flags[at + run]:
            run += 1
        n_processed.append(run)
        at += len(path)
    draft_kept = torch.cat([s[:k] for s, k in zip(slots, n_processed, strict=True)])
    draft_cache.keep_new(draft_base, draft_kept,
                         lane_rows([lane.key for lane in lanes], n_processed, device))
    for lane, path, k in zip(lanes, paths, n_processed, strict=True):
        lane.target_seen = lane.n + len(path)
        lane.draft_seen = lane.n + k
    for piece in pieces:
        piece.lane.target_seen = piece.end


def walk(tree: Tree, draw_at: Callable[[int, int], int], lookup: dict[tuple[int, int], int],
         root: int = 0) -> tuple[list[int], list[int]]:
    """From `root`, take the target's token `draw_at(node, step)` (step: tokens emitted so far) and move
    to the child carrying it, while one exists. Returns (accepted path as node indices, emitted tokens =
    path tokens + the bonus)."""
    node, path, emitted = root, [], []
    while True:
        token = draw_at(node, len(emitted))
        emitted.append(token)
        child = lookup.get((node, token))
        if child is None:
            return path, emitted
        path.append(child)
        node = child


def greedy_walks(tree: Tree, target_logits: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """`walk` with the target's argmax at every node, from every root; argmax, parents and tokens reach
    the host in one transfer."""
    size = tree.size
    best, parents, tokens = torch.stack(
        [target_logits[:size].argmax(dim=-1), tree.parents[:size], tree.tokens[:size]]).tolist()
    lookup = lookup_of(parents, tokens)
    return [walk(tree, lambda node, _step: best[node], lookup, root) for root in range(tree.n_roots)]
