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
from specexec_cli.decoding.lanes import Lane, LaneDecoder, Piece, lane_samplings
from specexec_cli.decoding.packed import PackedCache
from specexec_cli.decoding.sampling import draw_from, probabilities
from specexec_cli.decoding.stats import PassStats
from specexec_cli.decoding.tree import Tree
from specexec_cli.decoding.tree_passes import (
    Roots,
    commit_paths,
    draft_catch_up,
    draft_tree_pass,
    greedy_walks,
    target_tree_pass,
)


def stem_shape(config: GenerationConfig, max_lanes: int = 1) -> tuple[int, int]:
    """(number of stems, stem length) of one lane's tree. With up to `max_lanes` prompts per pass each
    lane gets budget // max_lanes tokens: a fixed share, so a lane's tree (and its sampled output) does
    not depend on which other prompts share the pass."""
    budget = max(1, config.tree.budget // max_lanes)
    n_stems = min(config.tree.max_n_beams, budget)
    return n_stems, max(1, budget // n_stems)


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


def sample_stems(draft: torch.nn.Module, cache: PackedCache, lanes: list[Lane], roots: Roots,
                 config: GenerationConfig, shape: tuple[int, int], stats: PassStats,
                 pieces: tuple[Piece, ...] = ()) -> tuple[Tree, dict[int, torch.Tensor]]:
    """Sample each lane's stems into one forest; returns it and the draft distribution q [V] at each
    inner node.

    All stems advance one depth per draft pass, so the nodes a pass runs are the children the previous
    pass created: tree indices first .. first + count - 1, in order. Each lane samples with its own
    generator. One host sync per pass. The `pieces` of joining prompts ride in the catch-up pass."""
    n_stems, length = shape
    q_samplings = [drafting_sampling(s) for s in lane_samplings(lanes, config.sampling)]
    shared = q_samplings[0] if len(set(q_samplings)) == 1 else None  # else: each row its lane's
    n_roots, device = len(lanes), roots.keys.device
    tree = Tree(torch.stack([lane.sequence[-1] for lane in lanes]), n_roots * (1 + n_stems * length), device)
    q_at: dict[int, torch.Tensor] = {}
    logits = draft_catch_up(draft, cache, lanes, stats, pieces)  # [R, V]
    base = cache.length
    first, count = 0, n_roots  # the nodes whose logits we hold: the roots
    # the node each stem has reached, lane by lane: [R * n_stems]
    stem_at = torch.arange(n_roots, device=device).repeat_interleave(n_stems)
    for depth in range(length):
        if depth > 0:
            nodes = torch.arange(first, first + count, device=device)
            logits = draft_tree_pass(draft, cache, tree, roots, nodes, base, stats)  # [count, V]
        if shared is not None:
            q = probabilities(logits, shared)  # [count, V]
        else:
            row_roots = tree.roots[first : first + count].tolist()
            q = torch.stack([probabilities(logits[row], q_samplings[root])
                             for row, root in enumerate(row_roots)])
        for row in range(count):
            q_at[first + row] = q[row]
        samples = torch.cat([
            torch.multinomial(q[stem_at[r * n_stems : (r + 1) * n_stems] - first], 1,
                              generator=lane.draws.stream).squeeze(1)
            for r, lane in enumerate(lanes)])  # [R * n_stems]
        parents, tokens, child = distinct_children(stem_at, samples, q.shape[-1])
        first, count = tree.size, parents.numel()
        tree.add_children(parents, tokens, torch.zeros(count, device=device))
        stem_at = first + child
    return tree, q_at


def speculative_walk(tree: Tree, target_logits: torch.Tensor, q_at: dict[int, torch.Tensor],
                     sampling: SamplingConfig, generator: torch.Generator, root: int,
                     parents: list[int], tokens: list[int], children: dict[int, list[int]]
                     ) -> tuple[list[int], list[int]]:
    """Multi-step speculative sampling from `root`; returns (accepted path, emitted tokens)."""
    node, path, emitted = root, [], []
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


def validate(tree: Tree, target_logits: torch.Tensor, q_at: dict[int, torch.Tensor], lanes: list[Lane],
             samplings: list[SamplingConfig]) -> list[tuple[list[int], list[int]]]:
    """Per lane: (accepted path, emitted tokens), greedy or by multi-step speculative sampling, each
    lane with its own sampling."""
    greedy = [sampling.greedy for sampling in samplings]
    if all(greedy):
        return greedy_walks(tree, target_logits)
    greedy_paths = greedy_walks(tree, target_logits) if any(greedy) else []
    parents, tokens = torch.stack([tree.parents[: tree.size], tree.tokens[: tree.size]]).tolist()
    children: dict[int, list[int]] = {}
    for child, parent in enumerate(parents):
        if parent >= 0:
            children.setdefault(parent, []).append(child)
    return [greedy_paths[root] if sampling.greedy else
            speculative_walk(tree, target_logits, q_at, sampling, lane.draws.stream, root, parents, tokens,
                             children)
            for root, (lane, sampling) in enumerate(zip(lanes, samplings, strict=True))]


class SpecInferDecoder(LaneDecoder):
    """Same cache handling as SpecExec; only the tree and its validation differ. `max_lanes`: the most
    prompts that will share a pass (each lane's tree gets budget // max_lanes tokens)."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module, config: GenerationConfig,
                 max_lanes: int = 1) -> None:
        super().__init__(target, draft, config)
        self.shape = stem_shape(config, max_lanes)

    @torch.inference_mode()
    def step(self, lanes: list[Lane], pieces: tuple[Piece, ...] = ()) -> list[list[int]]:
        roots = Roots.of(lanes, self.device)
        tree, q_at = sample_stems(self.draft, self.draft_cache, lanes, roots, self.config, self.shape,
                                  self.stats, pieces)
        draft_base = self.draft_cache.length - tree.slot_node.numel()
        target_start = self.target_cache.length
        logits = target_tree_pass(self.target, self.target_cache, lanes, tree, roots, self.stats, pieces)
        walks = validate(tree, logits, q_at, lanes, self.samplings(lanes))
        commit_paths(self.target_cache, self.draft_cache, tree, lanes, [p for p, _ in walks],
                     target_start, draft_base, pieces)
        self.stats.iterations += 1
        return [emitted for _, emitted in walks]
