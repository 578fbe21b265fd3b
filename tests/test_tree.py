"""Tree invariants (property tests) and KV caches after compaction versus a fresh prefill."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_pairs import tiny_pair

from specexec_cli.decoding.config import GenerationConfig, TreeConfig
from specexec_cli.decoding.forward import cache_length, causal_pattern, forward, new_cache
from specexec_cli.decoding.lanes import Lane
from specexec_cli.decoding.sampling import TokenDraws
from specexec_cli.decoding.specexec import SpecExecDecoder
from specexec_cli.decoding.tree import Tree


@st.composite
def growth_plans(draw):
    """A sequence of growth steps: which existing nodes get children and with what log-probs."""
    keep = draw(st.integers(1, 40))
    child = st.tuples(st.integers(0, 10_000), st.sampled_from([0.0, -0.5, -1.0, -2.0]))
    steps = draw(st.lists(st.lists(child, min_size=1, max_size=12), min_size=1, max_size=8))
    return keep, steps


def grow(keep: int, steps) -> tuple[Tree, list[torch.Tensor]]:
    tree = Tree(root_token=0, capacity=keep + 12, device="cpu")
    for step in steps:
        parent_ids = torch.tensor([p % tree.size for p, _ in step])
        log_q = torch.tensor([lq for _, lq in step])
        tokens = torch.arange(len(step)) + 1000 * tree.size  # distinct per step
        tree.add_children(parent_ids, tokens, tree.scores[parent_ids] + log_q)
        tree.keep_best(keep)
    return tree


@settings(max_examples=150, deadline=None)
@given(growth_plans())
def test_tree_invariants(plan):
    keep, steps = plan
    tree = grow(keep, steps)
    n = tree.size
    assert 1 <= n <= keep
    parents = tree.parents[:n].tolist()
    assert parents[0] == -1
    for node in range(1, n):
        parent = parents[node]
        assert 0 <= parent < node  # parents before children, and the parent is kept (closure)
        assert tree.depths[node] == tree.depths[parent] + 1
        assert tree.scores[node] <= tree.scores[parent]
        expected = tree.ancestors[parent, :n].clone()
        expected[node] = True
        assert torch.equal(tree.ancestors[node, :n], expected)
    assert not tree.ancestors[:n, n:].any()


def test_keep_best_breaks_ties_deterministically():
    tree = Tree(root_token=0, capacity=16, device="cpu")
    tree.add_children(torch.zeros(4, dtype=torch.long), torch.arange(1, 5), torch.zeros(4))  # all tied
    children = tree.add_children(torch.tensor([4]), torch.tensor([9]), torch.zeros(1))  # ties its parent
    assert children.tolist() == [5]
    tree.keep_best(4)
    assert tree.tokens[:4].tolist() == [0, 1, 2, 3]  # older nodes win ties; node 4's child went with it
    tree.keep_best(3)
    assert tree.tokens[:3].tolist() == [0, 1, 2]


def test_candidates_skip_hopeless_nodes():
    tree = Tree(root_token=0, capacity=16, device="cpu")
    tree.add_children(torch.zeros(3, dtype=torch.long), torch.arange(1, 4), torch.tensor([-0.1, -1.0, -3.0]))

    def expandable(max_nodes: int, budget: int) -> list[int]:
        scores, nodes = tree.candidates(max_nodes, budget)  # -inf where no node can enter
        return nodes[torch.isfinite(scores)].tolist()

    assert expandable(2, budget=10) == [1, 2]
    # Full at budget 3: node 3 is the weakest kept node, its children could never enter.
    assert expandable(5, budget=3) == [1, 2]
    # Over-full at budget 2: node 2 is now the weakest kept node.
    assert expandable(5, budget=2) == [1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_caches_after_compaction_equal_fresh_prefill(family):
    target, draft = tiny_pair(family)
    config = GenerationConfig(method="specexec", max_new_tokens=64,
                              tree=TreeConfig(budget=48, max_n_beams=8, max_beam_len=6, max_branch_width=4))
    decoder = SpecExecDecoder(target, draft, config)
    lane = Lane(key=0, sequence=torch.tensor([5, 17, 3, 99, 42]), draws=TokenDraws(0, torch.device("cpu")))
    accepted_lengths = []
    for _ in range(6):
        (emitted,) = decoder.step([lane])
        accepted_lengths.append(len(emitted))
        lane.extend(emitted)
        sequence = lane.sequence
        for model, packed in ((target, decoder.target_cache), (draft, decoder.draft_cache)):
            cache = packed.cache
            length = cache_length(cache)
            assert length <= sequence.numel()
            fresh = new_cache()
            with torch.no_grad():
                positions = torch.arange(length)
                forward(model, fresh, sequence[:length], positions, causal_pattern(0, length, "cpu"))
            for kept, ref in zip(cache.layers, fresh.layers, strict=True):
                torch.testing.assert_close(kept.keys, ref.keys)
                torch.testing.assert_close(kept.values, ref.values)
        assert cache_length(decoder.target_cache.cache) == sequence.numel() - 1
    assert max(accepted_lengths) > 1  # the check covered multi-token acceptances
