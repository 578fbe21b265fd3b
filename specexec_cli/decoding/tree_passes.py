"""Model passes shared by the tree decoders (SpecExec and SpecInfer).

Cache invariants between iterations, with n committed tokens (prompt + output so far):
- the target cache holds the first c_t <= n - 1 committed tokens; the last committed token is the
  tree's root and is fed to the target as tree node 0;
- the draft cache holds the first c_d <= n committed tokens; a catch-up pass feeds the rest, root
  included, so the root's draft distribution comes out of that pass. During tree growth the draft cache
  holds the n committed tokens followed by one slot per processed tree node.
After validation both caches are cut back to the committed prefix plus the accepted path (for the
draft, the part of the path it processed; an accepted leaf it never ran is fed by the next catch-up, so
its KV is computed, never left as zeros).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from specexec_cli.decoding.forward import cache_length, causal_pattern, forward
from specexec_cli.decoding.kv import keep_tail
from specexec_cli.decoding.stats import PassStats
from specexec_cli.decoding.tree import Tree, lookup_of


def draft_catch_up(draft: torch.nn.Module, cache: DynamicCache, sequence: torch.Tensor,
                   stats: PassStats) -> torch.Tensor:
    """Feed the committed tokens the draft has not seen; returns the root's logits [V]."""
    past, n = cache_length(cache), sequence.numel()
    device = sequence.device
    positions = torch.arange(past, n, device=device)
    attend = causal_pattern(past, n - past, device)
    logits = stats.timed("draft", draft.device,
                         lambda: forward(draft, cache, sequence[past:], positions, attend, keep=1))
    return logits[-1]


def draft_tree_pass(draft: torch.nn.Module, cache: DynamicCache, tree: Tree, nodes: torch.Tensor,
                    n_committed: int, stats: PassStats) -> torch.Tensor:
    """Run the draft on tree `nodes` [B] (their ancestors already processed); returns logits [B, V]."""
    device = tree.device
    slots = tree.slot_node  # [S] node held by each tree slot of the draft cache, -1 if trimmed
    assert cache_length(cache) == n_committed + slots.numel()
    sees_slot = tree.ancestors[nodes][:, slots.clamp(min=0)] & (slots >= 0)  # [B, S]
    attend = torch.cat(
        [
            torch.ones(nodes.numel(), n_committed, dtype=torch.bool, device=device),
            sees_slot,
            torch.eye(nodes.numel(), dtype=torch.bool, device=device),
        ],
        dim=1,
    )
    positions = n_committed - 1 + tree.depths[nodes]
    logits = stats.timed("draft", draft.device,
                         lambda: forward(draft, cache, tree.tokens[nodes], positions, attend))
    tree.mark_processed(nodes)
    return logits


def target_tree_pass(target: torch.nn.Module, cache: DynamicCache, sequence: torch.Tensor, tree: Tree,
                     stats: PassStats) -> torch.Tensor:
    """One target pass over the committed tokens it lacks plus the whole tree; logits [tree.size, V]."""
    device = sequence.device
    past, n, size = cache_length(cache), sequence.numel(), tree.size
    pending = n - 1 - past  # committed tokens before the root that the target has not seen
    ids = torch.cat([sequence[past : n - 1], tree.tokens[:size]])
    positions = torch.cat([torch.arange(past, n - 1, device=device), n - 1 + tree.depths[:size]])
    attend = torch.zeros(pending + size, past + pending + size, dtype=torch.bool, device=device)
    attend[:, : past + pending] = True
    attend[:pending, past : past + pending] = causal_pattern(0, pending, device)
    attend[pending:, past + pending :] = tree.ancestors[:size, :size]
    # the LM head runs on the tree rows only: the pending committed tokens need no logits
    return stats.timed("target", target.device,
                       lambda: forward(target, cache, ids, positions, attend, keep=size))


def commit_path(target_cache: DynamicCache, draft_cache: DynamicCache, tree: Tree, path: list[int],
                n_committed: int) -> None:
    """Cut both caches back to the committed prefix plus the accepted `path` (tree nodes, root excluded)."""
    # One copy to the device and one read back (how much of the path the draft processed).
    nodes = torch.tensor([0, *path], dtype=torch.long, device=tree.device)  # [1 + P]
    # Target: the root sits at n - 1, tree node i at n - 1 + i.
    keep_tail(target_cache, n_committed - 1, nodes)
    # Draft: the processed part of the path is a prefix of it (a node is processed after its parent).
    slots = tree.draft_slot[nodes[1:]]  # [P], -1 where the draft never ran the node
    n_processed = int((slots >= 0).cumprod(dim=0).sum()) if path else 0
    keep_tail(draft_cache, n_committed, slots[:n_processed])


def walk(tree: Tree, draw_at: Callable[[int], int],
         lookup: dict[tuple[int, int], int] | None = None) -> tuple[list[int], list[int]]:
    """From the root, take the target's token `draw_at(node)` and move to the child carrying it, while
    one exists. Returns (accepted path as node indices, emitted tokens = path tokens + the bonus)."""
    lookup = tree.children_lookup() if lookup is None else lookup
    node, path, emitted = 0, [], []
    while True:
        token = draw_at(node)
        emitted.append(token)
        child = lookup.get((node, token))
        if child is None:
            return path, emitted
        path.append(child)
        node = child


def greedy_walk(tree: Tree, target_logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """`walk` with the target's argmax at every node; argmax, parents and tokens reach the host in one
    transfer."""
    size = tree.size
    best, parents, tokens = torch.stack(
        [target_logits[:size].argmax(dim=-1), tree.parents[:size], tree.tokens[:size]]).tolist()
    return walk(tree, best.__getitem__, lookup_of(parents, tokens))
