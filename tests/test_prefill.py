"""Chunked prefill: a prompt that joins while others decode enters in pieces that ride in their passes.
The output is each prompt's own (equal to the prompt decoded alone, greedy and seeded sampling), the
runs already decoding emit tokens in every pass of the joiner's prefill, and the piece size follows the
measured pass times."""

from __future__ import annotations

import pytest
import torch
from tiny_pairs import tiny_pair

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.generate import Batch, generate, make_decoder
from specexec_cli.decoding.lanes import Lane
from specexec_cli.decoding.prefill import MIN_CHUNK, UNTIMED_CHUNK, chunk_budget, plan_pieces
from specexec_cli.decoding.sampling import TokenDraws
from specexec_cli.decoding.stats import PassStats
from specexec_cli.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("specexec", "specinfer", "autoregressive")
EARLY = [[5, 9, 2], [17, 3, 99, 42]]  # decoding before the long prompts arrive
GREEDY = SamplingConfig()
LONG = [list(range(4, 124)), [(7 * i) % 120 + 4 for i in range(90)]]  # 120 and 90 tokens


def config_for(method: str, chunk: int | None, sampling: SamplingConfig = GREEDY,
               seed: int | None = None, max_new_tokens: int = 24) -> GenerationConfig:
    tree = TreeConfig(budget=24, max_n_beams=6, max_beam_len=4, max_branch_width=4)
    return GenerationConfig(method=method, max_new_tokens=max_new_tokens, sampling=sampling, tree=tree,
                            seed=seed, prefill_chunk=chunk)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("llama", vocab=128)


def run_with_joiners(pair, config: GenerationConfig, join_after: int = 2):
    """Start EARLY, step `join_after` times, then add LONG; step to the end. Returns the token ids of
    every prompt (EARLY then LONG) and, per step after the join, (tokens the EARLY runs took, whether a
    LONG run had still not entered its whole prompt after it)."""
    target, draft = pair
    batch = Batch(make_decoder(target, draft, config, 4))
    runs = [batch.start(i, torch.tensor(p), config) for i, p in enumerate(EARLY)]
    for _ in range(join_after):
        batch.step()
    runs += [batch.start(len(EARLY) + i, torch.tensor(p), config) for i, p in enumerate(LONG)]
    steps = []
    while batch.runs:
        before = sum(len(run.new_tokens) for run in runs[: len(EARLY)])
        batch.step()
        entering = any(not run.decoding for run in runs[len(EARLY):])
        steps.append((sum(len(run.new_tokens) for run in runs[: len(EARLY)]) - before, entering))
    return [run.new_tokens for run in runs], steps


@pytest.mark.parametrize("method", METHODS)
def test_greedy_output_with_pieces_equals_each_prompt_alone(pair, method):
    target, draft = pair
    config = config_for(method, chunk=16)
    tokens, steps = run_with_joiners(pair, config)
    for prompt, got in zip(EARLY + LONG, tokens, strict=True):
        alone = generate(target, None, torch.tensor(prompt), config_for("autoregressive", 0))
        assert got == alone.token_ids, prompt
    prefill_steps = [taken for taken, entering in steps if entering]
    # 120 + 90 prompt tokens, 16 per pass: the long prompts take many passes to enter ...
    assert len(prefill_steps) >= (119 + 89) // 16 - 1
    # ... and the early runs, while they still run, get tokens in every one of them
    early_left = max(len(t) for t in tokens[: len(EARLY)]) - 2 * 1
    assert all(taken > 0 for taken in prefill_steps[: min(len(prefill_steps), early_left // 4)])


@pytest.mark.parametrize("method", ["specexec", "autoregressive"])
def test_seeded_sampling_with_pieces_equals_the_prompt_entered_whole(pair, method):
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    chunked, _ = run_with_joiners(pair, config_for(method, 16, sampling, seed=3))
    whole, steps = run_with_joiners(pair, config_for(method, 0, sampling, seed=3))
    assert chunked == whole
    assert sum(entering for _, entering in steps) == 0  # chunk 0: every prompt enters whole at once


def test_a_lone_prompt_enters_whole_in_its_first_pass(pair):
    target, draft = pair
    config = config_for("specexec", chunk=8)
    batch = Batch(make_decoder(target, draft, config, 2))
    run = batch.start(0, torch.tensor(LONG[0]), config)
    batch.step()
    assert run.decoding and run.new_tokens
    assert batch.decoder.stats.target_passes == 1


def lane(n: int, seen: int = 0) -> Lane:
    draws = TokenDraws(None, torch.device("cpu"))
    return Lane(key=n, sequence=torch.arange(n), draws=draws, target_seen=seen)


def test_plan_pieces_fills_the_budget_in_arrival_order():
    a, b, c = lane(10), lane(50), lane(30)
    joins, pieces = plan_pieces([a, b, c], budget=20)
    assert joins == [a] and [(p.lane, p.end) for p in pieces] == [(b, 11)]  # a's 9, then 11 of b's 49
    assert plan_pieces([a, b, c], None) == ([a, b, c], [])
    joins, pieces = plan_pieces([lane(50, seen=40)], budget=20)
    assert len(joins) == 1 and not pieces  # the last 9 fit: it joins and decodes in this pass


def stats_of(passes: list[tuple[str, int, float]]) -> PassStats:
    stats = PassStats()
    for which, tokens, seconds in passes:
        stats._add(which, tokens, seconds)
    return stats


def test_chunk_budget_from_measured_pass_times():
    assert chunk_budget(PassStats(), 25) == UNTIMED_CHUNK
    # a CPU: 0.1 s fixed + 10 ms per row; a pass of 25 rows takes 0.35 s, so 35 more rows double it
    cpu = stats_of([("target", t, 0.1 + 0.01 * t) for t in (25, 25, 60, 40)])
    assert chunk_budget(cpu, 25) == 35
    assert chunk_budget(cpu, 25, n_joining=3) == 3 * 35  # three prompts waiting: three shares
    # the draft's rows are charged too (each prompt token also goes through the draft)
    both = stats_of([*cpu.history, *[("draft", t, 0.01 + 0.0025 * t) for t in (6, 6, 30)]])
    assert chunk_budget(both, 25) == 28
    # every pass the same size: the line through the origin, 0.35 s / 25 rows
    flat = stats_of([("target", 25, 0.35)] * 5)
    assert chunk_budget(flat, 25) == 25
    # a streamed target on a GPU: the read time hides the rows, no limit
    streamed = stats_of([("target", t, 1.5) for t in (25, 200, 900)])
    assert chunk_budget(streamed, 25) is None
    # plain decoding of 2 lanes, all time in the rows: never fewer than MIN_CHUNK prompt tokens a pass
    assert chunk_budget(stats_of([("target", 2, 0.2), ("target", 3, 0.3)]), 2) == MIN_CHUNK


def test_a_negative_prefill_chunk_is_a_usage_error():
    with pytest.raises(UsageError, match="--prefill-chunk"):
        config_for("specexec", chunk=-1).validate()
