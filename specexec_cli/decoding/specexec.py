"""SpecExec (arXiv 2406.02532): grow the draft's most probable continuations best-first into a tree of
`budget` tokens, check the whole tree in one target pass, and keep the longest path the target agrees
with plus one token of the target's own.

The tree is a deterministic function of the committed tokens, so it is only a lookup cache: every
emitted token is drawn from the target's distribution given its true prefix. Output equals plain
decoding token for token at temperature 0 and in distribution when sampling.
"""

from __future__ import annotations

import torch

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig
from specexec_cli.decoding.forward import new_cache, use_tree_attention
from specexec_cli.decoding.sampling import draw, probabilities
from specexec_cli.decoding.stats import PassStats
from specexec_cli.decoding.tree import Tree
from specexec_cli.decoding.tree_passes import (
    commit_path,
    draft_catch_up,
    draft_tree_pass,
    greedy_walk,
    target_tree_pass,
    walk,
)


def draft_log_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Draft scores [B, V]: log-softmax at the sampling temperature (plain log-softmax when greedy)."""
    scale = 1.0 if sampling.greedy else sampling.temperature
    return torch.log_softmax(logits.float() / scale, dim=-1)


def grow_tree(draft: torch.nn.Module, cache, sequence: torch.Tensor, config: GenerationConfig,
              stats: PassStats) -> Tree:
    """Grow the draft tree best-first from the last committed token (brief, step 1)."""
    tree_cfg = config.tree
    width = tree_cfg.max_branch_width
    capacity = tree_cfg.budget + 1 + tree_cfg.max_n_beams * width
    n = sequence.numel()
    tree = Tree(sequence[-1], capacity, sequence.device)
    nodes = torch.zeros(1, dtype=torch.long, device=sequence.device)
    logits = draft_catch_up(draft, cache, sequence, stats)[None]
    for step in range(tree_cfg.max_beam_len):
        if step > 0:
            nodes = tree.best_unexpanded(tree_cfg.max_n_beams, tree_cfg.budget)
            if nodes.numel() == 0:
                break
            logits = draft_tree_pass(draft, cache, tree, nodes, n, stats)
        log_q = draft_log_probs(logits, config.sampling)  # [B, V]
        top = torch.topk(log_q, min(width, log_q.shape[-1]), dim=-1)  # [B, width]
        child_scores = tree.scores[nodes][:, None] + top.values.clamp(max=0.0)  # [B, width]
        # All B * width children go in (a -inf one is never expanded and is trimmed first): masking
        # out the -inf ones would cost a host sync per pass for a case that hardly ever happens.
        parents = nodes[:, None].expand_as(top.indices)
        tree.add_children(parents.reshape(-1), top.indices.reshape(-1), child_scores.reshape(-1))
        tree.keep_best(tree_cfg.budget + 1)
    return tree


def validate(tree: Tree, target_logits: torch.Tensor, sampling: SamplingConfig,
             generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """Walk from the root, drawing the target's token at each visited node (brief, step 3).

    Returns (accepted path as node indices, emitted tokens = path tokens + the target's bonus token).
    """
    if sampling.greedy:
        return greedy_walk(tree, target_logits)
    return walk(tree, lambda node: int(draw(target_logits[node], sampling, generator)))


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


class SpecExecDecoder:
    """Holds both KV caches across iterations; `step` commits at least one token per target pass."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module, config: GenerationConfig,
                 generator: torch.Generator | None) -> None:
        self.target, self.draft, self.config, self.generator = target, draft, config, generator
        self.target_cache, self.draft_cache = new_cache(), new_cache()
        use_tree_attention(target)
        use_tree_attention(draft)
        self.stats = PassStats()

    @torch.inference_mode()
    def step(self, sequence: torch.Tensor) -> list[int]:
        """One iteration over committed tokens `sequence` [n]; returns the newly emitted tokens."""
        n = sequence.numel()
        tree = grow_tree(self.draft, self.draft_cache, sequence, self.config, self.stats)
        logits = target_tree_pass(self.target, self.target_cache, sequence, tree, self.stats)
        self.observe(tree, logits)
        path, emitted = validate(tree, logits, self.config.sampling, self.generator)
        commit_path(self.target_cache, self.draft_cache, tree, path, n)
        self.stats.iterations += 1
        return emitted

    def observe(self, tree: Tree, logits: torch.Tensor) -> None:
        """Called with every grown tree and the target's logits over it, before validation; for
        subclasses that measure (the tuner's calibration)."""
