"""Trees as deep as the budget pays for (decoding/growth.py): the growth rule's arithmetic, and exactness
of the uncapped, deep and cost-limited trees against plain decoding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_sampling import pooled_chisquare
from tiny_pairs import tiny_model, tiny_pair

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig, draft_slot_limit
from specexec_cli.decoding.generate import generate
from specexec_cli.decoding.growth import GrowthRule, PassTime, best_beams, fit_pass_time
from specexec_cli.errors import UsageError

ALPHA = 0.001  # significance level of the distribution test


def test_fit_pass_time_recovers_a_line_and_stays_non_negative():
    line = fit_pass_time([(1, 0.5), (17, 0.9), (65, 2.1)])
    assert line.fixed == pytest.approx(0.475)
    assert line.per_token == pytest.approx(0.025)
    assert fit_pass_time([]) is None
    flat = fit_pass_time([(1, 2.0), (64, 1.0)])  # slower for fewer tokens: noise, so no slope
    assert flat == PassTime(1.5, 0.0)
    through_origin = fit_pass_time([(10, 1.0), (20, 3.0)])  # a negative intercept is refitted through 0
    assert through_origin.fixed == 0.0 and through_origin.per_token > 0


def test_best_beams_expands_only_what_raises_the_rate():
    gains = [0.5, 0.3, 0.01]
    # free draft passes: every candidate that adds anything
    assert best_beams(gains, expected=3.0, seconds=1.0, draft_time=PassTime(0.0, 0.0)) == 3
    # a pass costing as much as the iteration so far must at least double the tokens: none does
    assert best_beams(gains, expected=3.0, seconds=1.0, draft_time=PassTime(1.0, 0.0)) == 0
    # a per-token cost cuts off the weak third candidate: (3 + 0.8) / 1.2 beats (3 + 0.81) / 1.25
    assert best_beams(gains, expected=3.0, seconds=1.0, draft_time=PassTime(0.1, 0.05)) == 2
    assert best_beams([], expected=3.0, seconds=1.0, draft_time=PassTime(0.0, 0.0)) == 0


class TimedPasses:
    """What GrowthRule reads of PassStats: the latest timed passes and how many were ever timed."""

    def __init__(self, passes: list[tuple[str, int, float]]) -> None:
        self.passes = passes
        self.passes_timed = len(passes)

    def recent(self) -> list[tuple[str, int, float]]:
        return self.passes


def test_growth_rule_learns_times_and_calibration():
    rule = GrowthRule(TreeConfig(budget=64))
    assert rule.costs(65) is None  # nothing timed yet: the first iteration grows a fixed number of passes
    stats = TimedPasses([("draft", 1, 0.11), ("draft", 8, 0.18), ("draft", 16, 0.26), ("target", 65, 3.0)])
    rule.read_times(stats)
    draft, target = rule.costs(65)
    assert draft.at(8) == pytest.approx(0.18, abs=0.01)
    assert target == pytest.approx(3.0)
    rule.read_times(stats)  # nothing new: the same fits
    assert len(rule.draft_points) == 3
    assert rule.alpha == pytest.approx(1.0)  # the prior alone
    rule.observe(accepted=2, mass=6.0)
    assert rule.alpha == pytest.approx(4 / 8)
    fixed = GrowthRule(TreeConfig(budget=64, draft_cost=0.25))
    assert fixed.costs(65) == (PassTime(0.25, 0.0), 1.0)  # in target passes, no timing needed


def test_draft_cost_and_depth_cap_are_validated():
    with pytest.raises(UsageError, match="--draft-cost"):
        TreeConfig(draft_cost=float("nan")).validate()
    with pytest.raises(UsageError, match="--draft-cost"):
        TreeConfig(draft_cost=-0.1).validate()
    with pytest.raises(UsageError, match="--max-beam-len"):
        TreeConfig(max_beam_len=0).validate()
    TreeConfig(max_beam_len=None, draft_cost=0.0).validate()
    # uncapped, the draft's tree slots are bounded by the budget; a cap bounds them by the passes
    assert draft_slot_limit(TreeConfig(budget=64, max_n_beams=16)) == 2 * 64 + 16
    assert draft_slot_limit(TreeConfig(budget=64, max_n_beams=16, max_beam_len=3)) == 2 * 16


def peaked_pair(scale: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A target with a sharpened LM head (scale x its logits) and a draft that is a copy of it, so the
    draft's best path is the target's and deep trees are accepted."""
    target = tiny_model("llama", 2, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(scale)
    return target, copy.deepcopy(target)


def run(target, draft, prompt, method="specexec", max_new_tokens=40, sampling=None, seed=0, **tree):
    config = GenerationConfig(method=method, max_new_tokens=max_new_tokens, tree=TreeConfig(**tree),
                              sampling=sampling or SamplingConfig(), seed=seed)
    return generate(target, None if method == "autoregressive" else draft, prompt, config)


PROMPT = torch.tensor([[5, 17, 2, 99, 41, 8, 63]])


def test_free_depth_goes_past_the_old_cap_and_stays_exact():
    target, draft = peaked_pair(scale=100.0)
    reference = run(target, draft, PROMPT, "autoregressive")
    deep = run(target, draft, PROMPT, budget=64, max_n_beams=8, draft_cost=0.0)
    assert deep.token_ids == reference.token_ids
    assert deep.tokens_per_pass > 9  # no iteration of a tree capped at 8 passes emits more than 9 tokens
    capped = run(target, draft, PROMPT, budget=64, max_n_beams=8, max_beam_len=8, draft_cost=0.0)
    assert capped.token_ids == reference.token_ids
    assert capped.stats.draft_passes <= 8 * capped.stats.iterations
    assert deep.tokens_per_pass > capped.tokens_per_pass


def test_depth_stops_at_the_tokens_still_wanted():
    target, draft = peaked_pair(scale=100.0)
    reference = run(target, draft, PROMPT, "autoregressive", max_new_tokens=5)
    result = run(target, draft, PROMPT, max_new_tokens=5, budget=64, max_n_beams=8, draft_cost=0.0)
    assert result.token_ids == reference.token_ids
    assert result.stats.iterations == 1
    assert result.stats.draft_passes <= 1 + 5  # the catch-up pass and at most one pass per wanted token


def test_a_dear_draft_pass_is_not_run():
    """A draft pass costing 100 target passes never pays: only the catch-up pass runs each iteration."""
    target, draft = peaked_pair(scale=100.0)
    reference = run(target, draft, PROMPT, "autoregressive", max_new_tokens=12)
    result = run(target, draft, PROMPT, max_new_tokens=12, budget=64, draft_cost=100.0)
    assert result.token_ids == reference.token_ids
    assert result.stats.draft_passes == result.stats.iterations
    assert result.tokens_per_pass <= 2.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("draft_cost", [None, 0.0, 0.3])
@pytest.mark.parametrize("budget", [8, 64, 512])
def test_uncapped_greedy_equals_plain_decoding(family, draft_cost, budget):
    """Measured (None) and fixed draft costs, small to large budgets, no depth cap."""
    target, draft = tiny_pair(family)
    torch.manual_seed(11)
    for prompt in (torch.randint(0, 128, (1, 1)), torch.randint(0, 128, (1, 19))):
        reference = run(target, draft, prompt, "autoregressive", max_new_tokens=30)
        result = run(target, draft, prompt, max_new_tokens=30, budget=budget, max_n_beams=16,
                     max_branch_width=4, draft_cost=draft_cost)
        assert result.token_ids == reference.token_ids
        assert result.stats.target_passes <= reference.stats.target_passes


def test_the_draft_cache_holds_at_most_the_slot_limit(monkeypatch):
    """Uncapped growth never keeps more tree nodes in the draft cache than the planner counted."""
    from specexec_cli.decoding import specexec

    target, draft = peaked_pair(scale=100.0)  # deep trees: many passes, trimmed nodes kept in the cache
    tree = TreeConfig(budget=24, max_n_beams=4, max_branch_width=8, draft_cost=0.0)
    seen: list[int] = []
    original = specexec.draft_tree_pass

    def counting(draft_model, cache, tree_, *args, **kwargs):
        logits = original(draft_model, cache, tree_, *args, **kwargs)
        seen.append(tree_.slot_node.numel())
        return logits

    monkeypatch.setattr(specexec, "draft_tree_pass", counting)
    config = GenerationConfig(method="specexec", max_new_tokens=20, tree=tree)
    result = generate(target, draft, PROMPT, config)
    assert tree.budget + 1 < max(seen) <= draft_slot_limit(tree)  # more than the kept tree, within the plan
    assert result.token_ids == run(target, draft, PROMPT, "autoregressive", max_new_tokens=20).token_ids


def test_sampled_deep_trees_equal_plain_sampling_seed_for_seed():
    """Every token is drawn with the lane's draw for its position, whatever the tree's depth."""
    target, draft = peaked_pair(scale=4.0)
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)
    for seed in range(8):
        plain = run(target, draft, PROMPT, "autoregressive", max_new_tokens=24, sampling=sampling, seed=seed)
        for draft_cost in (0.0, None):
            deep = run(target, draft, PROMPT, max_new_tokens=24, sampling=sampling, seed=seed, budget=128,
                       max_n_beams=8, draft_cost=draft_cost)
            assert deep.token_ids == plain.token_ids


def exact_three_token_distribution(target, prompt, sampling) -> dict[tuple[int, ...], float]:
    from specexec_cli.decoding.sampling import probabilities

    result: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(3):
            longer = {}
            for prefix, p in result.items():
                ids = torch.cat([prompt, torch.tensor([list(prefix)], dtype=torch.long)], dim=1)
                probs = probabilities(target(ids).logits[0, -1], sampling)
                for x in torch.nonzero(probs).flatten().tolist():
                    longer[(*prefix, x)] = p * float(probs[x])
            result = longer
    return result


def test_deep_sampled_output_matches_target_distribution():
    """Chi-square goodness of fit of the first three tokens at t=0.6, top-p 0.9, with trees free to grow
    three deep (alpha = 0.001, 1500 samples; outcomes below 5 expected are pooled into one cell)."""
    target, draft = tiny_pair("llama", vocab=12, hidden=32, related=True)
    with torch.no_grad():  # sharper heads: 46 outcomes of the 172 expected 5+ times, deeper trees accepted
        target.lm_head.weight.mul_(8.0)
        draft.lm_head.weight.mul_(8.0)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    sampling = SamplingConfig(temperature=0.6, top_p=0.9)
    exact = exact_three_token_distribution(target, prompt, sampling)
    n_samples = 1500
    counts = dict.fromkeys(exact, 0)
    depths = 0
    for seed in range(n_samples):
        result = run(target, draft, prompt, max_new_tokens=3, sampling=sampling, seed=seed, budget=16,
                     max_n_beams=8, max_branch_width=4, draft_cost=0.0)
        tokens = tuple(result.token_ids)
        assert tokens in counts, f"{tokens} has probability 0 under the target"
        counts[tokens] += 1
        depths += result.stats.draft_passes
    assert depths / n_samples > 2.5  # the trees did grow past the first level
    pvalue, cells = pooled_chisquare(exact, counts)
    assert cells >= 3 and math.isclose(sum(exact.values()), 1.0, rel_tol=1e-6)
    assert pvalue > ALPHA
