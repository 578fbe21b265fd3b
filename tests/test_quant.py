"""GPTQ packing and dequantization (exact), bitsandbytes NF4/int8 on CPU, and GPTQ checkpoints built here.

`write_gptq_checkpoint` (also used by test_offload.py) turns a tiny model into a GPTQ checkpoint made of
known integers, plus a float32 checkpoint holding exactly the weights those integers stand for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pairs import tiny_model

from specexec_cli.errors import UsageError
from specexec_cli.runtime import quant
from specexec_cli.runtime.disk import CheckpointIndex, FileReader
from specexec_cli.runtime.layout import build_param
from specexec_cli.runtime.loader import LayerBuilder, checkpoint_param_refs, empty_skeleton, find_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def write_gptq_checkpoint(
    model: torch.nn.Module,
    gptq_dir: Path,
    dense_dir: Path,
    *,
    bits: int = 4,
    group_size: int = 32,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    seed: int = 0,
    round_weights: bool = False,
) -> dict[str, torch.Tensor]:
    """Replace every decoder-layer matrix (not MoE routers) by known GPTQ integers: random ones, or with
    `round_weights` the model's own weights rounded to the nearest level of their group (symmetric, zero
    point at the middle level), so a trained model stays trained.

    Writes the GPTQ checkpoint to gptq_dir and the same weights, dequantized exactly, as float32 to
    dense_dir. Returns {checkpoint weight name: expected dense weight (float64)}.
    """
    gen = torch.Generator().manual_seed(seed)
    model.save_pretrained(dense_dir)
    state = load_file(str(dense_dir / "model.safetensors"))
    packed, dense, expected = {}, {}, {}
    top = 1 << bits
    for key, w in state.items():
        if ".layers." not in key or not key.endswith(".weight") or w.ndim != 2 or key.endswith("gate.weight"):
            packed[key] = dense[key] = w.to(torch.float32)
            continue
        n_out, n_in = w.shape
        groups = n_in // group_size
        rows = torch.randperm(n_in, generator=gen) if desc_act else torch.arange(n_in)
        g_idx = rows // group_size  # row i belongs to group g_idx[i]
        if round_weights:
            q, zeros, scales = round_to_groups(w.double(), g_idx, groups, bits)
        else:
            q = torch.randint(0, top, (n_out, n_in), generator=gen)
            lo = 1 if checkpoint_format == "gptq" else 0  # v1 cannot store a zero point of 0
            zeros = torch.randint(lo, top, (groups, n_out), generator=gen)
            scales = (torch.rand(groups, n_out, generator=gen) * 0.02 + 0.005).to(torch.float16)
        w64 = (q - zeros[g_idx].t()).double() * scales[g_idx].t().double()  # [out, in]
        expected[key] = w64
        prefix = key[: -len(".weight")]
        tensors = quant.quantize_gptq_reference(q, zeros, scales, g_idx, bits, checkpoint_format)
        for name, t in tensors.items():
            packed[f"{prefix}.{name}"] = t
        dense[key] = w64.to(torch.float32)
    save_file(dense, str(dense_dir / "model.safetensors"), metadata={"format": "pt"})
    gptq_dir.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(gptq_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": False,
        "checkpoint_format": checkpoint_format,
    }
    (gptq_dir / "config.json").write_text(json.dumps(config))
    return expected


def round_to_groups(w: torch.Tensor, g_idx: torch.Tensor, groups: int,
                    bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest of w [out, in] per (group, output): the zero point is the middle level
    2**(bits-1) and the fp16 scale maps the group's largest |w| to the top level. Returns q [out, in],
    zeros [groups, out], scales [groups, out] (fp16)."""
    half = 1 << (bits - 1)
    absmax = torch.zeros(groups, w.shape[0], dtype=w.dtype).scatter_reduce(
        0, g_idx[:, None].expand(-1, w.shape[0]), w.abs().t(), "amax")  # [groups, out]
    scales = (absmax / (half - 1)).clamp(min=1e-6).to(torch.float16)
    q = (w / scales[g_idx].t().double()).round() + half  # [out, in]
    zeros = torch.full((groups, w.shape[0]), half, dtype=torch.long)
    return q.clamp(0, 2 * half - 1).long(), zeros, scales


# --- packing -----------------------------------------------------------------------------------------


def test_pack_order_is_low_bits_first_along_the_input_dim():
    # one output column whose 8 input rows hold 1..8: the word is 0x87654321
    values = torch.arange(1, 9).view(8, 1)
    word = quant.pack_rows(values, 4)
    assert word.shape == (1, 1) and word.dtype == torch.int32
    assert word.item() == 0x87654321 - 2**32  # same bits as a signed int32
    assert torch.equal(quant.unpack_rows(word, 4), values.to(torch.int32))
    # zeros pack along the output dim: one group, outputs 0..7 hold 15, 0, 1, ... 6
    zeros = torch.tensor([[15, 0, 1, 2, 3, 4, 5, 6]])
    word = quant.pack_cols(zeros, 4)
    assert word.shape == (1, 1) and word.item() == 0x6543210F
    assert torch.equal(quant.unpack_cols(word, 4), zeros.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (64, 48), generator=gen)
    assert torch.equal(quant.unpack_rows(quant.pack_rows(values, bits), bits), values.to(torch.int32))
    assert torch.equal(quant.unpack_cols(quant.pack_cols(values, bits), bits), values.to(torch.int32))


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_gptq_is_exact(desc_act, fmt, dtype):
    gen = torch.Generator().manual_seed(3)
    n_out, n_in, gs = 48, 128, 32
    q = torch.randint(0, 16, (n_out, n_in), generator=gen)
    zeros = torch.randint(1, 16, (n_in // gs, n_out), generator=gen)
    scales = (torch.rand(n_in // gs, n_out, generator=gen) + 0.5).to(torch.float16)
    g_idx = (torch.randperm(n_in, generator=gen) if desc_act else torch.arange(n_in)) // gs
    t = quant.quantize_gptq_reference(q, zeros, scales, g_idx, 4, fmt)
    assert t["qweight"].shape == (n_in // 8, n_out) and t["qzeros"].shape == (n_in // gs, n_out // 8)
    cfg = quant.gptq_config_from_dict({"bits": 4, "group_size": gs, "checkpoint_format": fmt})
    assert cfg.zero_offset == (1 if fmt == "gptq" else 0)
    trivial = quant.gptq_is_trivial_g_idx(t["g_idx"], gs)
    assert trivial == (not desc_act)
    w = quant.dequantize_gptq(
        t["qweight"], t["qzeros"], t["scales"], None if trivial else t["g_idx"], 4, cfg.zero_offset, dtype
    )
    expected = ((q - zeros[g_idx].t()).double() * scales[g_idx].t().double()).to(dtype)
    assert w.shape == (n_out, n_in) and w.dtype == dtype
    assert torch.equal(w, expected)
    # the gather path agrees with the reshape path when the grouping is trivial
    if trivial:
        w2 = quant.dequantize_gptq(
            t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, cfg.zero_offset, dtype
        )
        assert torch.equal(w, w2)


def test_v1_zero_point_is_stored_minus_one():
    # a single group, zero point 8 for all outputs: v1 stores 7 in every nibble, v2 stores 8
    q = torch.full((8, 8), 10)
    zeros = torch.full((1, 8), 8)
    scales = torch.ones(1, 8, dtype=torch.float16)
    g_idx = torch.zeros(8, dtype=torch.long)
    v1 = quant.quantize_gptq_reference(q, zeros, scales, g_idx, 4, "gptq")
    v2 = quant.quantize_gptq_reference(q, zeros, scales, g_idx, 4, "gptq_v2")
    assert v1["qzeros"].item() == 0x77777777 and v2["qzeros"].item() == 0x88888888 - 2**32
    w = quant.dequantize_gptq(v1["qweight"], v1["qzeros"], v1["scales"], None, 4, 1, torch.float32)
    assert torch.equal(w, torch.full((8, 8), 2.0))


def test_gptq_config_refusals():
    with pytest.raises(UsageError, match="3 bits"):
        quant.gptq_config_from_dict({"bits": 3})
    with pytest.raises(UsageError, match="marlin"):
        quant.gptq_config_from_dict({"bits": 4, "checkpoint_format": "marlin"})
    cfg = quant.gptq_config_from_dict({"bits": 4, "group_size": -1, "desc_act": True, "sym": False})
    assert cfg.group_size == -1 and cfg.desc_act and not cfg.sym and cfg.zero_offset == 1


# --- bitsandbytes on CPU ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_roundtrip_on_cpu(dtype):
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    t = quant.quantize_nf4(w)
    packed, absmax = quant.nf4_nbytes(w.numel())
    assert t["packed"].dtype == torch.uint8 and t["packed"].numel() == packed
    assert t["absmax"].dtype == torch.float32 and t["absmax"].numel() * 4 == absmax
    d = quant.dequantize_nf4(t["packed"], t["absmax"], tuple(w.shape), dtype)
    assert d.shape == w.shape and d.dtype == dtype
    # value = absmax x nearest NF4 code; the widest gap (-1 to -0.696) bounds |err| by 0.152 absmax
    err = (d.float() - w.float()).abs().view(-1, 64).max(dim=1).values
    assert torch.all(err <= 0.152 * t["absmax"] * 1.01 + 1e-2)
    if dtype == torch.float32:
        codes = torch.tensor(
            [
                -1.0,
                -0.6962,
                -0.5251,
                -0.3949,
                -0.2844,
                -0.1848,
                -0.0911,
                0.0,
                0.0796,
                0.1609,
                0.2461,
                0.3379,
                0.4407,
                0.5626,
                0.7230,
                1.0,
            ]
        )
        ratio = (d.view(-1, 64) / t["absmax"][:, None]).reshape(-1, 1)
        assert torch.all((ratio - codes[None]).abs().min(dim=1).values < 1e-4)


def test_int8_roundtrip_on_cpu():
    w = torch.randn(4, 24, 32, generator=torch.Generator().manual_seed(0))
    t = quant.quantize_int8(w)
    assert t["cb"].shape == (96, 32) and t["cb"].dtype == torch.int8 and t["scb"].shape == (96,)
    d = quant.dequantize_int8(t["cb"], t["scb"], tuple(w.shape), torch.float32)
    assert d.shape == w.shape
    assert torch.all((d - w).abs() <= w.abs().amax(dim=-1, keepdim=True) / 127 * 0.51 + 1e-6)


# --- a GPTQ checkpoint of a tiny model ------------------------------------------------------------------


def _tiny(family: str, n_layers: int = 2) -> torch.nn.Module:
    return tiny_model(family, n_layers, seed=0, vocab=256, dtype=torch.float32, initializer_range=0.1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("direct", [False, True])
def test_gptq_checkpoint_unpacks_to_the_known_weights(tmp_path, family, desc_act, direct):
    expected = write_gptq_checkpoint(_tiny(family), tmp_path / "gptq", tmp_path / "dense", desc_act=desc_act)
    index = CheckpointIndex(tmp_path / "gptq")
    from transformers import AutoConfig

    from specexec_cli.runtime.qformat import read_quant_format

    config = AutoConfig.from_pretrained(tmp_path / "gptq")
    gptq = read_quant_format(tmp_path / "gptq", config)
    skeleton = empty_skeleton(config, torch.float32)
    prefix, layers = find_layers(skeleton)
    builder = LayerBuilder(index, "gptq", torch.float32, gptq, direct=direct)
    checked = 0
    for i, layer in enumerate(layers):
        refs = checkpoint_param_refs(
            index, f"{prefix}.{i}.", [(n, tuple(p.shape)) for n, p in layer.named_parameters()]
        )
        src = builder.build(refs)
        assert (src.reads is not None) == direct
        buf = src.materialize(FileReader())
        views = src.layout.views(buf)
        params = {r.name: build_param(r, views, torch.float32) for r in src.layout.recipes}
        for name, w in params.items():
            key = f"{prefix}.{i}.{name}"
            if key in expected:
                assert torch.equal(w, expected[key].to(torch.float32)), key
                checked += 1
        if family == "mixtral":  # fused experts: gate_up[e] = cat(w1_e, w3_e), down[e] = w2_e
            base = f"{prefix}.{i}.block_sparse_moe.experts"
            for e in range(4):
                w1, w3 = expected[f"{base}.{e}.w1.weight"], expected[f"{base}.{e}.w3.weight"]
                assert torch.equal(params["mlp.experts.gate_up_proj"][e], torch.cat([w1, w3]).float())
                assert torch.equal(
                    params["mlp.experts.down_proj"][e], expected[f"{base}.{e}.w2.weight"].float()
                )
                checked += 3
    assert checked >= 2 * 7 if family != "mixtral" else checked >= 2 * (4 + 12)
    index.close()


def test_the_hub_kernel_warnings_become_one_line_once(capsys, caplog):
    """bitsandbytes (on AVX512-bf16 CPUs) and `kernels` warn at import that the fused CPU NF4 kernel
    could not be fetched from the hub (two lines offline); specexec says it once, in one line, however
    many NF4 loads follow."""
    import logging

    quant.install_hub_kernel_note()
    quant.install_hub_kernel_note()  # idempotent: one filter per logger
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    kernels = logging.getLogger("kernels._internals.hf_hub")
    assert sum(isinstance(f, quant._HubKernelNote) for f in bnb.filters) == 1
    quant._HubKernelNote.said = False
    for _ in range(3):  # as many imports / loads as a tune makes
        kernels.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
                        "because Hugging Face Hub is in offline mode.")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "not in the cache")
    bnb.warning("an unrelated bitsandbytes warning")
    err = capsys.readouterr().err.splitlines()
    assert err.count(f"specexec: {quant.HUB_KERNEL_NOTE}") == 1
    assert not any("kernels-community" in line and "specexec:" not in line for line in err)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["an unrelated bitsandbytes warning"]  # the others pass through, these do not
    quant.quantize_nf4(torch.randn(64, 64))  # a real NF4 quantization prints no hub line after the note
    assert "kernels-community" not in capsys.readouterr().err
