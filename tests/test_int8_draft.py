"""The int8 CPU draft (runtime/int8_cpu.py): close to its float32 self, less than half its memory, counted
by the memory plan, and, as any draft, unable to change the output: greedy SpecExec with it equals plain
decoding of the target, and a seeded sampled run equals seeded plain sampling."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_cli_pair
from tiny_pairs import tiny_pair

from specexec_cli.cli import main
from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.generate import generate
from specexec_cli.engine import Machine, resolve
from specexec_cli.errors import UsageError
from specexec_cli.runtime import int8_cpu
from specexec_cli.runtime.target import model_bytes

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int8_cpu.available(), reason="no dynamic int8 linear in this torch")]


def float32_pair(tied: bool = False):
    target, draft = tiny_pair("llama", vocab=320, hidden=128, dtype=torch.float32)
    if tied:
        draft.lm_head.weight = draft.model.embed_tokens.weight
    return target, draft


def test_int8_linear_is_close_to_float32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    x = torch.randn(7, 3, 256)
    want = linear(x)
    got = int8_cpu.Int8Linear(linear)(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 0.02


def test_the_embedding_gathers_the_rows_the_tied_head_computes_with():
    _, draft = float32_pair(tied=True)
    weight = draft.model.embed_tokens.weight.detach().clone()
    q = int8_cpu.quantize_draft_int8(copy.deepcopy(draft))
    ids = torch.tensor([[5, 17, 3, 319]])
    rows = q.model.embed_tokens(ids)[0]  # [4, H]
    assert (rows - weight[ids[0]]).abs().max() <= weight.abs().max() / 127  # within one int8 step
    # the head multiplies by those same rows: logits of a one-hot "hidden state" are the rows' entries
    head = q.lm_head(torch.eye(128))  # [128, V]: column v is row v of the (dequantized) table
    torch.testing.assert_close(head[:, ids[0]].t(), rows, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_the_draft_is_smaller_and_still_predicts_like_itself(tied):
    _, draft = float32_pair(tied)
    before = model_bytes(draft)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = draft(ids).logits.argmax(-1)
    q = int8_cpu.quantize_draft_int8(copy.deepcopy(draft))
    after = model_bytes(q)  # parameters, buffers and the packed int8 weights
    assert int8_cpu.packed_bytes(q) > 0 and after < before / 2
    with torch.inference_mode():
        got = q(ids).logits.argmax(-1)
    assert (got == want).float().mean() > 0.8


@pytest.mark.parametrize("method", ["specexec", "specinfer"])
def test_greedy_output_with_an_int8_draft_is_plain_decoding(method):
    target, draft = float32_pair()
    q = int8_cpu.quantize_draft_int8(draft)
    tree = TreeConfig(budget=24, max_n_beams=4, max_beam_len=4, max_branch_width=4)
    for prompt in ([5, 17, 3, 99], [250, 7, 7, 31, 160, 2]):
        ids = torch.tensor([prompt])
        plain = generate(target, None, ids, GenerationConfig(method="autoregressive", max_new_tokens=20))
        spec = generate(target, q, ids, GenerationConfig(method=method, max_new_tokens=20, tree=tree))
        assert spec.token_ids == plain.token_ids and len(spec.token_ids) == 20
        if method == "specexec":
            assert spec.n_target_passes < spec.n_new_tokens  # the int8 draft's guesses were accepted


def test_seeded_sampling_with_an_int8_draft_is_seeded_plain_sampling():
    target, draft = float32_pair()
    q = int8_cpu.quantize_draft_int8(draft)
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)
    tree = TreeConfig(budget=16, max_n_beams=4, max_beam_len=4, max_branch_width=4)
    ids = torch.tensor([[5, 17, 3, 99]])
    plain = generate(target, None, ids, GenerationConfig(method="autoregressive", max_new_tokens=24,
                                                         sampling=sampling, seed=7))
    spec = generate(target, q, ids, GenerationConfig(method="specexec", max_new_tokens=24, sampling=sampling,
                                                     tree=tree, seed=7))
    assert spec.token_ids == plain.token_ids


def test_int8_is_refused_off_the_cpu_and_for_early_exit_drafts():
    from specexec_cli.settings import EngineRequest

    cpu, gpu = Machine("cpu", False, True), Machine("cuda", True, False)
    with pytest.raises(UsageError, match="runs on a CPU"):
        resolve(EngineRequest(draft_quant="int8"), None, gpu)
    with pytest.raises(UsageError, match="must be one of"):
        resolve(EngineRequest(draft_quant="int4"), None, cpu)
    with pytest.raises(UsageError, match="separate draft"):
        resolve(EngineRequest(draft="first-layers:4", draft_quant="int8"), None, cpu)
    assert resolve(EngineRequest(draft_quant="none"), None, gpu).draft_format == "none"
    # the default: int8 for a separate draft on a CPU with torch's int8 GEMM, float elsewhere
    assert resolve(EngineRequest(), None, cpu).draft_format == "int8"
    assert resolve(EngineRequest(), None, Machine("cpu", False, False)).draft_format == "none"
    assert resolve(EngineRequest(), None, gpu).draft_format == "none"
    assert resolve(EngineRequest(draft="first-layers:4"), None, cpu).draft_format == "none"


def test_generate_with_draft_quant_int8(tmp_path):
    save_tiny_cli_pair(tmp_path)
    base = ["generate", "-t", str(tmp_path / "target"), "--no-chat-template", "--no-profile", "-n", "12",
            "-p", "w5 w17 w3 w99"]
    plain = CliRunner().invoke(main, [*base, "--method", "autoregressive"])
    spec = CliRunner().invoke(main, [*base, "-d", str(tmp_path / "draft"), "--draft-quant", "int8",
                                     "--budget", "8", "--json", "--offload", "ram"])
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.stderr
    assert "loading draft" in spec.stderr and "(int8)" in spec.stderr
    import json

    assert json.loads(spec.stdout)["text"] + "\n" == plain.stdout
    early = CliRunner().invoke(main, [*base, "-d", "first-layers:1", "--draft-quant", "int8"])
    assert early.exit_code == 2 and "needs a separate draft" in early.stderr
