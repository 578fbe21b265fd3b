"""Samplers equal transformers' logits warpers, and sampled output follows the target's distribution."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from tiny_pairs import tiny_pair
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.generate import generate
from specexec_cli.decoding.sampling import probabilities, warp_logits

ALPHA = 0.001  # significance level of the goodness-of-fit tests


def hf_warp(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.clone())


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.6, 0.9, 0), (0.7, 1.0, 5),
                                                     (1.3, 0.5, 20), (0.2, 0.99, 3), (1.0, 0.01, 0)])
def test_warp_equals_transformers(temperature, top_p, top_k):
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 3
    logits[:, 7] = logits[:, 8]  # ties, also at the top-k boundary
    logits[0, :10] = 5.0
    ours = warp_logits(logits, SamplingConfig(temperature, top_p, top_k))
    theirs = hf_warp(logits, temperature, top_p, top_k)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])


def test_top_p_keeps_the_most_likely_tokens():
    """The paper's code kept the tail by mistake; the head must survive any top-p."""
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]])
    kept = torch.isfinite(warp_logits(logits, SamplingConfig(1.0, 0.5, 0)))
    assert kept.tolist() == [[True, False, False, False, False]]
    kept = torch.isfinite(warp_logits(logits, SamplingConfig(1.0, 0.95, 0)))
    assert kept.tolist() == [[True, True, False, False, False]]


def exact_two_token_distribution(target, prompt, sampling: SamplingConfig) -> dict[tuple[int, int], float]:
    """P(x1, x2) of the target's first two sampled tokens, by enumeration."""
    with torch.no_grad():
        first = probabilities(target(prompt).logits[0, -1], sampling)
        result = {}
        for x1 in torch.nonzero(first).flatten().tolist():
            extended = torch.cat([prompt, torch.tensor([[x1]])], dim=1)
            second = probabilities(target(extended).logits[0, -1], sampling)
            for x2 in torch.nonzero(second).flatten().tolist():
                result[(x1, x2)] = float(first[x1] * second[x2])
    return result


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_sampled_output_matches_target_distribution(method):
    """Chi-square goodness of fit of the first two tokens at t=0.6, top-p 0.9 (alpha = 0.001)."""
    target, draft = tiny_pair("llama", vocab=12, hidden=32, related=False)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    sampling = SamplingConfig(temperature=0.6, top_p=0.9)
    exact = exact_two_token_distribution(target, prompt, sampling)
    n_samples = 1500  # a 4-point shift in a cell of probability 0.3 is ~3.4 standard errors
    counts = dict.fromkeys(exact, 0)
    tree = TreeConfig(budget=6, max_n_beams=3, max_beam_len=3, max_branch_width=3)
    for seed in range(n_samples):
        config = GenerationConfig(method=method, max_new_tokens=2, sampling=sampling, tree=tree, seed=seed)
        tokens = tuple(generate(target, draft, prompt, config).token_ids)
        assert tokens in counts, f"{tokens} has probability 0 under the target"
        counts[tokens] += 1
    pvalue, cells = pooled_chisquare(exact, counts)
    assert cells >= 3, "the test distribution should not be degenerate"
    assert pvalue > ALPHA


def pooled_chisquare(exact: dict, counts: dict) -> tuple[float, int]:
    """Chi-square goodness of fit of observed `counts` against `exact` probabilities of the same outcomes:
    (p-value, outcomes expected at least 5 times). Outcomes expected fewer than 5 times are pooled into
    one cell, as the test requires."""
    n_samples = sum(counts.values())
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * n_samples >= 5]
    small = [c for c in cells if exact[c] * n_samples < 5]
    observed = [counts[c] for c in big] + ([sum(counts[c] for c in small)] if small else [])
    expected = [exact[c] * n_samples for c in big]
    if small:
        expected.append(sum(exact[c] for c in small) * n_samples)
    scale = sum(observed) / sum(expected)  # the exact probabilities sum to 1 up to rounding
    return chisquare(observed, [e * scale for e in expected]).pvalue, len(big)


def test_seed_makes_sampling_reproducible():
    target, draft = tiny_pair("qwen2")
    prompt = torch.tensor([[1, 2, 3]])
    config = GenerationConfig(method="specexec", max_new_tokens=12, seed=7,
                              sampling=SamplingConfig(temperature=0.8, top_p=0.95))
    runs = [generate(target, draft, prompt, config).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    other = [generate(target, draft, prompt, config.__class__(**{**config.__dict__, "seed": s})).token_ids
             for s in (8, 9, 10)]
    assert any(o != runs[0] for o in other)


def test_probabilities_sum_to_one():
    logits = torch.randn(5, 50)
    for sampling in (SamplingConfig(0.5, 0.8, 10), SamplingConfig(0.0)):
        probs = probabilities(logits, sampling)
        torch.testing.assert_close(probs.sum(-1), torch.ones(5))
        assert all(itertools.starmap(lambda a, b: a >= 0, [(p, 0) for p in probs.flatten().tolist()]))
