"""4-bit checkpoints made by their real producers (auto-round, compressed-tensors) load exactly.

Each format is made from the same tiny random Qwen2 (hidden 256, so every linear has whole groups of
128) by auto-round's round-to-nearest. Checked: every quantized linear, as the runtime decodes it (read
from the folder, repacked where the format is not GPTQ's, streamed from RAM or disk), equals the
producer's own dequantization bit for bit in float16; greedy SpecExec on each quantized target,
resident (decoded once) and streamed, equals plain decoding of the same checkpoint; an act-order GPTQ
checkpoint (permuted g_idx with its rows) does the same; and the whole model (biases, norms, embeddings,
head too) gives the logits of a dense transformers model holding the producer's dequantized weights.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("auto_round")
pytest.importorskip("compressed_tensors")

from conftest import _word_tokenizer  # noqa: E402
from producers import (  # noqa: E402
    awq_reference,
    compressed_tensors_reference,
    gptq_reference,
    quant_config,
    quantize,
)
from tiny_pairs import tiny_model  # noqa: E402

from specexec_cli.decoding.config import GenerationConfig, TreeConfig  # noqa: E402
from specexec_cli.decoding.generate import generate  # noqa: E402
from specexec_cli.errors import UsageError  # noqa: E402
from specexec_cli.runtime.disk import CheckpointIndex  # noqa: E402
from specexec_cli.runtime.qformat import format_from_dict, read_quant_format  # noqa: E402
from specexec_cli.runtime.target import load_offloaded_target  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, VOCAB = 256, 320
# (auto-round format, symmetric) -> the layout it writes
MADE = {
    ("auto_gptq", False): "gptq",
    ("auto_gptq", True): "gptq",
    ("auto_awq", False): "awq",
    ("auto_round", True): "gptq",  # native format, GPTQ packing (auto_round:auto_gptq)
    ("auto_round", False): "awq",  # native format, AWQ packing (auto_round:auto_awq)
    ("llm_compressor", False): "ct",  # compressed-tensors pack-quantized, its own packer
    ("llm_compressor", True): "ct",
}
IDS = [f"{fmt}-{'sym' if sym else 'asym'}" for fmt, sym in MADE]


def _model() -> torch.nn.Module:
    """The tiny Qwen2, with random biases and norm weights (transformers initializes them to 0 and 1, so
    a loader that dropped them would go unnoticed)."""
    model = tiny_model("qwen2", 2, seed=0, vocab=VOCAB, hidden=HIDDEN, dtype=torch.float32,
                       initializer_range=0.1)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # q/k/v biases and RMSNorm weights
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(format, sym): folder} made by auto-round (about 4 s each)."""
    tokenizer = _word_tokenizer([f"w{i}" for i in range(VOCAB - 4)])
    root = tmp_path_factory.mktemp("producers")
    made = {}
    for fmt, sym in MADE:
        folder = quantize(_model(), tokenizer, root / f"{fmt}-{sym}", fmt, sym)
        tokenizer.save_pretrained(folder)
        made[fmt, sym] = folder
    return made


def _linears(index: CheckpointIndex) -> dict[str, dict[str, torch.Tensor]]:
    """{module prefix: {tensor name: tensor}} of every quantized linear in the folder."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in index.locations:
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "weight_packed"):
            out[prefix] = {k.rpartition(".")[2]: index.read(k) for k in index.locations
                           if k.rpartition(".")[0] == prefix}
    return out


def _reference(layout: str, tensors: dict[str, torch.Tensor], qc: dict, n_in: int) -> torch.Tensor:
    if layout == "awq":
        return awq_reference(tensors, qc["group_size"])
    if layout == "gptq":
        return gptq_reference(tensors, qc["bits"], qc["group_size"], n_in)
    return compressed_tensors_reference(tensors, qc)


@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("made", list(MADE), ids=IDS)
def test_every_linear_decodes_like_its_producer(checkpoints, made, offload, tmp_path):
    folder, layout = checkpoints[made], MADE[made]
    qc = quant_config(folder)
    assert read_quant_format(folder).packing == layout
    model = load_offloaded_target(folder, device="cpu", dtype=torch.float16, offload=offload,
                                  resident_layers=0, offload_dir=tmp_path, budget=0, context_len=64)
    engine = model.offload_engine
    try:
        index = CheckpointIndex(folder)
        linears = _linears(index)
        checked = 0
        for i in range(len(engine.layers)):
            params = engine.layer_state_dict(i)
            for name, weight in params.items():
                prefix = f"model.layers.{i}.{name.removesuffix('.weight')}"
                if prefix not in linears:
                    continue
                expected = _reference(layout, linears[prefix], qc, weight.shape[1])
                assert expected.dtype == torch.float16
                assert torch.equal(weight, expected), prefix
                checked += 1
        index.close()
        assert checked == 2 * 7  # q, k, v, o, gate, up, down in both layers
    finally:
        engine.close()


def _dense_from_producer(folder, layout: str, qc: dict) -> torch.nn.Module:
    """A plain transformers model of the folder's architecture in float16 holding the checkpoint's own
    float tensors (embeddings, norms, biases, head) and, for every quantized linear, the producer's own
    dequantization of it: what the checkpoint means, built without specexec's loader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dense = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float16).eval()
    index = CheckpointIndex(folder)
    linears = _linears(index)
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    with torch.no_grad():
        for name, param in dense.state_dict().items():
            prefix = name.removesuffix(".weight")
            if prefix in linears:
                param.copy_(_reference(layout, linears[prefix], qc, param.shape[1]))
            elif name in index.locations:
                param.copy_(index.read(name))
            else:
                assert name == tied, f"{name}: neither quantized nor stored in {folder.name}"
    index.close()
    if tied:
        dense.tie_weights()
    return dense


@pytest.mark.parametrize("made", list(MADE), ids=IDS)
def test_the_whole_model_computes_like_the_producers_dense_model(checkpoints, made, tmp_path):
    """Not only the quantized linears: logits of the checkpoint loaded by specexec (streamed from RAM)
    equal a dense transformers model holding the producer's dequantized weights and the checkpoint's
    own biases, norms, embeddings and head."""
    folder, layout = checkpoints[made], MADE[made]
    dense = _dense_from_producer(folder, layout, quant_config(folder))
    model = load_offloaded_target(folder, device="cpu", dtype=torch.float16, offload="ram",
                                  resident_layers=0, offload_dir=tmp_path, budget=0, context_len=64)
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 250, 11]])
    try:
        with torch.no_grad():
            ours, theirs = model(input_ids=ids).logits, dense(input_ids=ids).logits
        assert ours.shape == theirs.shape == (1, ids.shape[1], VOCAB)
        gap = (ours.float() - theirs.float()).abs().max().item()
        assert gap <= 0.02, gap  # float16 rounding of two computations in different order: a few ulps
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
        with torch.no_grad():  # the comparison sees the biases: without them the logits move far more
            for layer in dense.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
            unbiased = dense(input_ids=ids).logits
        assert (unbiased.float() - theirs.float()).abs().max().item() > 10 * 0.02
    finally:
        model.offload_engine.close()


def _decode(target, draft, prompt, method: str) -> list[int]:
    tree = TreeConfig(budget=16, max_n_beams=4, max_beam_len=4, max_branch_width=4)
    config = GenerationConfig(method=method, max_new_tokens=20, tree=tree)
    return generate(target, draft if method != "autoregressive" else None, prompt, config).token_ids


@pytest.mark.parametrize("made", list(MADE), ids=IDS)
def test_specexec_on_each_quantized_target_equals_its_plain_decoding(checkpoints, made, tmp_path):
    folder = checkpoints[made]
    draft = tiny_model("qwen2", 1, seed=1, vocab=VOCAB, hidden=HIDDEN, dtype=torch.float32)
    prompt = torch.tensor([[5, 17, 3, 99, 42, 7]])
    resident = load_offloaded_target(folder, device="cpu", dtype=torch.float32, offload="none", budget=16,
                                     context_len=64)
    assert resident.offload_engine.plan.expanded_layers == 2  # decoded once: no per-pass dequantization
    plain = _decode(resident, None, prompt, "autoregressive")
    assert len(plain) == 20
    assert _decode(resident, draft, prompt, "specexec") == plain
    assert _decode(resident, draft, prompt, "specinfer") == plain
    resident.offload_engine.close()
    for offload in ("ram", "disk"):
        streamed = load_offloaded_target(folder, device="cpu", dtype=torch.float32, offload=offload,
                                         resident_layers=0, offload_dir=tmp_path, budget=16, context_len=64)
        assert streamed.offload_engine.plan.expanded_layers == 0
        assert _decode(streamed, None, prompt, "autoregressive") == plain  # same weights, decoded per pass
        assert _decode(streamed, draft, prompt, "specexec") == plain
        streamed.offload_engine.close()


def test_act_order_gptq_checkpoint_decodes_exactly(tmp_path):
    from test_quant import write_gptq_checkpoint

    model = _model()
    expected = write_gptq_checkpoint(copy.deepcopy(model), tmp_path / "gptq", tmp_path / "dense",
                                     group_size=64, desc_act=True)
    assert read_quant_format(tmp_path / "gptq").desc_act
    draft = tiny_model("qwen2", 1, seed=1, vocab=VOCAB, hidden=HIDDEN, dtype=torch.float32)
    prompt = torch.tensor([[5, 17, 3, 99, 42, 7]])
    resident = load_offloaded_target(tmp_path / "gptq", device="cpu", dtype=torch.float32, offload="none",
                                     budget=16, context_len=64)
    for name, weight in resident.offload_engine.layer_state_dict(0).items():
        if f"model.layers.0.{name}" in expected:
            assert torch.equal(weight, expected[f"model.layers.0.{name}"].float()), name
    plain = _decode(resident, None, prompt, "autoregressive")
    streamed = load_offloaded_target(tmp_path / "gptq", device="cpu", dtype=torch.float32, offload="disk",
                                     resident_layers=0, budget=16, context_len=64)
    assert streamed.offload_engine.reads  # GPTQ streams from the checkpoint files in place
    assert _decode(streamed, draft, prompt, "specexec") == plain
    assert _decode(resident, draft, prompt, "specexec") == plain
    for m in (resident, streamed):
        m.offload_engine.close()


# --- bad input: one line, exit 2 ----------------------------------------------------------------------


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "bitnet"}, "'bitnet', which is not supported"),
    ({"quant_method": "awq", "version": "gemv", "bits": 4}, "AWQ version 'gemv' is not supported"),
    ({"quant_method": "gptq", "bits": 3}, "GPTQ with 3 bits is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "'float-quantized' is not"),
    ({"quant_method": "auto-round", "packing_format": "auto_round:marlin"}, "packing_format"),
    ({"quant_method": "auto-round", "data_type": "mx_fp"}, "data_type 'mx_fp'"),
])
def test_unsupported_formats_are_named_in_one_line(qc, message):
    with pytest.raises(UsageError, match=message) as info:
        format_from_dict(qc)
    assert "\n" not in str(info.value)


def test_quantize_config_json_of_older_autogptq_repos_is_read(checkpoints, tmp_path):
    import shutil

    folder = tmp_path / "old-autogptq"
    shutil.copytree(checkpoints["auto_gptq", False], folder)
    config = json.loads((folder / "config.json").read_text())
    qc = config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    old = {k: v for k, v in qc.items() if k != "quant_method"}  # AutoGPTQ wrote no quant_method there
    (folder / "quantize_config.json").write_text(json.dumps(old))
    fmt = read_quant_format(folder)
    assert (fmt.method, fmt.bits, fmt.group_size, fmt.zero_offset) == ("gptq", 4, 128, 1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specexec_cli", *args], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_generate_reads_a_quantized_folder_without_flags_and_refuses_a_conflicting_quant(tmp_path):
    # a Llama: transformers maps a qwen2 config to Qwen2Tokenizer, which the word-level vocabulary defeats
    tokenizer = _word_tokenizer([f"w{i}" for i in range(VOCAB - 4)])
    model = tiny_model("llama", 2, seed=0, vocab=VOCAB, hidden=HIDDEN, dtype=torch.float32)
    model.config.eos_token_id = 1
    folder = str(quantize(model, tokenizer, tmp_path / "awq", "auto_awq", sym=False))
    ok = _cli("generate", "-t", folder, "--method", "autoregressive", "--no-chat-template", "-n", "6",
              "-p", "w1 w2 w3", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()  # generated words, no ImportError from a transformers quantizer
    assert "expanded=2" in ok.stderr  # resident and decoded once
    bad = _cli("generate", "-t", folder, "--quant", "nf4", "--method", "autoregressive", "-p", "w1",
               "--device", "cpu")
    assert bad.returncode == 2
    assert "is stored quantized (AWQ) and loads as it is: drop --quant nf4" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_gptqmodel_dynamic_per_module_bits_and_a_quantized_lm_head(tmp_path):
    """auto-round's mixed-bit GPTQ export (GPTQModel's `dynamic`: 8, 2 and 4 bits in one model) decodes
    like the producer; a quantized lm_head (lm_head.qweight, `lm_head: true`) is dequantized once."""
    from safetensors.torch import load_file, save_file

    from specexec_cli.runtime import quant

    tokenizer = _word_tokenizer([f"w{i}" for i in range(VOCAB - 4)])
    bits_of = {"model.layers.0.mlp.down_proj": 8, "model.layers.1.self_attn.q_proj": 2}
    folder = quantize(_model(), tokenizer, tmp_path / "mixed", "auto_gptq", sym=False,
                      layer_config={k: {"bits": b} for k, b in bits_of.items()})
    qc = quant_config(folder)
    assert len(qc["dynamic"]) == 2
    # the lm_head as GPTQ tensors: 4-bit ints, zeros and scales chosen here, packed as the format says
    files = list(folder.glob("*.safetensors"))
    tensors = load_file(files[0])
    head = tensors.pop("lm_head.weight")  # [vocab, hidden]
    g = torch.arange(HIDDEN) // 128
    q = torch.randint(0, 16, head.shape)
    zeros = torch.randint(1, 16, (2, VOCAB))
    scales = (torch.rand(2, VOCAB) / 20 + 0.01).half()
    packed = quant.quantize_gptq_reference(q, zeros, scales, g, 4, "gptq")
    tensors.update({f"lm_head.{k}": v for k, v in packed.items()})
    save_file(tensors, files[0], metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["lm_head"] = True
    (folder / "config.json").write_text(json.dumps(config))

    model = load_offloaded_target(folder, device="cpu", dtype=torch.float16, offload="ram", resident_layers=0,
                                  budget=0, context_len=64)
    index = CheckpointIndex(folder)
    linears = _linears(index)
    for i in range(2):
        for name, weight in model.offload_engine.layer_state_dict(i).items():
            prefix = f"model.layers.{i}.{name.removesuffix('.weight')}"
            if prefix in linears:
                ref = gptq_reference(linears[prefix], bits_of.get(prefix, 4), 128, weight.shape[1])
                assert torch.equal(weight, ref), prefix
    head_ref = gptq_reference(linears["lm_head"], 4, 128, HIDDEN)
    assert torch.equal(model.lm_head.weight, head_ref)
    index.close()
    model.offload_engine.close()
    resident = load_offloaded_target(folder, device="cpu", dtype=torch.float32, offload="none", budget=16,
                                     context_len=64)
    draft = tiny_model("qwen2", 1, seed=1, vocab=VOCAB, hidden=HIDDEN, dtype=torch.float32)
    prompt = torch.tensor([[5, 17, 3, 99, 42, 7]])
    assert _decode(resident, draft, prompt, "specexec") == _decode(resident, None, prompt, "autoregressive")
    resident.offload_engine.close()


@pytest.mark.slow
def test_cli_specexec_on_the_bundled_model_quantized_by_auto_round_equals_plain_decoding(tmp_path):
    """The real case end to end: the bundled Qwen2.5-Coder-0.5B exported by auto-round as AWQ is the
    target, the bundled float16 0.5B its draft; `generate` reads the folder with no --quant, resident and
    streamed from disk, and SpecExec prints plain decoding's text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specexec_cli.models import bundled

    if not bundled.is_installed("qwen2.5-coder-0.5b"):
        pytest.skip("the bundled Qwen part packages are not installed")
    source = bundled.bundled_folder("qwen2.5-coder-0.5b")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    folder = str(quantize(model, tokenizer, tmp_path / "awq", "auto_awq", sym=False))
    base = ["generate", "-t", folder, "-p", "Write a Python function that reverses a list.", "-n", "20",
            "--device", "cpu"]
    spec_args = ["--draft", "qwen2.5-coder-0.5b", "--budget", "8"]
    streamed = ["--offload", "disk", "--resident-layers", "0", "--offload-dir", str(tmp_path)]
    plain = _cli(*base, "--method", "autoregressive")
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.split()) > 3
    for extra in ([], streamed):
        run = _cli(*base, *spec_args, *extra)
        assert run.returncode == 0, run.stderr
        assert run.stdout == plain.stdout
    assert "expanded=24" in _cli(*base, "--method", "autoregressive", "-v").stderr
