"""Memory the planner must be able to count: the offload plan's context comes from the real prompt
lengths, and the tuner's acceptance curve never builds a [tree size, vocab] float32 tensor."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_VOCAB, _word_tokenizer
from tiny_pairs import tiny_pair

from specexec_cli.cli import main
from specexec_cli.decoding import specexec
from specexec_cli.decoding.config import SamplingConfig, TreeConfig, tree_headroom
from specexec_cli.decoding.sampling import probabilities
from specexec_cli.decoding.tree import Tree
from specexec_cli.engine import Workload
from specexec_cli.errors import DoesNotFit
from specexec_cli.prompts import Prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tree_headroom_counts_draft_slots_beyond_the_budget():
    assert tree_headroom(TreeConfig(budget=4, max_n_beams=4, max_beam_len=3)) == 2 * 4 - 5
    assert tree_headroom(TreeConfig(budget=64, max_n_beams=4, max_beam_len=3)) == 0


def test_the_context_is_the_longest_prompts_plus_new_tokens_plus_headroom(tiny_tokenizer):
    prompts = [Prompt("a", "w1 w2 w3"), Prompt("b", "w1 w2 w3 w4 w5 w6 w7"), Prompt("c", "w9")]
    tree = TreeConfig(budget=4, max_n_beams=4, max_beam_len=3)
    workload = Workload.of_prompts(prompts, 10, system=None, chat_template=False)
    assert workload.context(tiny_tokenizer, 1, tree_headroom(tree)) == 7 + 10 + tree_headroom(tree)
    assert workload.context(tiny_tokenizer, 2, 0) == 7 + 3 + 2 * 10  # two lanes: the two longest
    assert Workload.uniform(100, 50, 4).context(None, 4, 5) == 4 * 150 + 5


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = _word_tokenizer([f"w{i}" for i in range(TINY_VOCAB - 4)])
    for name, model in zip(("target", "draft"), tiny_pair("llama", vocab=TINY_VOCAB, dtype=torch.float32),
                           strict=True):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("batch_flag,lanes", [(["--batch-size", "1"], 1), ([], 2)])
def test_generate_plans_the_offload_context_from_the_prompts(model_dirs, monkeypatch, batch_flag, lanes):
    """Alone: the longest prompt + new tokens; batched (offloaded default: both prompts in one batch):
    both prompts + new tokens for each, as their caches are packed into one."""
    from specexec_cli.runtime import target as target_module

    seen = []
    real = target_module.load_offloaded_target

    def recording(source, **kw):
        seen.append(kw["context_len"])
        return real(source, **kw)

    monkeypatch.setattr(target_module, "load_offloaded_target", recording)
    args = ["generate", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
            "--no-chat-template", "--no-profile", "-n", "6", "--offload", "ram", "--budget", "8",
            "--max-n-beams", "4", "--max-beam-len", "3", "-p", "w1 w2", "-p", "w3 w4 w5 w6 w7", *batch_flag]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    prompts = 5 if lanes == 1 else 5 + 2
    assert seen == [prompts + lanes * 6 + tree_headroom(TreeConfig(budget=8, max_n_beams=4, max_beam_len=3))]


def test_plain_decoding_is_planned_without_a_draft_or_a_tree(model_dirs, monkeypatch):
    """Equal memory: --method autoregressive under the same flags plans a 1-token pass (budget 0), no
    draft and no tree headroom, so the memory a draft and a tree would take goes to target layers."""
    from specexec_cli.runtime import target as target_module

    seen = []
    real = target_module.load_offloaded_target

    def recording(source, **kw):
        seen.append((kw["budget"], kw["draft"], kw["context_len"]))
        return real(source, **kw)

    monkeypatch.setattr(target_module, "load_offloaded_target", recording)
    args = ["generate", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
            "--no-chat-template", "--no-profile", "-n", "6", "--offload", "ram", "--budget", "8",
            "--max-n-beams", "4", "--max-beam-len", "5", "-p", "w3 w4 w5 w6 w7"]
    headroom = tree_headroom(TreeConfig(8, 4, 5))
    assert headroom > 0
    for method, expected in (("specexec", (8, "draft", 5 + 6 + headroom)),
                             ("autoregressive", (0, None, 5 + 6))):
        seen.clear()
        result = CliRunner().invoke(main, [*args, "--method", method])
        assert result.exit_code == 0, result.stderr
        (budget, draft, context), = seen
        assert (budget, "draft" if draft is not None else None, context) == expected


@pytest.mark.parametrize("batch_flag", [[], ["--batch-size", "3"]])
def test_a_planned_batch_shrinks_until_its_caches_fit(model_dirs, monkeypatch, batch_flag):
    """The offloaded default (all 3 prompts in one batch) is lowered one prompt at a time until the plan
    admits the packed caches; a batch size the user asked for is refused instead, in one line."""
    from specexec_cli.runtime import target as target_module

    headroom = tree_headroom(TreeConfig(budget=8, max_n_beams=4, max_beam_len=3))
    fits = 5 + 3 + 2 * 6 + headroom  # the two longest prompts and their new tokens
    seen = []
    real = target_module.load_offloaded_target

    def capped(source, **kw):
        seen.append(kw["context_len"])
        if kw["context_len"] > fits:
            raise DoesNotFit(f"budget 8 needs more than {fits} tokens of KV cache")
        return real(source, **kw)

    monkeypatch.setattr(target_module, "load_offloaded_target", capped)
    args = ["generate", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
            "--no-chat-template", "--no-profile", "-n", "6", "--offload", "ram", "--budget", "8",
            "--max-n-beams", "4", "--max-beam-len", "3", "--json",
            "-p", "w1 w2", "-p", "w3 w4 w5 w6 w7", "-p", "w8 w9 w10", *batch_flag]
    result = CliRunner().invoke(main, args)
    if batch_flag:
        assert result.exit_code == 1
        assert seen == [5 + 3 + 2 + 3 * 6 + headroom]
        assert result.stderr.strip().splitlines()[-1].startswith("error: budget 8 needs more")
        assert result.stdout == ""
        return
    assert result.exit_code == 0, result.stderr
    assert seen == [5 + 3 + 2 + 3 * 6 + headroom, fits]
    assert "the caches of 3 prompts do not fit (budget 8 needs more than" in result.stderr
    assert "); 2 do" in result.stderr
    assert "up to 2 per target pass" in result.stderr
    assert len(result.stdout.splitlines()) == 3


def random_tree(n_nodes: int, seed: int) -> Tree:
    """A random tree whose scores never rise from parent to child (as grown trees are)."""
    g = torch.Generator().manual_seed(seed)
    tree = Tree(0, n_nodes, "cpu")
    for node in range(1, n_nodes):
        parent = int(torch.randint(0, node, (1,), generator=g))
        score = tree.scores[parent] - torch.rand(1, generator=g)
        tree.add_children(torch.tensor([parent]), torch.randint(0, 50, (1,), generator=g), score)
    return tree


def reference_curve(tree: Tree, logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The whole-matrix formula: probabilities of every row at once, then per-path products."""
    size = tree.size
    p = probabilities(logits, sampling)  # [size, V] float32: what acceptance_curve must not build
    node_prob = torch.ones(size, dtype=torch.float64)
    node_prob[1:] = p[tree.parents[1:size], tree.tokens[1:size]].double()
    path_prob = node_prob.clone()
    for node in range(1, size):  # parents come first
        path_prob[node] = path_prob[tree.parents[node]] * node_prob[node]
    order = torch.sort(tree.scores[1:size], descending=True, stable=True).indices + 1
    return 1.0 + torch.cumsum(path_prob[order], dim=0)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_p=0.9, top_k=20)],
                         ids=["greedy", "sampled"])
def test_acceptance_curve_works_in_row_chunks(sampling, monkeypatch):
    tree = random_tree(200, seed=0)
    logits = torch.randn(tree.size, 50, generator=torch.Generator().manual_seed(1)) * 3
    logits[:, 7] += 6  # peaked rows, so greedy paths get accepted too
    expected = reference_curve(tree, logits, sampling)
    rows_seen = []

    def counting(x, s):
        rows_seen.append(x.shape[0])
        return probabilities(x, s)

    monkeypatch.setattr(specexec, "probabilities", counting)
    curve = specexec.acceptance_curve(tree, logits, sampling)
    torch.testing.assert_close(curve, expected, rtol=1e-12, atol=1e-12)
    assert curve.shape == (tree.size - 1,)
    assert all(n <= specexec.CURVE_ROWS for n in rows_seen)  # never a [size, V] distribution
    if not sampling.greedy:
        assert len(rows_seen) == -(-(tree.size - 1) // specexec.CURVE_ROWS)
