"""SpecExec (arXiv 2406.02532): grow the draft's most probable continuations best-first into a tree of
`budget` tokens, check the whole tree in one target pass, and keep the longest path the target agrees
with plus one token of the target's own.

The tree is only a lookup cache: every emitted token is drawn from the target's distribution given its
true prefix (position t of a lane always with that lane's draw for t), whatever the tree holds. So the
output equals plain decoding token for token at temperature 0 and in distribution when sampling, and a
seeded run is reproducible, even though the tree's depth and width follow this run's measured pass
times (decoding/growth.py).
"""

from __future__ import annotations

import torch

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, draft_slot_limit
from specexec_cli.decoding.growth import GrowthRule
from specexec_cli.decoding.lanes import Lane, LaneDecoder, Piece, lane_samplings
from specexec_cli.decoding.packed import PackedCache
from specexec_cli.decoding.sampling import draw, probabilities
from specexec_cli.decoding.stats import PassStats
from specexec_cli.decoding.tree import Tree
from specexec_cli.decoding.tree_passes import (
    Roots,
    commit_paths,
    draft_catch_up,
    draft_tree_pass,
    greedy_walks,
    target_tree_pass,
    walk,
)


def draft_temperature(sampling: SamplingConfig) -> float:
    """The temperature the draft scores its tree at: the sampling one, 1 when greedy."""
    return 1.0 if sampling.greedy else sampling.temperature


def draft_log_probs(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Draft scores [B, V]: log-softmax at `temperature` (a number, or [B, 1]: one per row)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def grow_tree(draft: torch.nn.Module, cache: PackedCache, lanes: list[Lane], roots: Roots,
              config: GenerationConfig, stats: PassStats,
              rule: GrowthRule | None = None, pieces: tuple[Piece, ...] = ()) -> tuple[Tree, float]:
    """Grow the draft tree best-first from each lane's last committed token (brief, step 1); returns the
    tree and its mass (the draft's estimate of the tokens it adds, `Tree.mass`).

    With several lanes the trees form one forest and the budget is shared: the `budget` best nodes by
    draft path probability are kept across all trees, so more of the budget goes to the prompts whose
    continuations the draft is surest of (a node's path probability is the draft's estimate of what it
    adds to the expected tokens per pass). Each draft pass runs up to `max_n_beams` nodes of all trees;
    `rule` (decoding/growth.py) decides how many, and when growing stops paying. Growth also stops when
    no unexpanded node could enter the budget, at `max_beam_len` passes, once the tree is as deep as the
    lanes' remaining tokens, and before the draft cache
    would hold more than `draft_slot_limit` tree nodes. One host sync per draft pass. The `pieces` of
    joining prompts ride in the catch-up pass.
    """
    tree_cfg = config.tree
    rule = rule or GrowthRule(tree_cfg)
    width = tree_cfg.max_branch_width
    n_roots = len(lanes)
    device = lanes[0].sequence.device
    capacity = tree_cfg.budget + n_roots + max(tree_cfg.max_n_beams, n_roots) * width
    slot_limit = draft_slot_limit(tree_cfg)
    tree = Tree(torch.stack([lane.sequence[-1] for lane in lanes]), capacity, device)
    nodes = torch.arange(n_roots, device=device)
    temperatures = [draft_temperature(s) for s in lane_samplings(lanes, config.sampling)]
    lane_temperature = None  # [R, 1] when the lanes score at different temperatures
    if len(set(temperatures)) > 1:
        lane_temperature = torch.tensor(temperatures, device=device)[:, None]
    catch_up_tokens = (sum(lane.n - lane.draft_seen for lane in lanes)
                       + sum(piece.end - piece.lane.draft_seen for piece in pieces))
    logits = draft_catch_up(draft, cache, lanes, stats, pieces)  # [R, V]
    wanted = [lane.remaining for lane in lanes]
    depth_limit = None if None in wanted else max(wanted)  # a path longer than every lane needs is waste
    growth = rule.begin(stats, n_roots, catch_up_tokens, depth_limit)
    base = cache.length  # the tree's slots in the draft cache start here
    while True:
        scale = temperatures[0] if lane_temperature is None else lane_temperature[tree.roots[nodes]]
        log_q = draft_log_probs(logits, scale)  # [B, V]
        top = torch.topk(log_q, min(width, log_q.shape[-1]), dim=-1)  # [B, width]
        child_scores = tree.scores[nodes][:, None] + top.values.clamp(max=0.0)  # [B, width]
        # All B * width children go in (a -inf one is never expanded and is trimmed first): masking
        # out the -inf ones would cost a host sync per pass for a case that hardly ever happens.
        parents = nodes[:, None].expand_as(top.indices)
        tree.add_children(parents.reshape(-1), top.indices.reshape(-1), child_scores.reshape(-1))
        tree.keep_best(tree_cfg.budget + n_roots)
        scores, candidates = tree.candidates(tree_cfg.max_n_beams, tree_cfg.budget)
        *host_scores, mass = torch.cat([scores, tree.mass()[None]]).tolist()  # the pass's one sync
        finite = [score for score in host_scores if score > float("-inf")]
        count = min(growth.next_pass(mass, finite), slot_limit - tree.slot_node.numel())
        if count <= 0:
            return tree, mass
        nodes = candidates[:count]
        logits = draft_tree_pass(draft, cache, tree, roots, nodes, base, stats)


def validate(tree: Tree, target_logits: torch.Tensor, lanes: list[Lane],
             samplings: list[SamplingConfig]) -> list[tuple[list[int], list[int]]]:
    """Per lane, walk from its root, drawing the target's token at each visited node with the lane's
    sampling (brief, step 3).

    Returns per lane (accepted path as node indices, emitted tokens = path tokens + the target's bonus
    token). A sampled token landing at position t of a lane is drawn with that lane's generator for t.
    """
    if all(sampling.greedy for sampling in samplings):
        return greedy_walks(tree, target_logits)
    lookup = tree.children_lookup()
    return [walk(tree, lambda node, step, lane=lane, sampling=sampling: int(
                draw(target_logits[node], sampling, lane.draws.at(lane.n + step))), lookup, root)
            for root, (lane, sampling) in enumerate(zip(lanes, samplings, strict=True))]


CURVE_ROWS = 64  # target rows turned into distributions at a time by `acceptance_curve`


def token_probabilities(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                        sampling: SamplingConfig, chunk: int = CURVE_ROWS) -> torch.Tensor:
    """p(tokens[i]) under the sampling distribution of logits[rows[i]], float64 [N].

    Works through `chunk` rows at a time, so the float32 intermediates (warping, softmax) are
    [chunk, V], never [N, V]: at budget 4096 and a 128k vocabulary a whole-tree float32 copy is 2 GB,
    and top-p sorting makes several.
    """
    if sampling.greedy:
        return (logits.argmax(dim=-1)[rows] == tokens).double()
    out = torch.empty(rows.numel(), dtype=torch.float64, device=logits.device)
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        p = probabilities(logits[rows[part]], sampling)  # [chunk, V] float32
        out[part] = p.gather(1, tokens[part, None]).squeeze(1).double()
    return out


def acceptance_curve(tree: Tree, target_logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """G(K) for K = 1..tree.size-1: expected tokens per iteration if only the K best nodes (by draft
    score) were in the tree, = 1 + sum over those nodes of the target probability of their path.

    Every top-K set by score is ancestor-closed, so one large-budget tree gives the whole curve.
    Extra memory is O(tree.size + CURVE_ROWS * V), not a [tree.size, V] float32 copy of the logits.
    """
    size = tree.size
    parents, tokens = tree.parents[1:size], tree.tokens[1:size]
    node_prob = torch.ones(size, dtype=torch.float64, device=tree.device)
    node_prob[1:] = token_probabilities(target_logits, parents, tokens, sampling)
    path_prob = node_prob.clone()
    depths = tree.depths[:size]
    for depth in range(1, int(depths.max()) + 1):
        at_depth = (depths == depth).nonzero().squeeze(1)
        path_prob[at_depth] = path_prob[tree.parents[at_depth]] * node_prob[at_depth]
    order = torch.sort(tree.scores[1:size], descending=True, stable=True).indices + 1
    return 1.0 + torch.cumsum(path_prob[order], dim=0)


class SpecExecDecoder(LaneDecoder):
    """Holds both packed KV caches across iterations; `step` commits at least one token per lane per
    target pass."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module, config: GenerationConfig) -> None:
        super().__init__(target, draft, config)
        self.growth = GrowthRule(config.tree)

    @torch.inference_mode()
    def step(self, lanes: list[Lane], pieces: tuple[Piece, ...] = ()) -> list[list[int]]:
        """One iteration over `lanes` (and the `pieces` of joining prompts); returns each lane's newly
        emitted tokens."""
        roots = Roots.of(lanes, self.device)
        tree, mass = grow_tree(self.draft, self.draft_cache, lanes, roots, self.config, self.stats,
                               self.growth, pieces)
        draft_base = self.draft_cache.length - tree.slot_node.numel()
        target_start = self.target_cache.length
        logits = target_tree_pass(self.target, self.target_cache, lanes, tree, roots, self.stats, pieces)
        self.observe(tree, logits)
        walks = validate(tree, logits, lanes, self.samplings(lanes))
        self.growth.observe(sum(len(path) for path, _ in walks), mass)
        commit_paths(self.target_cache, self.draft_cache, tree, lanes, [p for p, _ in walks],
                     target_start, draft_base, pieces)
        self.stats.iterations += 1
        return [emitted for _, emitted in walks]

    def observe(self, tree: Tree, logits: torch.Tensor) -> None:
        """Called with every grown tree and the target's logits over it, before validation; for
        subclasses that measure (the tuner's calibration)."""
