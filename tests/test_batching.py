"""Batched decoding (several prompts share each target pass): every prompt's output equals its output
run alone, greedy and sampled; sampled first tokens follow the target's distribution; the packed caches
hold exactly each prompt's committed tokens."""

from __future__ import annotations

import pytest
import torch
from test_sampling import ALPHA, exact_two_token_distribution, pooled_chisquare
from tiny_pairs import tiny_pair

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.forward import causal_pattern, forward, new_cache
from specexec_cli.decoding.generate import GenerationResult, generate, make_decoder
from specexec_cli.decoding.lanes import Lane
from specexec_cli.decoding.runner import generate_many
from specexec_cli.decoding.sampling import TokenDraws

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("specexec", "specinfer", "autoregressive")
EOS = (59, 24)  # each ends one prompt's plain greedy output early
STOP = "w115 w31"  # a stop string that ends another one
# Very different lengths: 1 token to 40.
PROMPTS = [
    [5],
    [17, 3, 99, 42, 8, *range(10, 45)],
    [3, 14, 15],
    [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2],
    [100, 101],
    [1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89],
    [60, 61, 62, 63, 64, 65, 66],
    [27],
    [31, 41, 59, 26, 53, 58, 97, 93, 23, 84, 62, 64, 33, 83, 27],
]


def decode(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


GREEDY = SamplingConfig()


def config_for(method: str, sampling: SamplingConfig = GREEDY, seed: int | None = None,
               max_new_tokens: int = 20) -> GenerationConfig:
    tree = TreeConfig(budget=24, max_n_beams=6, max_beam_len=4, max_branch_width=4)
    return GenerationConfig(method=method, max_new_tokens=max_new_tokens, sampling=sampling, tree=tree,
                            eos_token_ids=EOS, stop_strings=(STOP,), seed=seed)


def run_batched(target, draft, prompts, config, batch_size) -> tuple[list[GenerationResult], list[int]]:
    """Results in input order, and the order in which prompts finished."""
    results: dict[int, GenerationResult] = {}
    finished: list[int] = []

    def keep(index: int, result: GenerationResult) -> None:
        results[index] = result
        finished.append(index)

    generate_many(target, draft, [torch.tensor(p) for p in prompts], config, keep, batch_size=batch_size,
                  decode=decode)
    return [results[i] for i in range(len(prompts))], finished


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("llama", vocab=128)


@pytest.fixture(scope="module")
def alone_greedy(pair):
    """Plain greedy decoding of each prompt alone: the reference every method and batch must equal."""
    target, _ = pair
    return [generate(target, None, torch.tensor(p), config_for("autoregressive"), decode=decode)
            for p in PROMPTS]


def test_the_prompts_exercise_every_stop_condition(alone_greedy):
    reasons = {r.finish_reason for r in alone_greedy}
    assert reasons == {"stop", "length"}
    assert sum(r.token_ids[-1] in EOS for r in alone_greedy) >= 2, "prompts must stop at EOS"
    by_string = [r for r in alone_greedy if r.finish_reason == "stop" and r.token_ids[-1:] != [] and
                 r.token_ids[-1] not in EOS]
    assert by_string, "some prompt must stop at the stop string"
    assert len({r.n_new_tokens for r in alone_greedy}) >= 3


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_batch_equals_each_prompt_alone(pair, alone_greedy, method, batch_size):
    target, draft = pair
    batched, finished = run_batched(target, draft, PROMPTS, config_for(method), batch_size)
    for prompt, alone, result in zip(PROMPTS, alone_greedy, batched, strict=True):
        assert result.token_ids == alone.token_ids, prompt
        assert (result.text, result.finish_reason) == (alone.text, alone.finish_reason)
    assert sorted(finished) == list(range(len(PROMPTS)))
    if batch_size > 1:  # continuous batching: prompts finish out of input order
        assert finished != sorted(finished)


@pytest.mark.parametrize("method", METHODS)
def test_sampled_output_does_not_depend_on_the_other_prompts(pair, method):
    target, draft = pair
    config = config_for(method, SamplingConfig(temperature=0.9, top_p=0.95), seed=11)
    batched, _ = run_batched(target, draft, PROMPTS, config, batch_size=4)
    for prompt, result in zip(PROMPTS, batched, strict=True):
        alone, _ = run_batched(target, draft, [prompt], config, batch_size=4)
        assert result.token_ids == alone[0].token_ids, prompt


def test_sampled_specexec_equals_sampled_plain_decoding_with_the_same_seed(pair):
    """The token at position t is drawn with the seed's random numbers for t, and SpecExec's tree is
    only a lookup cache: so the sampled output is plain sampling's, token for token."""
    target, draft = pair
    sampling = SamplingConfig(temperature=1.0)
    plain, _ = run_batched(target, draft, PROMPTS, config_for("autoregressive", sampling, seed=5), 1)
    spec, _ = run_batched(target, draft, PROMPTS, config_for("specexec", sampling, seed=5), 3)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.n_target_passes for r in spec) < sum(r.n_target_passes for r in plain)


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_sampled_first_tokens_in_a_batch_follow_the_target(method):
    """Chi-square goodness of fit (alpha = 0.001) of the first two tokens of a prompt decoded together
    with two others, against the target's exact distribution."""
    target, draft = tiny_pair("llama", vocab=12, hidden=32, related=False)
    prompt = [3, 1, 4, 1, 5]
    others = [[2, 7], [9, 9, 9, 1, 2, 3, 4]]
    sampling = SamplingConfig(temperature=0.6, top_p=0.9)
    exact = exact_two_token_distribution(target, torch.tensor([prompt]), sampling)
    n_samples = 1200
    counts = dict.fromkeys(exact, 0)
    tree = TreeConfig(budget=12, max_n_beams=4, max_beam_len=3, max_branch_width=3)
    for seed in range(n_samples):
        config = GenerationConfig(method=method, max_new_tokens=2, sampling=sampling, tree=tree, seed=seed)
        results, _ = run_batched(target, draft, [others[0], prompt, others[1]], config, batch_size=3)
        tokens = tuple(results[1].token_ids)
        assert tokens in counts, f"{tokens} has probability 0 under the target"
        counts[tokens] += 1
    pvalue, cells = pooled_chisquare(exact, counts)
    assert cells >= 3
    assert pvalue > ALPHA


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_packed_caches_hold_each_lanes_committed_tokens(pair, method):
    """After every iteration, and after a lane leaves, each lane's slots in both caches equal a fresh
    prefill of its committed tokens, in order; a finished lane's slots are gone."""
    target, draft = pair
    config = config_for(method, max_new_tokens=64)
    decoder = make_decoder(target, draft, config, max_lanes=3)
    cpu = torch.device("cpu")
    lanes = [Lane(key=k, sequence=torch.tensor(p), draws=TokenDraws(0, cpu))
             for k, p in enumerate([PROMPTS[1], PROMPTS[0], PROMPTS[3]])]
    for iteration in range(5):
        for lane, emitted in zip(lanes, decoder.step(lanes), strict=True):
            lane.extend(emitted)
        if iteration == 2:
            decoder.remove(lanes.pop(1))
        for model, packed, seen in ((target, decoder.target_cache, "target_seen"),
                                    (draft, decoder.draft_cache, "draft_seen")):
            assert packed.length == sum(getattr(lane, seen) for lane in lanes)
            for lane in lanes:
                n = getattr(lane, seen)
                slots = (packed.owner == lane.key).nonzero().squeeze(1)
                assert slots.numel() == n
                fresh = new_cache()
                with torch.no_grad():
                    forward(model, fresh, lane.sequence[:n], torch.arange(n), causal_pattern(0, n, "cpu"))
                for kept, ref in zip(packed.cache.layers, fresh.layers, strict=True):
                    torch.testing.assert_close(kept.keys[:, :, slots], ref.keys)
                    torch.testing.assert_close(kept.values[:, :, slots], ref.values)


def test_a_bad_prompt_fails_after_the_earlier_results_were_delivered(pair):
    target, draft = pair
    delivered = []
    prompts = [torch.tensor(PROMPTS[0]), torch.tensor(PROMPTS[2]), torch.tensor([], dtype=torch.long)]
    with pytest.raises(Exception, match="empty"):
        generate_many(target, draft, prompts, config_for("specexec", max_new_tokens=3),
                      lambda index, result: delivered.append(index), batch_size=2, decode=decode)
    assert sorted(delivered) == [0, 1]


@pytest.mark.parametrize("method", ["specexec", "autoregressive", "specinfer"])
def test_lanes_with_their_own_sampling_share_passes(pair, method):
    """A server's requests: greedy and sampled lanes, each with its own temperature, top-p, top-k and
    seed, decoded in one batch. Greedy lanes equal their greedy output alone; sampled lanes equal their
    seeded output alone (SpecExec and plain decoding draw position t with the lane's draw for t; a
    SpecInfer lane's stems depend on its batch, so only its greedy lanes are compared)."""
    from specexec_cli.decoding.generate import Batch

    target, draft = pair
    base = config_for(method)
    samplings = [GREEDY, SamplingConfig(0.7, 0.9), SamplingConfig(1.3, 1.0, 20), GREEDY, SamplingConfig(0.5)]
    configs = [config_for(method, sampling, seed=11 + i) for i, sampling in enumerate(samplings)]
    batch = Batch(make_decoder(target, draft if method != "autoregressive" else None, base, len(configs)))
    runs = [batch.start(i, torch.tensor(PROMPTS[i]), config, decode) for i, config in enumerate(configs)]
    results: dict[int, GenerationResult] = {}
    while batch.runs:
        for run in batch.step():
            results[run.index] = run.result(batch.stats)
    assert sorted(results) == [run.index for run in runs]
    for i, config in enumerate(configs):
        if method == "specinfer" and not config.sampling.greedy:
            continue
        alone = generate(target, draft if method != "autoregressive" else None, torch.tensor([PROMPTS[i]]),
                         config, decode=decode)
        assert results[i].token_ids == alone.token_ids, (i, config.sampling)
