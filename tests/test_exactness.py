"""Greedy SpecExec and SpecInfer must reproduce plain greedy decoding of the target token for token."""

from __future__ import annotations

import pytest
import torch
from tiny_pairs import tiny_pair

from specexec_cli.decoding.config import GenerationConfig, TreeConfig
from specexec_cli.decoding.generate import generate

BUDGETS = [1, 8, 64, 512]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    return tiny_pair(request.param)


@pytest.fixture(scope="module")
def prompts():
    torch.manual_seed(123)
    return [torch.randint(0, 128, (1, length)) for length in (1, 23)]


def _greedy(target, draft, prompt, method, budget=8, max_new_tokens=40, **tree):
    # SpecInfer: 64 stems of length budget // 64 keep its draft passes few.
    beams = 64 if method == "specinfer" else 16
    shape = {"max_n_beams": beams, "max_beam_len": 8, "max_branch_width": 4, **tree}
    tree_cfg = TreeConfig(budget=budget, **shape)
    config = GenerationConfig(method=method, max_new_tokens=max_new_tokens, tree=tree_cfg)
    return generate(target, draft, prompt, config)


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_greedy_equals_autoregressive(pair, prompts, method, budget):
    target, draft = pair
    for prompt in prompts:
        reference = _greedy(target, None, prompt, "autoregressive")
        result = _greedy(target, draft, prompt, method, budget=budget)
        assert result.token_ids == reference.token_ids
        assert result.stats.target_passes <= reference.stats.target_passes


def test_unrelated_draft_still_exact(prompts):
    target, draft = tiny_pair("llama", related=False)
    for prompt in prompts:
        reference = _greedy(target, None, prompt, "autoregressive")
        assert _greedy(target, draft, prompt, "specexec", budget=64).token_ids == reference.token_ids


@pytest.mark.parametrize("tree", [dict(max_n_beams=1, max_beam_len=1, max_branch_width=1),
                                  dict(max_n_beams=64, max_beam_len=32, max_branch_width=32),
                                  dict(max_n_beams=3, max_beam_len=2, max_branch_width=128)])
def test_extreme_tree_shapes_exact(pair, prompts, tree):
    target, draft = pair
    reference = _greedy(target, None, prompts[1], "autoregressive", max_new_tokens=24)
    result = _greedy(target, draft, prompts[1], "specexec", budget=100, max_new_tokens=24, **tree)
    assert result.token_ids == reference.token_ids


def test_speculation_saves_target_passes(pair, prompts):
    """A draft that is the target's first layer must buy more than one token per target pass."""
    target, draft = pair
    results = [_greedy(target, draft, prompt, "specexec", budget=64) for prompt in prompts]
    assert sum(r.n_new_tokens for r in results) / sum(r.n_target_passes for r in results) > 1.2


def test_max_new_tokens_is_exact_and_eos_stops(pair, prompts):
    target, draft = pair
    reference = _greedy(target, None, prompts[1], "autoregressive", max_new_tokens=30)
    for n in (1, 2, 7):
        result = _greedy(target, draft, prompts[1], "specexec", budget=64, max_new_tokens=n)
        assert result.token_ids == reference.token_ids[:n]
        assert result.finish_reason == "length"
    eos = reference.token_ids[5]
    first = reference.token_ids.index(eos)
    config = GenerationConfig(method="specexec", max_new_tokens=30, eos_token_ids=(999, eos),
                              tree=TreeConfig(budget=64))
    result = generate(target, draft, prompts[1], config)
    assert result.token_ids == reference.token_ids[: first + 1]
    assert result.finish_reason == "stop"
