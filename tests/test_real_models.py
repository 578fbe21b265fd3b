"""Exactness on real trained models: SmolLM2-135M as target with its first 24 of 30 layers as the
draft, and the bundled Qwen pair with the 1.5B target streamed from disk under a memory cap.

(Early exits of SmolLM2 are weak drafts: on its own chat output the 24-layer exit agrees with the full
model's top-1 token about 25% of the time, so these tests check exactness, not speed.)
"""

from __future__ import annotations

import pytest
import torch

from specexec_cli.decoding.config import GenerationConfig, TreeConfig
from specexec_cli.decoding.generate import generate
from specexec_cli.decoding.runner import generate_many
from specexec_cli.models.load import eos_token_ids, make_early_exit_draft
from specexec_cli.prompts import encode_prompt

pytestmark = pytest.mark.slow
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smol(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([encode_prompt(tokenizer, "Name three uses of a hash map.", None, True)])
    eos = eos_token_ids(model, tokenizer)
    config = GenerationConfig(method="autoregressive", max_new_tokens=NEW_TOKENS, eos_token_ids=eos)
    reference = generate(model, None, ids, config)
    return model, make_early_exit_draft(model, 24), ids, eos, reference


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
@pytest.mark.parametrize("budget", [1, 8, 64, 512])
def test_greedy_equals_plain_decoding_on_smollm2(smol, method, budget):
    target, draft, ids, eos, reference = smol
    # SpecInfer: 128 stems of length budget // 128 keep its draft passes few on this CPU.
    tree = TreeConfig(budget=budget, max_n_beams=128 if method == "specinfer" else 16, max_beam_len=8,
                      max_branch_width=8)
    config = GenerationConfig(method=method, tree=tree, max_new_tokens=NEW_TOKENS, eos_token_ids=eos)
    result = generate(target, draft, ids, config)
    assert result.token_ids == reference.token_ids
    assert result.n_target_passes <= reference.n_target_passes


def test_streamed_specexec_on_the_bundled_pair_equals_plain_decoding():
    """The capped disk tier (every layer read from the float16 files per pass, computed in float32)
    gives plain greedy decoding's tokens, for SpecExec on top of it as for plain decoding itself."""
    from specexec_cli.models import bundled
    from specexec_cli.models.load import load_model
    from specexec_cli.runtime.target import load_offloaded_target

    if not (bundled.is_installed("qwen2.5-coder-0.5b") and bundled.is_installed("qwen2.5-coder-1.5b")):
        pytest.skip("the bundled Qwen part packages are not installed")
    draft, _ = load_model("qwen2.5-coder-0.5b", dtype=torch.float32)
    resident, tokenizer = load_model("qwen2.5-coder-1.5b", dtype=torch.float32)
    prompt = "Write a Python function that reverses a list."
    ids = torch.tensor([encode_prompt(tokenizer, prompt, None, True)])
    eos = eos_token_ids(resident, tokenizer)
    plain = GenerationConfig(method="autoregressive", max_new_tokens=12, eos_token_ids=eos)
    reference = generate(resident, None, ids, plain)
    del resident
    streamed = load_offloaded_target(bundled.bundled_folder("qwen2.5-coder-1.5b"), device="cpu",
                                     dtype=torch.float32, offload="auto", resident_layers=None, budget=16,
                                     context_len=256, draft=draft, max_memory={"cpu": 9 << 29})  # 4.5 GiB
    engine = streamed.offload_engine
    assert engine.plan.offload == "disk" and len(engine.streamed) >= 20  # the cap forces streaming
    tree = TreeConfig(budget=16, max_n_beams=16, max_beam_len=8, max_branch_width=8)
    config = GenerationConfig(method="specexec", tree=tree, max_new_tokens=12, eos_token_ids=eos)
    result = generate(streamed, draft, ids, config)
    assert result.token_ids == reference.token_ids
    assert result.n_target_passes < reference.n_target_passes
    engine.close()
    # the quick start's int8 draft: less memory, so more target layers resident under a larger cap,
    # and still exactly the target's tokens
    from specexec_cli.runtime.int8_cpu import quantize_draft_int8

    int8 = quantize_draft_int8(draft)
    capped = load_offloaded_target(bundled.bundled_folder("qwen2.5-coder-1.5b"), device="cpu",
                                   dtype=torch.float32, offload="disk", resident_layers=None, budget=16,
                                   context_len=256, draft=int8, max_memory={"cpu": 5 << 30})
    assert 0 < len(capped.offload_engine.streamed) < 10  # most layers fit beside the int8 draft
    result = generate(capped, int8, ids, config)
    assert result.token_ids == reference.token_ids
    assert result.n_target_passes < reference.n_target_passes
    capped.offload_engine.close()


BATCH_PROMPTS = [
    "Reply with the single word OK.",
    "Name three uses of a hash map.",
    "Here is a long story. " + "Once upon a time a fox lived by a river and watched the boats. " * 12
    + "Summarize the story in one sentence.",
    "What is 2 + 2?",
    "Write a haiku about autumn leaves.",
    "List the planets of the solar system, one per line.",
    "Explain recursion to a child. Use two short paragraphs.",
    "Translate 'good morning' into French.",
]


@pytest.mark.parametrize("method", ["specexec", "specinfer", "autoregressive"])
def test_batched_greedy_equals_each_prompt_alone_on_smollm2(smollm2, method):
    """Prompts of 8 to 190 tokens, decoded 1, 3 and 8 at a time through one packed target pass, give
    each prompt's own output token for token, with EOS, a stop string and the token limit all hit."""
    model, tokenizer = smollm2
    draft = make_early_exit_draft(model, 24) if method != "autoregressive" else None
    prompts = [torch.tensor(encode_prompt(tokenizer, p, None, True)) for p in BATCH_PROMPTS]
    tree = TreeConfig(budget=32, max_n_beams=16, max_beam_len=6, max_branch_width=8)
    config = GenerationConfig(method=method, tree=tree, max_new_tokens=24,
                              eos_token_ids=eos_token_ids(model, tokenizer), stop_strings=("\n\n",))
    decode = tokenizer.decode
    alone = {}
    generate_many(model, draft, prompts, config, lambda i, r: alone.__setitem__(i, r), decode=decode)
    assert {alone[i].finish_reason for i in alone} == {"stop", "length"}
    for batch_size in (3, 8):
        batched = {}
        generate_many(model, draft, prompts, config, lambda i, r, out=batched: out.__setitem__(i, r),
                      batch_size=batch_size, decode=decode)
        for i in range(len(prompts)):
            assert batched[i].token_ids == alone[i].token_ids, (method, batch_size, i)
            assert batched[i].text == alone[i].text
            assert batched[i].finish_reason == alone[i].finish_reason


def test_batched_bundled_pair_equals_each_prompt_alone():
    """The bundled Qwen pair, resident, three prompts of different lengths in one batch."""
    from specexec_cli.models import bundled
    from specexec_cli.models.load import load_model

    if not (bundled.is_installed("qwen2.5-coder-0.5b") and bundled.is_installed("qwen2.5-coder-1.5b")):
        pytest.skip("the bundled Qwen part packages are not installed")
    draft, _ = load_model("qwen2.5-coder-0.5b", dtype=torch.float32)
    target, tokenizer = load_model("qwen2.5-coder-1.5b", dtype=torch.float32)
    texts = ["Write a Python function that reverses a list.", "What does `git rebase` do?",
             "Explain this code: " + "x = [i * i for i in range(10)]\n" * 6]
    prompts = [torch.tensor(encode_prompt(tokenizer, t, None, True)) for t in texts]
    tree = TreeConfig(budget=24, max_n_beams=16, max_beam_len=6, max_branch_width=8)
    config = GenerationConfig(method="specexec", tree=tree, max_new_tokens=10,
                              eos_token_ids=eos_token_ids(target, tokenizer))
    plain = GenerationConfig(method="autoregressive", max_new_tokens=10, eos_token_ids=config.eos_token_ids)
    reference = [generate(target, None, ids, plain).token_ids for ids in prompts]
    batched = {}
    stats = generate_many(target, draft, prompts, config, lambda i, r: batched.__setitem__(i, r),
                          batch_size=3)
    assert [batched[i].token_ids for i in range(3)] == reference
    assert stats.target_passes < 10
