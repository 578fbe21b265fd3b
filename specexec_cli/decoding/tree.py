"""The speculative tree as preallocated tensors: token, parent, depth, score and ancestor bits.

Node 0 is the root: the last committed token. A forest for a batch of prompts has one root per prompt,
nodes 0 .. n_roots - 1, and `roots[i]` says which tree node i belongs to. Nodes are stored in insertion
order, so a parent always has a smaller index than its children; every operation here keeps that
order. `ancestors[i, j]` is True when node j is node i or one of its ancestors, which is exactly the
attention pattern of node i inside the tree (so trees of a forest never see each other). The draft
model's cache holds one slot per node it has processed (`draft_slot`), appended in
the order the draft ran them.
"""

from __future__ import annotations

import torch


class Tree:
    """A tree (or a forest: one root per prompt) of at most `capacity` nodes, grown by `add_children` and
    trimmed by `keep_best`. `root_token`: one token, or [R] tokens for R roots."""

    def __init__(self, root_token: int | torch.Tensor, capacity: int, device: torch.device | str) -> None:
        root_tokens = torch.as_tensor(root_token, device=device).reshape(-1)  # [R]
        n_roots = root_tokens.numel()
        self.capacity = capacity
        self.device = torch.device(device)
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)
        self.parents = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.depths = torch.zeros(capacity, dtype=torch.long, device=device)
        # Cumulative draft log-probability of the path root -> node (the root scores 0).
        self.scores = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.ancestors = torch.zeros(capacity, capacity, dtype=torch.bool, device=device)
        self.expanded = torch.zeros(capacity, dtype=torch.bool, device=device)
        # Slot in the draft cache's tree segment where the node's KV lives, -1 if never processed.
        self.draft_slot = torch.full((capacity,), -1, dtype=torch.long, device=device)
        # Node held by each draft cache slot, -1 once that node was trimmed away.
        self.slot_node = torch.empty(0, dtype=torch.long, device=device)
        # The root (0 .. n_roots - 1) each node descends from.
        self.roots = torch.zeros(capacity, dtype=torch.long, device=device)
        first = torch.arange(n_roots, device=device)
        self.tokens[:n_roots] = root_tokens  # a device tensor is copied on the device: no host sync
        self.roots[:n_roots] = first
        self.ancestors[first, first] = True
        self.expanded[:n_roots] = True  # the roots' children come from the draft's catch-up pass
        self.n_roots = n_roots
        self.size = n_roots

    def add_children(self, parents: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Append children (all [N]) and return their node indices [N]. Parents must already exist."""
        n = parents.numel()
        if self.size + n > self.capacity:
            raise ValueError(f"tree capacity {self.capacity} exceeded by {self.size + n - self.capacity}")
        new = torch.arange(self.size, self.size + n, device=self.device)
        self.tokens[new] = tokens
        self.parents[new] = parents
        self.depths[new] = self.depths[parents] + 1
        self.roots[new] = self.roots[parents]
        self.scores[new] = scores
        self.ancestors[new] = self.ancestors[parents]
        self.ancestors[new, new] = True
        self.expanded[new] = False
        self.draft_slot[new] = -1
        self.size += n
        return new

    def candidates(self, max_nodes: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `max_nodes` best unexpanded nodes whose children could still enter the `n_roots + budget`
        best nodes (a child scores at most its parent, and loses ties to older nodes), best score first:
        (scores [k], nodes [k]), with -inf scores for the places no such node fills. No host sync."""
        n = self.size
        keep = self.n_roots + budget
        scores = self.scores[:n].masked_fill(self.expanded[:n], float("-inf"))
        if n >= keep:
            weakest_kept = torch.sort(self.scores[:n], descending=True, stable=True).values[keep - 1]
            scores = scores.masked_fill(scores <= weakest_kept, float("-inf"))
        best = torch.topk(scores, min(max_nodes, n), sorted=True)
        return best.values, best.indices

    def mass(self) -> torch.Tensor:
        """Sum over the non-root nodes of their draft path probability exp(score), a 0-d float32 tensor:
        the draft's estimate of the tokens the tree adds per iteration."""
        return self.scores[self.n_roots : self.size].exp().sum()

    def mark_processed(self, nodes: torch.Tensor) -> None:
        """Record that the draft ran `nodes` in one pass; their KV now sits in the next slots."""
        first = self.slot_node.numel()
        self.draft_slot[nodes] = torch.arange(first, first + nodes.numel(), device=self.device)
        self.slot_node = torch.cat([self.slot_node, nodes])
        self.expanded[nodes] = True

    def keep_best(self, keep: int) -> None:
        """Trim to the `keep` best nodes by score, ties to the older node, keeping insertion order.

        Scores never rise from parent to child and a parent is older than its children, so the kept
        set is closed under ancestors; the roots score 0 and are the oldest, so they always stay. Work
        is a sort plus a gather of the ancestor bits.
        """
        n = self.size
        if n <= keep:
            return
        order = torch.sort(self.scores[:n], descending=True, stable=True).indices
        kept = torch.sort(order[:keep]).values  # back to insertion order
        remap = torch.full((n,), -1, dtype=torch.long, device=self.device)
        remap[kept] = torch.arange(keep, device=self.device)
        for name in ("tokens", "depths", "scores", "expanded", "draft_slot", "roots"):
            column = getattr(self, name)
            column[:keep] = column[kept].clone()
        parents = self.parents[kept]
        self.parents[:keep] = torch.where(parents >= 0, remap[parents.clamp(min=0)], parents)
        self.ancestors[:keep, :keep] = self.ancestors[kept][:, kept]
        self.ancestors[keep:n] = False
        self.ancestors[:, keep:n] = False
        live = self.slot_node >= 0
        self.slot_node = torch.where(live, remap[self.slot_node.clamp(min=0)], self.slot_node)
        self.size = keep

    def children_lookup(self) -> dict[tuple[int, int], int]:
        """(parent, token) -> child, on the host (one transfer), for walking the tree during validation."""
        return lookup_of(*torch.stack([self.parents[: self.size], self.tokens[: self.size]]).tolist())


def lookup_of(parents: list[int], tokens: list[int]) -> dict[tuple[int, int], int]:
    """(parent, token) -> child from the host copies of the parents and tokens columns (roots included:
    their parent is -1)."""
    return {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens, strict=True)) if p >= 0}
