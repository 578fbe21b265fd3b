"""The offloaded target equals the resident one: RAM and disk tiers, float32 / GPTQ / NF4 / int8,
prefill + tree pass with a 4-D mask + KV cache edits, errors that reach the caller, SpecExec on top."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_quant import write_gptq_checkpoint
from tiny_pairs import tiny_model
from transformers import AutoModelForCausalLM, DynamicCache

from specexec_cli.decoding.forward import cache_keyword
from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.runtime import quant
from specexec_cli.runtime.plan import HardwareFacts
from specexec_cli.runtime.target import load_offloaded_target, model_bytes, plan_target

BIG = HardwareFacts(device_mem_free=64 << 30, host_ram_available=64 << 30, disk_free=1 << 40)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family: str, n_layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A float32 random model, vocab 256; qwen2 ties its embeddings and LM head."""
    return tiny_model(family, n_layers, seed, vocab=256, dtype=torch.float32, initializer_range=0.1,
                      tie_word_embeddings=family == "qwen2")


def additive(attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [T, S] -> additive mask [1, 1, T, S]: 0 where attending, dtype-min elsewhere."""
    mask = torch.zeros(attend.shape, dtype=dtype)
    return mask.masked_fill_(~attend, torch.finfo(dtype).min)[None, None]


# a tree of 6 nodes behind the prefix: parents (-1 = the prefix's last token)
TREE_PARENTS = [-1, 0, 0, 1, 1, 2]


def passes(model: torch.nn.Module, seed: int = 0) -> list[torch.Tensor]:
    """Prefill, a tree pass with a 4-D mask, a cache edit + crop, and a one-token pass: all logits."""
    gen = torch.Generator().manual_seed(seed)
    dtype, device = model.dtype, model.device
    out = []
    cache = DynamicCache()
    prompt = torch.randint(0, 256, (1, 5), generator=gen).to(device)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    with torch.no_grad():
        r = model(
            input_ids=prompt,
            attention_mask=additive(causal, dtype).to(device),
            position_ids=torch.arange(5, device=device)[None],
            **{cache_keyword(type(model)): cache},
            use_cache=True,
        )
        out.append(r.logits)
        # tree pass: node k sees the prefix and its ancestors
        n = len(TREE_PARENTS)
        attend = torch.zeros(n, 5 + n, dtype=torch.bool)
        attend[:, :5] = True
        depth = []
        for k, p in enumerate(TREE_PARENTS):
            attend[k, 5 + k] = True
            if p >= 0:
                attend[k, 5:] |= attend[p, 5:]
            depth.append(0 if p < 0 else depth[p] + 1)
        tree = torch.randint(0, 256, (1, n), generator=gen).to(device)
        r = model(
            input_ids=tree,
            attention_mask=additive(attend, dtype).to(device),
            position_ids=(5 + torch.tensor(depth, device=device))[None],
            **{cache_keyword(type(model)): cache},
            use_cache=True,
        )
        out.append(r.logits)
        # keep nodes 0, 2, 5 (a path) the way the engine does: gather in place, then crop
        keep = torch.tensor([5, 7, 10], device=device)
        for layer in cache.layers:
            layer.keys[:, :, 5:8] = layer.keys[:, :, keep]
            layer.values[:, :, 5:8] = layer.values[:, :, keep]
        cache.crop(-3)  # 11 -> 8 entries
        nxt = torch.randint(0, 256, (1, 1), generator=gen).to(device)
        r = model(
            input_ids=nxt,
            attention_mask=additive(torch.ones(1, 9, dtype=torch.bool), dtype).to(device),
            position_ids=torch.tensor([[8]], device=device),
            **{cache_keyword(type(model)): cache},
            use_cache=True,
        )
        out.append(r.logits)
    return out


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], atol: float = 1e-5) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g.float().cpu(), w.float().cpu(), atol=atol, rtol=1e-4)


def load(path_or_model, **kw) -> torch.nn.Module:
    kw.setdefault("device", "cpu")
    kw.setdefault("hardware", BIG)
    return load_offloaded_target(path_or_model, **kw)


# --- float32 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "mixtral"])
@pytest.mark.parametrize("offload", ["ram", "disk", "none"])
def test_float32_matches_resident(tmp_path, family, offload):
    ref = tiny(family)
    ref.save_pretrained(tmp_path)
    want = passes(ref)
    model = load(tmp_path, offload=offload, quant="fp32", buffers=2)
    engine = model.offload_engine
    got = passes(model)
    assert_same(got, want, atol=1e-6)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 3 and model.generation_config is not None
    assert engine.stats.forwards == 3
    if offload == "none":
        assert engine.stats.bytes_streamed == 0 and engine.plan.resident_layers == 3
    else:
        # 3 forwards stream 3 layers each; the ring has already prefetched the next forward's first 2
        size = [engine.layers[i].layout.nbytes for i in range(3)]
        assert engine.stats.bytes_streamed == 3 * sum(size) + size[0] + size[1]
        assert engine.stats.restarts == 0
    engine.close()


@pytest.mark.parametrize("buffers,resident", [(2, 1), (3, 0), (3, 2), (5, 0), (4, 3)])
def test_ring_sizes_and_resident_layers(tmp_path, buffers, resident):
    ref = tiny("llama", n_layers=4)
    ref.save_pretrained(tmp_path)
    want = passes(ref)
    for offload in ("ram", "disk"):
        model = load(tmp_path, offload=offload, quant="fp32", buffers=buffers, resident_layers=resident)
        assert model.offload_engine.plan.resident_layers == resident
        assert_same(passes(model), want, atol=1e-6)
        assert_same(passes(model), want, atol=1e-6)  # the wrapped ring serves a second round
        assert model.offload_engine.stats.restarts == 0
        model.offload_engine.close()


def test_bf16_checkpoint_streams_from_disk_in_place_and_computes_in_fp32(tmp_path):
    tiny("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model = load(tmp_path, offload="disk", quant="fp32")
    engine = model.offload_engine
    assert all(engine.reads[i][0].path.endswith("model.safetensors") for i in engine.streamed)
    assert engine.cleanup_dir is None  # nothing converted, nothing written
    assert_same(passes(model), passes(ref), atol=1e-6)
    # bf16 bytes were streamed (half of float32)
    assert engine.layers[0].layout.nbytes < sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    engine.close()


def test_model_object_source_ram_and_disk(tmp_path):
    ref = tiny("qwen2")
    want = passes(ref)
    for offload in ("ram", "disk"):
        model = load(copy.deepcopy(ref), offload=offload, offload_dir=tmp_path)
        assert_same(passes(model), want, atol=1e-6)
        blob_dir = model.offload_engine.cleanup_dir
        assert (blob_dir is not None) == (offload == "disk")
        model.offload_engine.close()
        assert blob_dir is None or not os.path.exists(blob_dir)


def test_disk_tier_drops_the_page_cache(tmp_path, monkeypatch):
    tiny("llama").save_pretrained(tmp_path)
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, off, n, advice: (calls.append(advice), real(fd, off, n, advice))
    )
    model = load(tmp_path, offload="disk", quant="fp32")
    calls.clear()
    passes(model)
    assert calls and set(calls) == {os.POSIX_FADV_DONTNEED}
    model.offload_engine.close()


def test_inference_mode_and_no_grad_mixed(tmp_path):
    ref = tiny("mistral")
    ref.save_pretrained(tmp_path)
    want = passes(ref)
    for offload in ("ram", "disk"):
        model = load(tmp_path, offload=offload, quant="fp32")
        ids = torch.randint(0, 256, (1, 4))
        with torch.inference_mode():
            torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        assert_same(passes(model), want, atol=1e-6)  # views made under inference mode, reused outside it
        model.offload_engine.close()


@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("checkpoint", ["fp32", "gptq-act-order"])
def test_streaming_on_the_selected_device_matches_resident(tmp_path, test_device, offload, checkpoint):
    """On CUDA (--device cuda) this runs the copy streams, the pinned RAM store or the disk tier's pinned
    staging, and (GPTQ) the Triton kernel with an act-order g_idx; on CPU the loader thread."""
    if checkpoint == "fp32":
        ref = tiny("llama")
        ref.save_pretrained(tmp_path / "ckpt")
    else:
        write_gptq_checkpoint(tiny("llama"), tmp_path / "ckpt", tmp_path / "dense", desc_act=True)
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    want = passes(ref)
    model = load(tmp_path / "ckpt", device=test_device, dtype=torch.float32, offload=offload, buffers=2,
                 resident_layers=0, hardware=None if test_device == "cuda" else BIG)
    engine = model.offload_engine
    assert engine.streamed == [0, 1, 2] and model.device.type == test_device
    for _ in range(2):  # the second round starts from the ring's prefetch of the first layers
        assert_same(passes(model), want, atol=1e-4)
    assert engine.stats.restarts == 0
    engine.close()


# --- quantized ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("desc_act,fmt", [(False, "gptq"), (True, "gptq_v2")])
def test_gptq_matches_resident_with_the_same_weights(tmp_path, family, offload, desc_act, fmt):
    expected = write_gptq_checkpoint(
        tiny(family), tmp_path / "q", tmp_path / "dense", desc_act=desc_act, checkpoint_format=fmt
    )
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    model = load(tmp_path / "q", offload=offload, buffers=2)  # quant inferred from the checkpoint
    engine = model.offload_engine
    assert model.dtype == torch.float32  # default compute dtype on CPU
    sd = engine.layer_state_dict(1)
    if family != "mixtral":
        assert torch.equal(
            sd["mlp.down_proj.weight"], expected["model.layers.1.mlp.down_proj.weight"].float()
        )
    assert_same(passes(model), passes(ref), atol=1e-5)
    # packed weights: the streamed layer is about 4x smaller than fp16 (8x than the fp32 reference)
    dense_bytes = sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    assert engine.layers[0].layout.nbytes < dense_bytes / 5
    engine.close()


def _dequantized_reference(ref: torch.nn.Module, kind: str) -> torch.nn.Module:
    """The resident model with every quantizable layer weight replaced by dequant(quant(w))."""
    ref = copy.deepcopy(ref)
    for layer in ref.model.layers:
        for name, p in layer.named_parameters():
            if p.ndim >= 2 and not name.endswith("gate.weight"):
                if kind == "nf4":
                    t = quant.quantize_nf4(p.data)
                    p.data = quant.dequantize_nf4(t["packed"], t["absmax"], tuple(p.shape), p.dtype)
                else:
                    t = quant.quantize_int8(p.data)
                    p.data = quant.dequantize_int8(t["cb"], t["scb"], tuple(p.shape), p.dtype)
    return ref


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_bitsandbytes_matches_resident_with_the_same_weights(tmp_path, kind, offload, family):
    ref = tiny(family)
    ref.save_pretrained(tmp_path / "ckpt")
    want = passes(_dequantized_reference(ref, kind))
    model = load(tmp_path / "ckpt", offload=offload, quant=kind, offload_dir=tmp_path)
    engine = model.offload_engine
    assert_same(passes(model), want, atol=1e-5)
    dense_bytes = sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    assert engine.layers[0].layout.nbytes < dense_bytes / (5 if kind == "nf4" else 3)
    if offload == "disk":
        assert engine.cleanup_dir is not None  # quantized at load time into the blob file
    engine.close()


# --- errors -------------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_error_in_a_layer_reaches_the_caller_and_the_next_forward_works(tmp_path, offload):
    ref = tiny("llama", n_layers=4)
    ref.save_pretrained(tmp_path)
    want = passes(ref)
    model = load(tmp_path, offload=offload, quant="fp32", buffers=2)
    mlp = model.model.layers[2].mlp

    def explode(*args, **kwargs):
        raise Boom("layer 2 failed")

    mlp.forward = explode
    with pytest.raises(Boom, match="layer 2 failed"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    del mlp.forward
    assert all(p.device.type == "meta" for p in model.model.layers[2].parameters())  # unbound again
    assert_same(passes(model), want, atol=1e-6)
    assert model.offload_engine.stats.restarts == 1
    model.offload_engine.close()


def test_read_error_reaches_the_caller_and_the_next_forward_works(tmp_path):
    ref = tiny("llama", n_layers=4)
    ref.save_pretrained(tmp_path)
    want = passes(ref)
    model = load(tmp_path, offload="disk", quant="fp32", buffers=2)
    engine = model.offload_engine
    passes(model)
    real_run = engine._reader.run
    state = {"n": 0}

    def flaky(ops, dst):
        state["n"] += 1
        if state["n"] == 3:
            raise OSError("disk went away")
        return real_run(ops, dst)

    engine._reader.run = flaky
    with pytest.raises(OSError, match="disk went away"):
        passes(model)
    assert_same(passes(model), want, atol=1e-6)
    engine.close()


# --- refusals before loading ----------------------------------------------------------------------------


def test_planner_refuses_before_loading_weights(tmp_path, monkeypatch):
    tiny("llama").save_pretrained(tmp_path)
    from specexec_cli.runtime import disk

    def no_reads(*a, **k):
        raise AssertionError("weights were read before the plan said yes")

    monkeypatch.setattr(disk.CheckpointIndex, "read", no_reads)
    cpu_box = HardwareFacts(
        device_mem_free=100_000, host_ram_available=100_000, disk_free=1 << 40, unified=True
    )
    with pytest.raises(
        SpecexecError, match=r"^target needs .* of RAM \(the CPU is the device\).*--offload ram$"
    ):
        load(tmp_path, offload="none", quant="fp32", hardware=cpu_box)
    gpu_box = HardwareFacts(device_mem_free=8 << 30, host_ram_available=100_000, disk_free=1 << 40)
    with pytest.raises(
        SpecexecError,
        match=r"^target needs 444 kB of host RAM, 100 kB available; use --offload disk or a 4-bit variant$",
    ):
        load(tmp_path, offload="ram", quant="fp32", hardware=gpu_box)
    with pytest.raises(SpecexecError, match="free disk"):
        load(tmp_path, offload="disk", quant="nf4", hardware=HardwareFacts(8 << 30, 8 << 30, 1000))


def test_plan_target_is_the_plan_the_loader_follows(tmp_path, monkeypatch):
    tiny("llama", n_layers=4).save_pretrained(tmp_path)
    draft = tiny("llama", n_layers=1)
    box = HardwareFacts(device_mem_free=1 << 30, host_ram_available=1 << 30, disk_free=1 << 40, unified=True)
    kw = dict(device="cpu", quant="fp32", offload="ram", resident_layers=1, context_len=512, draft=draft)
    from specexec_cli.runtime import disk

    with monkeypatch.context() as m:
        m.setattr(disk.CheckpointIndex, "read", lambda *a: pytest.fail("plan_target read weights"))
        p = plan_target(tmp_path, hardware=box, **kw)
    assert p.offload == "ram" and p.resident_layers == 1 and p.buffers == 2 and p.budget >= 1
    model = load_offloaded_target(tmp_path, hardware=box, **kw)
    assert model.offload_engine.plan == p
    assert model.offload_engine.streamed == [1, 2, 3]
    model.offload_engine.close()
    # the draft's weights and KV cache count: one byte less than the plan's total fits only without it
    need = p.device_bytes + p.host_bytes
    tight = HardwareFacts(need - 1, need - 1, 1 << 40, unified=True)
    assert model_bytes(draft) > 0
    with pytest.raises(SpecexecError):
        plan_target(tmp_path, hardware=tight, **{**kw, "budget": p.budget})
    assert (
        plan_target(tmp_path, hardware=tight, **{**kw, "budget": p.budget, "draft": None}).budget == p.budget
    )


def test_auto_offload_and_half_precision_on_cpu(tmp_path):
    ref = tiny("qwen2")
    ref.save_pretrained(tmp_path)
    model = load(tmp_path, offload="auto", quant="fp32")
    assert model.offload_engine.plan.offload == "none"  # everything fits: nothing streams
    assert_same(passes(model), passes(ref), atol=1e-6)
    model.offload_engine.close()
    half = load(tmp_path, offload="disk", quant="bf16")
    assert half.dtype == torch.bfloat16
    ref_half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert_same(passes(half), passes(ref_half), atol=1e-6)
    half.offload_engine.close()


def test_flag_conflicts(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="needs a GPTQ checkpoint"):
        load(tmp_path, quant="gptq")
    with pytest.raises(UsageError, match="--quant"):
        load(tmp_path, quant="q3")
    with pytest.raises(UsageError, match="--offload"):
        load(tmp_path, offload="ssd")
    with pytest.raises(UsageError, match="float16"):
        load(tmp_path, quant="fp32", dtype=torch.float16)
    with pytest.raises(UsageError, match="--buffers"):
        load(tmp_path, quant="fp32", buffers=1)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            load(tmp_path, quant="fp32", device="cuda")


# --- the decoding engine on top ----------------------------------------------------------------------


@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_specexec_through_the_offloaded_target_equals_greedy(tmp_path, offload):
    generate_mod = pytest.importorskip("specexec_cli.decoding.generate")
    from tiny_pairs import tiny_pair

    from specexec_cli.decoding.config import GenerationConfig, TreeConfig

    target, draft = tiny_pair("llama")
    prompt = torch.tensor([[5, 17, 3, 99, 42]])
    plain = generate_mod.generate(
        target, None, prompt, GenerationConfig(method="autoregressive", max_new_tokens=24)
    )
    offloaded = load(copy.deepcopy(target), offload=offload, offload_dir=tmp_path, buffers=2)
    assert offloaded.dtype == torch.float64
    config = GenerationConfig(
        method="specexec",
        max_new_tokens=24,
        tree=TreeConfig(budget=16, max_n_beams=4, max_beam_len=4, max_branch_width=4),
    )
    spec = generate_mod.generate(offloaded, draft, prompt, config)
    assert spec.token_ids == plain.token_ids
    assert offloaded.offload_engine.stats.forwards == spec.n_target_passes
    offloaded.offload_engine.close()


def test_early_exit_draft_shares_the_resident_layers_of_an_offloaded_target(tmp_path):
    from tiny_pairs import tiny_pair

    from specexec_cli.decoding.config import GenerationConfig, TreeConfig
    from specexec_cli.decoding.generate import generate
    from specexec_cli.models.load import make_early_exit_draft

    target, _ = tiny_pair("llama")
    prompt = torch.tensor([[5, 17, 3, 99, 42]])
    plain = generate(target, None, prompt, GenerationConfig(method="autoregressive", max_new_tokens=24))
    streamed_from_0 = load(copy.deepcopy(target), offload="ram", buffers=2, resident_layers=0)
    with pytest.raises(SpecexecError, match="--resident-layers 1"):
        make_early_exit_draft(streamed_from_0, 1)
    offloaded = load(copy.deepcopy(target), offload="ram", buffers=2, resident_layers=1)
    draft = make_early_exit_draft(offloaded, 1)
    config = GenerationConfig(method="specexec", max_new_tokens=24, tree=TreeConfig(budget=16, max_n_beams=4))
    spec = generate(offloaded, draft, prompt, config)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.draft_passes > 0
    assert offloaded.offload_engine.stats.forwards == spec.n_target_passes  # draft calls are not counted


def test_an_early_exit_runs_on_resident_layers_decoded_once(tmp_path):
    """Float16 files computed in float32 with memory to spare: resident layers are decoded once
    ("expanded") and an early-exit draft of them is allowed and exact."""
    from tiny_pairs import tiny_pair

    from specexec_cli.decoding.config import GenerationConfig, TreeConfig
    from specexec_cli.decoding.generate import generate
    from specexec_cli.models.load import make_early_exit_draft

    target, _ = tiny_pair("llama", dtype=torch.float32)
    target.to(torch.float16).save_pretrained(tmp_path / "fp16")
    reference = load(tmp_path / "fp16", dtype=torch.float32, offload="none")
    prompt = torch.tensor([[5, 17, 3, 99, 42]])
    plain = generate(reference, None, prompt, GenerationConfig(method="autoregressive", max_new_tokens=16))
    offloaded = load(tmp_path / "fp16", dtype=torch.float32, offload="disk", resident_layers=None)
    engine = offloaded.offload_engine
    assert engine.expanded and 0 in engine.expanded  # layer 0 is resident, decoded once
    draft = make_early_exit_draft(offloaded, 1)
    config = GenerationConfig(method="specexec", max_new_tokens=16, tree=TreeConfig(budget=8, max_n_beams=4))
    assert generate(offloaded, draft, prompt, config).token_ids == plain.token_ids
    engine.close()
    reference.offload_engine.close()
