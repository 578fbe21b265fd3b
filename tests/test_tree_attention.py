"""Tree attention: one pass over a token tree with the 4-D mask equals running every root-to-node path
on its own, for each attention implementation that honours the mask; decoders pin models to one; the LM
head only runs on the rows whose logits are used."""

from __future__ import annotations

import pytest
import torch
from tiny_pairs import tiny_model

from specexec_cli.decoding.config import GenerationConfig, TreeConfig
from specexec_cli.decoding.forward import causal_pattern, forward, use_tree_attention
from specexec_cli.decoding.generate import generate
from specexec_cli.decoding.lanes import Lane
from specexec_cli.decoding.packed import PackedCache
from specexec_cli.decoding.sampling import TokenDraws
from specexec_cli.decoding.stats import PassStats
from specexec_cli.decoding.tree import Tree
from specexec_cli.decoding.tree_passes import Roots, target_tree_pass

pytestmark = pytest.mark.usefixtures("one_thread")

# (parent, token) in insertion order; node 0 is the root. Depths 1..4, branching 1..3.
EDGES = [(0, 5), (0, 9), (0, 17), (1, 5), (1, 40), (2, 7), (4, 3), (4, 11), (7, 60), (8, 2)]


def build_tree(root_token: int) -> Tree:
    tree = Tree(root_token, 1 + len(EDGES), "cpu")
    for parent, token in EDGES:
        tree.add_children(torch.tensor([parent]), torch.tensor([token]), torch.zeros(1))
    return tree


def path_tokens(tree: Tree, node: int) -> list[int]:
    """Tokens root -> node (root excluded)."""
    tokens = []
    while node > 0:
        tokens.append(int(tree.tokens[node]))
        node = int(tree.parents[node])
    return tokens[::-1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("cached", [0, 4], ids=["nothing-cached", "prefix-cached"])
def test_tree_pass_equals_per_path_passes(family, attention, cached):
    model = tiny_model(family, 2, seed=3, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    prompt = torch.tensor([3, 14, 15, 92, 65, 35, 89])  # the last token is the tree's root
    cache = PackedCache(torch.device("cpu"))
    lane = Lane(key=7, sequence=prompt, draws=TokenDraws(0, torch.device("cpu")))
    if cached:  # the target already holds a prefix; the pass then feeds the rest plus the tree
        forward(model, cache.cache, prompt[:cached], torch.arange(cached), causal_pattern(0, cached, "cpu"))
        cache.appended(torch.full((cached,), lane.key))
        lane.target_seen = cached
    tree = build_tree(int(prompt[-1]))
    with torch.inference_mode():
        roots = Roots.of([lane], torch.device("cpu"))
        logits = target_tree_pass(model, cache, [lane], tree, roots, PassStats())  # [size, V]
        assert logits.shape == (tree.size, model.config.vocab_size)
        for node in range(tree.size):
            ids = torch.cat([prompt, torch.tensor(path_tokens(tree, node), dtype=torch.long)])
            alone = model(input_ids=ids[None]).logits[0, -1]  # a fresh causal pass over one path
            # eager takes the softmax in float32 even for a float64 model; a wrong mask moves logits by ~0.1
            atol = 1e-10 if attention == "sdpa" else 1e-5
            torch.testing.assert_close(logits[node], alone, rtol=0, atol=atol)


def test_decoders_pin_models_to_an_attention_that_applies_the_mask():
    target = tiny_model("llama", 2, seed=0)
    draft = tiny_model("llama", 1, seed=1)
    target.config._attn_implementation = "flash_attention_2"  # what a checkpoint config could ask for
    draft.config._attn_implementation = "flex_attention"
    eager = tiny_model("llama", 1, seed=2, attn_implementation="eager")
    use_tree_attention(eager)
    assert eager.config._attn_implementation == "eager"  # eager applies the mask too: left alone
    config = GenerationConfig(method="specexec", max_new_tokens=2, tree=TreeConfig(budget=4))
    generate(target, draft, torch.tensor([[4, 5, 6]]), config)
    assert target.config._attn_implementation == "sdpa"
    assert draft.config._attn_implementation == "sdpa"
    assert target.model.layers[0].self_attn.config._attn_implementation == "sdpa"


def test_offload_skeleton_attends_with_sdpa():
    from specexec_cli.runtime.loader import empty_skeleton

    config = tiny_model("llama", 1, seed=0).config
    config._attn_implementation = "eager"
    assert empty_skeleton(config, torch.float32).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("method", ["specexec", "specinfer", "autoregressive"])
def test_lm_head_only_sees_rows_whose_logits_are_used(method):
    """A 30-token prompt: no pass may run the LM head on the prompt rows (only the last, or the tree)."""
    target = tiny_model("llama", 2, seed=0)
    draft = tiny_model("llama", 1, seed=1)
    budget = 6
    rows: dict[str, list[int]] = {"target": [], "draft": []}
    for name, model in (("target", target), ("draft", draft)):
        model.lm_head.register_forward_hook(
            lambda module, args, out, name=name: rows[name].append(args[0].shape[1]))
    prompt = torch.arange(4, 34)[None]
    tree = TreeConfig(budget=budget, max_n_beams=2, max_beam_len=3, max_branch_width=2)
    config = GenerationConfig(method=method, max_new_tokens=5, tree=tree)
    result = generate(target, None if method == "autoregressive" else draft, prompt, config)
    assert result.n_new_tokens == 5
    assert rows["target"] and max(rows["target"]) <= (1 if method == "autoregressive" else budget + 1)
    assert all(n <= max(2, tree.max_n_beams) for n in rows["draft"])
