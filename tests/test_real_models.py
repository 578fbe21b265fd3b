"""Exactness on a real trained model: SmolLM2-135M as target, its first 24 of 30 layers as the draft.

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
