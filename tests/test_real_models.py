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
    from specexec_cli.runtime.offload import load_offloaded_target

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
                                     context_len=256, draft=draft, max_memory={"cpu": 5 << 30})
    engine = streamed.offload_engine
    assert engine.plan.offload == "disk" and len(engine.streamed) >= 20  # the cap forces streaming
    tree = TreeConfig(budget=16, max_n_beams=16, max_beam_len=8, max_branch_width=8)
    config = GenerationConfig(method="specexec", tree=tree, max_new_tokens=12, eos_token_ids=eos)
    result = generate(streamed, draft, ids, config)
    assert result.token_ids == reference.token_ids
    assert result.n_target_passes < reference.n_target_passes
    engine.close()
