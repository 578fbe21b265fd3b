"""Greedy SpecExec and SpecInfer in 16-bit equal plain decoding up to near-ties (docs/algorithm.md,
"Exactness in 16-bit"), with a resident, a RAM-streamed and a GPTQ (act-order) RAM-streamed target;
plus the checker's own tests.

The pairs are trained for a few seconds on a fixed Markov text (tests/tiny_pairs.trained_pair), so
their logits are peaked like a trained model's: a near-tie is then a real tie, and a mismatch at a clear
margin is a real mismatch rather than rounding noise on nearly uniform logits.

The 16-bit cases run on CPU in bf16 by default, and on CUDA in bf16 and fp16 with --device cuda.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from exactness_helpers import (
    compare_near_ties,
    greedy_reference,
    near_tie_epsilon,
    relative_margin,
)
from test_quant import write_gptq_checkpoint
from tiny_pairs import tiny_pair, trained_pair

from specexec_cli.decoding.config import GenerationConfig, TreeConfig
from specexec_cli.decoding.generate import generate
from specexec_cli.runtime.plan import HardwareFacts

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the checker --------------------------------------------------------------------------------


def table_reference(table: dict[tuple[int, ...], tuple[int, float]]):
    """A fake plain decoder: the next token and margin for each prefix (default: token 0, margin 1)."""

    def run(prefix, n):
        tokens, margins, prefix = [], [], list(prefix)
        for _ in range(n):
            token, margin = table.get(tuple(prefix), (0, 1.0))
            tokens.append(token)
            margins.append(margin)
            prefix.append(token)
        return tokens, margins

    return run


def test_identical_output_passes_without_near_ties():
    report = compare_near_ties(table_reference({}), [7], [0, 0, 0], epsilon=0.1)
    assert report.ok and report.near_ties == [] and report.restarts == 0


def test_a_difference_at_a_near_tie_restarts_from_the_committed_prefix():
    # plain decoding gives 0 after [7, 0], but only by 0.01; after the candidate's 5 it continues with 3
    table = {(7, 0): (0, 0.01), (7, 0, 5): (3, 1.0), (7, 0, 5, 3): (4, 1.0)}
    report = compare_near_ties(table_reference(table), [7], [0, 5, 3, 4], epsilon=0.1)
    assert report.ok and report.near_ties == [1] and report.restarts == 1


def test_a_difference_at_a_clear_margin_fails():
    table = {(7, 0): (0, 0.5)}
    report = compare_near_ties(table_reference(table), [7], [0, 5, 0], epsilon=0.1)
    assert not report.ok and report.failure.startswith("step 1:") and "0.5" in report.failure


def test_after_a_restart_the_candidate_must_follow_the_new_reference():
    table = {(7,): (0, 0.01), (7, 5): (3, 1.0)}  # near-tie at step 0, then plain decoding says 3
    report = compare_near_ties(table_reference(table), [7], [5, 4], epsilon=0.1)
    assert not report.ok and report.near_ties == [0] and report.failure.startswith("step 1:")


def test_epsilon_and_margin_definitions():
    assert near_tie_epsilon(torch.bfloat16) == 2.0**-4
    assert near_tie_epsilon(torch.float16) == 2.0**-7
    assert near_tie_epsilon(torch.float32) == near_tie_epsilon(torch.float64) == 0.0
    assert relative_margin(torch.tensor([0.5, 0.25, -3.0])) == 0.25  # |l1| < 1: absolute
    assert relative_margin(torch.tensor([-1.0, 20.0, 18.0])) == pytest.approx(0.1)  # relative to |l1| = 20


def test_greedy_reference_is_plain_decoding():
    target, _ = tiny_pair("qwen2")
    prompt = [5, 17, 3, 99]
    tokens, margins = greedy_reference(target)(prompt, 12)
    plain = generate(target, None, torch.tensor([prompt]),
                     GenerationConfig(method="autoregressive", max_new_tokens=12))
    assert tokens == plain.token_ids and len(margins) == 12 and all(m >= 0 for m in margins)


# --- 16-bit SpecExec / SpecInfer ----------------------------------------------------------------

ROOMY = HardwareFacts(device_mem_free=8 << 30, host_ram_available=8 << 30, disk_free=1 << 40, unified=True)
PROMPTS = ([5, 17, 3, 99, 42], [250, 7, 7, 31, 160, 2, 88, 9, 64])


def target_for(kind: str, device: str, dtype: torch.dtype, folder: Path) -> tuple[torch.nn.Module,
                                                                                  torch.nn.Module]:
    """The trained tiny target resident, streamed from RAM, or rounded to a GPTQ checkpoint (act-order,
    4 bits) streamed from RAM, with its trained draft; all in `dtype` on `device`."""
    from specexec_cli.runtime.target import load_offloaded_target

    target, draft = trained_pair("llama", vocab=320, dtype=dtype)
    draft = draft.to(device)
    hardware = ROOMY if device == "cpu" else None
    if kind == "resident":
        return target.to(device), draft
    if kind == "gptq-streamed":
        write_gptq_checkpoint(target.float(), folder / "gptq", folder / "dense", group_size=32, desc_act=True,
                              round_weights=True)
        streamed = load_offloaded_target(folder / "gptq", device=device, dtype=dtype, offload="ram",
                                         resident_layers=0, hardware=hardware)
    else:
        streamed = load_offloaded_target(target, device=device, offload="ram", buffers=2, resident_layers=0,
                                         hardware=hardware)
    assert streamed.dtype == dtype and streamed.offload_engine.streamed == [0, 1, 2]
    return streamed, draft


def test_the_16bit_pairs_are_peaked_like_a_trained_model():
    """What makes a clear-margin mismatch a real one: plain decoding of the trained target is confident
    (its top token takes most of the mass) at nearly every step, in bf16 as in float32, and the draft
    picks the same token most of the time."""
    target, draft = trained_pair("llama", vocab=320, dtype=torch.bfloat16)
    steps = 0
    for prompt in PROMPTS:
        tokens, margins = greedy_reference(target)(prompt, 24)
        steps += len(margins)
        ties = [m for m in margins if m < near_tie_epsilon(torch.bfloat16)]
        assert len(ties) <= 1, margins
        with torch.inference_mode():
            ids = torch.tensor([prompt + tokens])
            top = target(input_ids=ids).logits[0, len(prompt) - 1:-1].float().softmax(-1).max(-1).values
            agree = (draft(input_ids=ids).logits.argmax(-1) == target(input_ids=ids).logits.argmax(-1))
        assert float(top.mean()) > 0.7
        assert float(agree[0, len(prompt) - 1:].float().mean()) > 0.7
    assert steps == 24 * len(PROMPTS)


@pytest.mark.parametrize("kind", ["resident", "ram-streamed", "gptq-streamed"])
@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_16bit_greedy_equals_plain_decoding_up_to_near_ties(device_dtype, kind, method, tmp_path):
    device, dtype = device_dtype
    target, draft = target_for(kind, device, dtype, tmp_path)
    reference = greedy_reference(target)
    beams = 8 if method == "specinfer" else 4
    tree = TreeConfig(budget=32, max_n_beams=beams, max_beam_len=4, max_branch_width=4)
    config = GenerationConfig(method=method, max_new_tokens=24, tree=tree, seed=0)
    for prompt in PROMPTS:
        result = generate(target, draft, torch.tensor([prompt]), config)
        # no EOS id is set: every case must produce all its tokens (an empty output compares equal)
        assert result.n_new_tokens == config.max_new_tokens and result.finish_reason == "length"
        report = compare_near_ties(reference, prompt, result.token_ids, near_tie_epsilon(dtype))
        assert report.ok, report.failure
        assert len(report.near_ties) <= 1  # peaked logits: a near-tie is rare; more is a real disagreement
        assert result.n_target_passes <= result.n_new_tokens
        if method == "specexec":  # SpecInfer's temperature-1 stems rarely hit a tiny model's argmax
            assert result.n_target_passes < result.n_new_tokens
    if kind != "resident":
        target.offload_engine.close()
