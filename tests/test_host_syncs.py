"""The host-sync budget of the decoding loop: at most one sync per draft pass plus a few per iteration
(and one per visited node when validation samples). Counted on CPU with tests/sync_counter.py, which
flags every op that would make the host wait for a CUDA device; with --device cuda (or
SPECEXEC_TEST_DEVICE=cuda) the same budgets are also checked on the GPU, counted by torch's CUDA sync
debug mode."""

from __future__ import annotations

import pytest
import torch
from conftest import selected_device
from sync_counter import count_cuda_syncs, count_syncs
from tiny_pairs import tiny_pair

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.generate import generate
from specexec_cli.decoding.specinfer import distinct_children

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cuda]

PER_ITERATION = 4  # commit: the path to the device and the processed length back; validation: its table;
# the new tokens appended to the sequence
FIRST_PASS = 1 + 2 * (3 + 1)  # the prompt tensor; transformers' first K and V allocation per layer
# (torch.tensor([]) in DynamicLayer) of the 3-layer target and the 1-layer draft


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def pair(request):
    """The tiny pair on each counted device: CPU (every op that would sync on CUDA), and CUDA itself when
    selected (float32 there: the syncs do not depend on the dtype)."""
    if request.param == "cuda" and selected_device(request.config) != "cuda":
        pytest.skip("CUDA sync counts need --device cuda (or SPECEXEC_TEST_DEVICE=cuda)")
    if request.param == "cpu":
        return tiny_pair("llama"), count_syncs
    target, draft = tiny_pair("llama", dtype=torch.float32)
    return (target.cuda(), draft.cuda()), count_cuda_syncs


def run_counted(pair, method: str, sampling: SamplingConfig):
    (target, draft), counting = pair
    # draft_cost 0: depth is free, so growth runs every pass the cap allows (not what timing says)
    tree = TreeConfig(budget=16, max_n_beams=4, max_beam_len=4, max_branch_width=4, draft_cost=0.0)
    config = GenerationConfig(method=method, max_new_tokens=20, sampling=sampling, tree=tree, seed=0)
    with counting() as syncs:
        result = generate(target, None if method == "autoregressive" else draft,
                          torch.tensor([[5, 17, 3, 99]]), config)
    return result, syncs


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_greedy_tree_methods_sync_once_per_draft_pass(pair, method):
    result, syncs = run_counted(pair, method, SamplingConfig())
    stats = result.stats
    assert stats.draft_passes > 2 * stats.iterations  # tree growth really ran several passes
    budget = stats.draft_passes + PER_ITERATION * stats.iterations + FIRST_PASS
    assert syncs.total <= budget, dict(syncs.counts)
    assert syncs.counts["bool_mask_index"] + syncs.counts["unique"] <= stats.draft_passes
    assert syncs.total > 0  # the counter sees the walk's one transfer per iteration at least


def test_sampled_specexec_adds_one_sync_per_visited_node(pair):
    result, syncs = run_counted(pair, "specexec", SamplingConfig(temperature=0.8))
    stats = result.stats
    budget = stats.draft_passes + PER_ITERATION * stats.iterations + result.n_new_tokens + FIRST_PASS
    assert syncs.total <= budget, dict(syncs.counts)


def test_autoregressive_syncs_a_few_times_per_token(pair):
    result, syncs = run_counted(pair, "autoregressive", SamplingConfig())
    assert syncs.total <= 2 * result.stats.iterations + FIRST_PASS, dict(syncs.counts)


def test_sync_counter_sees_each_kind():
    x = torch.arange(6)
    with torch.inference_mode(), count_syncs() as syncs:
        x[x > 2], int(x[0]), x.tolist(), torch.tensor([1, 2]), x.nonzero(), bool(x[1])
        x[2] = 7  # a Python scalar into a tensor: no sync
    assert dict(syncs.counts) == {"bool_mask_index": 1, "scalar": 2, "tolist": 1, "tensor_from_host": 1,
                                  "nonzero": 1}


def test_distinct_children_keeps_first_occurrence_order():
    stem_at = torch.tensor([3, 3, 4, 3, 4, 3])
    samples = torch.tensor([9, 2, 9, 9, 9, 7])
    parents, tokens, child = distinct_children(stem_at, samples, vocab=10)
    assert list(zip(parents.tolist(), tokens.tolist(), strict=True)) == [(3, 9), (3, 2), (4, 9), (3, 7)]
    assert child.tolist() == [0, 1, 2, 0, 2, 3]
