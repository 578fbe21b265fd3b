"""SpecInfer baseline (arXiv 2305.09781): sample `max_n_beams` stems of length budget // max_n_beams
from the draft, merge them into a token tree, and validate with multi-step speculative sampling.

At a node with target distribution p and draft distribution q, children are tried in the order they
were first sampled: child x is accepted with probability min(1, p(x) / q(x)); on rejection
p := normalize(max(p - q, 0)), q(x) := 0 and q is renormalised; if every child fails, the token is drawn
from the residual p. This keeps the target's distribution exactly. At temperature 0 the stems are
sampled from the draft at temperature 1 (so the tree has breadth) and the walk follows the argmax.
"""

from __future__ import annotations

import torch

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig
from specexec_cli.decoding.forward import new_cache, use_tree_attention
from specexec_cli.decoding.sampling import draw_from, probabilities
from specexec_cli.decoding.stats import PassStats
from specexec_cli.decoding.tree import Tree
from specexec_cli.decoding.tree_passes import (
    commit_path,
    draft_catch_up,
    draft_tree_pass,
    greedy_walk,
    target_tree_pass,
)


def stem_shape(config: GenerationConfig) -> tuple[int, int]:
    """(number of stems, stem length) for the configured budget."""
    n_stems = min(config.tree.max_n_beams, config.tree.budget)
    return n_stems, max(1, config.tree.budget // n_stems)


def drafting_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """The distribution stems are sampled from: the run's own, or plain temperature 1 when greedy."""
    return SamplingConfig(temperature=1.0) if sampling.greedy else sampling


def distinct_children(stem_at: torch.Tensor, samples: torch.Tensor, vocab: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge stems that sampled the same token at the same node.

    stem_at [S]: node of each stem; samples [S]: its sampled token. Returns (parents [K], tokens [K],
    child [S]): the K distinct (node, token) pairs in order of first occurrence among the stems (the
    order validation tries children in), and each stem's child as an index into them. One host sync
    (the number of distinct pairs).
    """
    keys = stem_at * vocab + samples  # [S]
    distinct, inverse = torch.unique(keys, return_inverse=True)  # [K] sorted, [S]
    n_stems = keys.numel()
    first_seen = torch.full((distinct.numel(),), n_stems, dtype=torch.long, device=keys.device)
    first_seen.scatter_reduce_(0, inverse, torch.arange(n_stems, device=keys.device), reduce="amin")
    order = torch.argsort(first_seen)  # distinct pairs in order of first occurrence
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=keys.device)
    return distinct[order] // vocab, distinct[order] % vocab, rank[inverse]


def sample_stems(draft: torch.nn.Module, cache, sequence: torch.Tensor, config: GenerationConfig,
                 generator: torch.Generator | None, stats: PassStats) -> tuple[Tree, dict[int, torch.Tensor]]:
    """Sample the stems into a tree; returns it and the draft distribution q [V] at each inner node.

    All stems advance one depth per draft pass, so the nodes a pass runs are the children the previous
    pass created: tree indices first .. first + count - 1, in order. One host sync per pass."""
    n_stems, length = stem_shape(config)
    q_sampling = drafting_sampling(config.sampling)
    n, device = sequence.numel(), sequence.device
    tree = Tree(sequence[-1], 1 + n_stems * length, device)
    q_at: dict[int, torch.Tensor] = {}
    logits = draft_catch_up(draft, cache, sequence, stats)[None]  # [1, V]
    first, count = 0, 1  # the nodes whose logits we hold: the root
    stem_at = torch.zeros(n_stems, dtype=torch.long, device=device)  # the node each stem has reached
    for depth in range(length):
        if depth > 0:
            nodes = torch.arange(first, first + count, device=device)
            logits = draft_tree_pass(draft, cache, tree, nodes, n, stats)  # [count, V]
        q = probabilities(logits, q_sampling)  # [count, V]
        for row in range(count):
            q_at[first + row] = q[row]
        samples = torch.multinomial(q[stem_at - first], 1, generator=generator).squeeze(1)  # [n_stems]
        parents, tokens, child = distinct_children(stem_at, samples, q.shape[-1])
        first, count = tree.size, parents.numel()
        tree.add_children(parents, tokens, torch.zeros(count, device=device))
        stem_at = first + child
    return tree, q_at


def validate(tree: Tree, target_logits: torch.Tensor, q_at: dict[int, torch.Tensor],
             sampling: SamplingConfig, generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """Multi-step speculative sampling from the root; returns (accepted path, emitted tokens)."""
    if sampling.greedy:
        return greedy_walk(tree, target_logits)
    parents, tokens = torch.stack([tree.parents[: tree.size], tree.tokens[: tree.size]]).tolist()
    children: dict[int, list[int]] = {}
    for child, parent in enumerate(parents[1:], start=1):
        children.setdefault(parent, []).append(child)
    node, path, emitted = 0, [], []
    while True:
        p = probabilities(target_logits[node], sampling).double()
        accepted = None
        if node in children:
            q = q_at[node].double().clone()
            for child in children[node]:
                x = tokens[child]
                if torch.rand((), generator=generator, device=p.device, dtype=torch.float64) * q[x] < p[x]:
                    accepted = child
                    break
                residual = (p - q).clamp(min=0.0)
                if residual.sum() > 0:  # zero only if p == q, where x was accepted surely
                    p = residual / residual.sum()
                q[x] = 0.0
                if q.sum() > 0:
                    q = q / q.sum()
        if accepted is None:
            emitted.append(draw_from(p.float(), generator))
            return path, emitted
        emitted.append(tokens[accepted])
        path.append(accepted)
        node = accepted


class SpecInferDecoder:
    """Same cache handling as SpecExec; only the tree and its validation differ."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module, config: GenerationConfig,
                 generator: torch.Generator | None) -> None:
        self.target, self.draft, self.config, self.generator = target, draft, config, generator
        self.target_cache, self.draft_cache = new_cache(), new_cache()
        use_tree_attention(target)
        use_tree_attention(draft)
        self.stats = PassStats()

    @torch.inference_mode()
    def step(self, sequence: torch.Tensor) -> list[int]:
        n = sequence.numel()
        tree, q_at = sample_stems(self.draft, self.draft_cache, sequence, self.config, self.generator,
                                  self.stats)
        logits = target_tree_pass(self.target, self.target_cache, sequence, tree, self.stats)
        path, emitted = validate(tree, logits, q_at, self.config.sampling, self.generator)
        commit_path(self.target_cache, self.draft_cache, tree, path, n)
        self.stats.iterations += 1
        return emitted
