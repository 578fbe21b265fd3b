"""The streamed regime on a CPU: memory caps (--max-memory) force streaming, narrow (16-bit) storage of
streamed layers computes exactly like the resident model read from the same files, and the parallel
file reader returns the same bytes as one read."""

from __future__ import annotations

import os

import pytest
import torch
from test_offload import BIG, assert_same, load, passes, tiny
from transformers import AutoModelForCausalLM

from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.runtime.caps import apply_caps, format_caps, parse_caps, parse_size
from specexec_cli.runtime.disk import FileReader, ReadOp
from specexec_cli.runtime.plan import HardwareFacts
from specexec_cli.runtime.target import plan_target

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 1 << 30


# --- parsing caps ---------------------------------------------------------------------------------


def test_sizes():
    assert parse_size("4GiB") == 4 * GiB
    assert parse_size("4 GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("10G") == 10 * GiB  # accelerate's spelling
    assert parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size("1000") == 1000
    for bad in ("", "4 parsecs", "GiB", "-1GiB", "1e9"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_size(bad)


def test_caps_by_pool():
    assert parse_caps(("cpu=4GiB", "cuda:0=20GiB")) == {"cpu": 4 * GiB, "cuda:0": 20 * GiB}
    assert parse_caps("cpu=1GiB,2GiB") == {"cpu": GiB, "device": 2 * GiB}
    assert parse_caps(None) == {} and parse_caps(()) == {}
    with pytest.raises(UsageError, match="unknown pool 'tpu'"):
        parse_caps(("tpu=4GiB",))
    with pytest.raises(UsageError, match="larger than 0"):
        parse_caps(("cpu=0",))
    caps = {"cpu": 4 * GiB, "device": 512 << 20}
    assert parse_caps(format_caps(caps)) == caps


def test_caps_take_the_smaller_of_cap_and_probe():
    cpu = HardwareFacts(20 * GiB, 20 * GiB, 1 << 40, unified=True)
    assert apply_caps(cpu, {"cpu": 4 * GiB}, "cpu") == HardwareFacts(4 * GiB, 4 * GiB, 1 << 40, unified=True)
    assert apply_caps(cpu, {"device": 3 * GiB, "cpu": 5 * GiB}, "cpu").device_mem_free == 3 * GiB
    assert apply_caps(cpu, {"cpu": 64 * GiB}, "cpu") == cpu  # a cap above the probe changes nothing
    assert apply_caps(cpu, {"cuda:0": GiB}, "cpu") == cpu  # a GPU cap does not bind a CPU run
    gpu = HardwareFacts(24 * GiB, 128 * GiB, 1 << 40)
    capped = apply_caps(gpu, {"cuda:0": 20 * GiB, "cpu": 16 * GiB}, "cuda", 0)
    assert (capped.device_mem_free, capped.host_ram_available) == (20 * GiB, 16 * GiB)
    assert apply_caps(gpu, {"cuda:1": GiB}, "cuda", 0) == gpu
    assert apply_caps(gpu, {"device": GiB}, "cuda", 0).device_mem_free == GiB


# --- caps drive the plan ----------------------------------------------------------------------------


def test_a_cap_makes_the_planner_stream(tmp_path):
    tiny("llama", n_layers=4).save_pretrained(tmp_path)
    kw = dict(device="cpu", quant="fp32", offload="auto", resident_layers=None, context_len=64, budget=8,
              hardware=HardwareFacts(20 * GiB, 20 * GiB, 1 << 40, unified=True))
    free = plan_target(tmp_path, **kw)
    assert free.offload == "none" and free.resident_layers == 4
    need = free.device_bytes
    streamed = plan_target(tmp_path, **{**kw, "offload": "disk", "resident_layers": 0})
    layer = (need - streamed.device_bytes) // 3
    capped = plan_target(tmp_path, **kw, max_memory={"cpu": need - layer})
    assert capped.offload == "disk" and capped.resident_layers < 4 and capped.device_bytes <= need - layer
    with pytest.raises(SpecexecError, match="needs"):
        plan_target(tmp_path, **kw, max_memory={"cpu": 1000})


def test_capped_disk_tier_computes_what_the_resident_model_computes(tmp_path):
    ref = tiny("qwen2", n_layers=3)
    ref.save_pretrained(tmp_path)
    box = HardwareFacts(20 * GiB, 20 * GiB, 1 << 40, unified=True)
    full = plan_target(tmp_path, device="cpu", quant="fp32", offload="auto", resident_layers=None,
                       hardware=box, budget=4, context_len=64)
    model = load(tmp_path, quant="fp32", offload="auto", resident_layers=None, hardware=box, budget=4,
                 context_len=64, max_memory={"cpu": full.device_bytes - 1})
    assert model.offload_engine.plan.offload == "disk" and model.offload_engine.streamed
    assert_same(passes(model), passes(ref), atol=1e-6)
    model.offload_engine.close()


def test_offload_dir_must_be_a_directory(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="not a directory"):
        load(tmp_path, quant="fp32", offload="disk", offload_dir=tmp_path / "nope")


# --- narrow storage of streamed layers -----------------------------------------------------------------


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offload", ["ram", "disk"])
def test_16bit_files_stream_as_16bit_and_compute_exactly_in_fp32(tmp_path, stored, offload):
    tiny("llama").to(stored).save_pretrained(tmp_path)
    # the reference: the resident model read from the same files, upcast once to float32
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model = load(tmp_path, offload=offload, quant="fp32")
    engine = model.offload_engine
    fp32_layer = sum(p.numel() * 4 for p in ref.model.layers[0].parameters())
    assert engine.layers[0].layout.nbytes <= fp32_layer // 2 + 4096  # 16-bit bytes are stored and moved
    assert all(t.dtype == stored for t in engine.layers[0].layout.tensors.values())
    assert engine.cleanup_dir is None  # the disk tier reads the files in place
    # upcasts go into one reused float32 scratch buffer, not fresh tensors per layer and pass
    assert engine._scratch is not None and engine._scratch.dtype == torch.float32
    assert engine._scratch.numel() >= max(b.scratch_numel for b in engine.layers) > 0
    got, want = passes(model), passes(ref)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # the upcast is exact, so the float32 logits are identical
    engine.close()


def test_wide_files_are_converted_once_for_a_narrow_compute_dtype(tmp_path):
    tiny("llama").save_pretrained(tmp_path)  # float32 files
    model = load(tmp_path, offload="disk", quant="fp16", offload_dir=tmp_path)
    engine = model.offload_engine
    assert engine.cleanup_dir is not None  # float16 blob written once, not float32 streamed per pass
    assert all(t.dtype == torch.float16 for t in engine.layers[0].layout.tensors.values())
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert_same(passes(model), passes(ref), atol=1e-2)
    engine.close()


def test_resident_tier_keeps_the_compute_dtype(tmp_path):
    tiny("llama").to(torch.float16).save_pretrained(tmp_path)
    model = load(tmp_path, offload="none", quant="fp32", hardware=BIG)
    assert all(t.dtype == torch.float32 for t in model.offload_engine.layers[0].layout.tensors.values())
    model.offload_engine.close()


# --- the parallel reader --------------------------------------------------------------------------------


def test_parallel_reads_return_the_same_bytes(tmp_path):
    data = torch.randint(0, 256, (3 * 65536 + 123,), dtype=torch.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    ops = [ReadOp(str(path), 100, 70000, 0), ReadOp(str(path), 80000, 90000, 70016)]
    want = torch.zeros(160016, dtype=torch.uint8)
    FileReader(threads=1).run(ops, want)
    reader = FileReader(threads=4, chunk=4096)
    got = torch.zeros_like(want)
    reader.run(ops, got)
    assert torch.equal(got, want)
    assert torch.equal(got[:70000], data[100:70100]) and torch.equal(got[70016:], data[80000:170000])
    with pytest.raises(OSError, match="short read"):
        reader.run([ReadOp(str(path), os.path.getsize(path) - 10, 4096 * 3, 0)], got)
    reader.close()
