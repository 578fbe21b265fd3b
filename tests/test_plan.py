"""The memory planner, on made-up hardware: what fits, what does not, and the one-line refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specexec_cli.errors import DoesNotFit, SpecexecError, UsageError
from specexec_cli.runtime.plan import (
    HardwareFacts,
    ModelFacts,
    Plan,
    PlanRequest,
    budget_device_bytes,
    gb,
    pass_bytes,
    plan,
)

GB = 10**9

# Llama-2-70B-ish: 80 layers, fp16 layer 1.71 GB, GQA KV 8 heads x 128 dims
LLAMA70 = ModelFacts(
    n_layers=80,
    layer_bytes=1_711_000_000,
    total_layer_bytes=80 * 1_711_000_000,
    resident_bytes=2_100_000_000,
    kv_bytes_per_token=2 * 80 * 8 * 128 * 2,
    vocab_size=32000,
    hidden_size=8192,
    intermediate_size=28672,
)
# the same in GPTQ 4-bit: ~4x fewer streamed bytes, one dequantized fp16 layer of scratch
LLAMA70_GPTQ = replace(
    LLAMA70, layer_bytes=450_000_000, total_layer_bytes=80 * 450_000_000, decode_bytes=1_711_000_000
)
A100 = HardwareFacts(device_mem_free=78 * GB, host_ram_available=200 * GB, disk_free=2000 * GB)
RTX4090_SMALL_HOST = HardwareFacts(
    device_mem_free=22 * GB, host_ram_available=int(21.7 * GB), disk_free=500 * GB
)


def test_message_units():
    assert gb(36.2e9) == "36.2 GB" and gb(1.8e6) == "1.8 MB" and gb(100_000) == "100 kB"


def test_logits_for_a_big_tree_are_counted():
    qwen = ModelFacts(
        n_layers=28,
        layer_bytes=1,
        total_layer_bytes=28,
        resident_bytes=0,
        kv_bytes_per_token=0,
        vocab_size=151_936,
        hidden_size=1536,
        intermediate_size=8960,
    )
    # 4096 rows x 152k vocab in fp16 is 1.2 GB, plus the float32 copy the sampler makes
    assert pass_bytes(qwen, 4096, 4096) >= 4096 * 151_936 * (2 + 4)


def test_70b_fp16_on_an_a100_streams_from_ram_with_a_big_budget():
    p = plan(A100, LLAMA70, PlanRequest(offload="ram", buffers=2, context_len=4096))
    assert p.offload == "ram" and p.buffers == 2 and p.resident_layers == 0
    assert p.budget == 4096  # the cap: everything fits
    assert p.host_bytes == LLAMA70.total_layer_bytes
    assert p.device_bytes <= A100.device_mem_free


def test_resident_layers_auto_fill_what_the_budget_leaves():
    req = PlanRequest(offload="ram", buffers=2, resident_layers=None, budget=2048, context_len=4096)
    p = plan(A100, LLAMA70, req)
    assert p.budget == 2048 and 10 < p.resident_layers < 80
    left = A100.device_mem_free - p.device_bytes
    assert 0 <= left < LLAMA70.layer_bytes  # one more layer would not fit
    assert p.host_bytes == (80 - p.resident_layers) * LLAMA70.layer_bytes


def test_host_ram_refusal_names_the_gap_and_the_way_out():
    with pytest.raises(SpecexecError) as exc:
        plan(RTX4090_SMALL_HOST, LLAMA70_GPTQ, PlanRequest(offload="ram"))
    assert not isinstance(exc.value, DoesNotFit)  # no smaller batch would help
    assert (
        str(exc.value)
        == "target needs 36.0 GB of host RAM, 21.7 GB available; use --offload disk or a 4-bit variant"
    )
    assert "\n" not in str(exc.value)
    # from disk, the same target runs (GPTQ is read in place: nothing to write first)
    p = plan(RTX4090_SMALL_HOST, LLAMA70_GPTQ, PlanRequest(offload="disk"))
    assert p.offload == "disk" and p.host_bytes == 2 * LLAMA70_GPTQ.layer_bytes  # pinned staging


def test_auto_picks_the_first_tier_that_fits():
    small = ModelFacts(
        n_layers=24,
        layer_bytes=100_000_000,
        total_layer_bytes=2_400_000_000,
        resident_bytes=500_000_000,
        kv_bytes_per_token=100_000,
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
    )
    assert plan(A100, small, PlanRequest(offload="auto")).offload == "none"
    assert plan(A100, LLAMA70, PlanRequest(offload="auto")).offload == "ram"
    assert plan(RTX4090_SMALL_HOST, LLAMA70_GPTQ, PlanRequest(offload="auto")).offload == "disk"


def test_offload_none_refusal():
    with pytest.raises(
        SpecexecError,
        match=r"^target needs 139\.7 GB of device memory "
        r"\(embeddings/head 2\.1 GB, 80 resident layers 136\.9 GB, KV cache for 2048 tokens and a 1-token "
        r"pass [0-9.]+ [kMG]B\), 78\.0 GB free; use --offload ram$",
    ):
        plan(A100, LLAMA70, PlanRequest(offload="none"))


def test_budget_too_big_says_the_largest_that_fits():
    tight = HardwareFacts(device_mem_free=10 * GB, host_ram_available=200 * GB, disk_free=0)
    req = PlanRequest(offload="ram", budget=4096, context_len=8192, reserve_bytes=GB)
    with pytest.raises(
        SpecexecError,
        match=r"^budget 4096 needs .* for KV cache, tree mask and logits, .* left after "
        r"weights and buffers; the largest budget that fits is (\d+)$",
    ) as exc:
        plan(tight, LLAMA70_GPTQ, req)
    largest = int(str(exc.value).rsplit(" ", 1)[1])
    assert 0 < largest < 4096
    ok = plan(
        tight, LLAMA70_GPTQ, PlanRequest(offload="ram", budget=largest, context_len=8192, reserve_bytes=GB)
    )
    assert ok.budget == largest
    auto = plan(tight, LLAMA70_GPTQ, PlanRequest(offload="ram", context_len=8192, reserve_bytes=GB))
    assert auto.budget == largest
    with pytest.raises(DoesNotFit):  # the type the CLI lowers a planned batch size on
        plan(
            tight,
            LLAMA70_GPTQ,
            PlanRequest(offload="ram", budget=largest + 1, context_len=8192, reserve_bytes=GB),
        )
    with pytest.raises(DoesNotFit):  # "auto" re-raises the last tier's refusal with its type
        plan(tight, LLAMA70_GPTQ, replace(req, offload="auto"))
    # a shorter context (fewer prompts in a batch) admits the same budget
    shorter = plan(tight, LLAMA70_GPTQ, PlanRequest(offload="ram", budget=largest + 1, context_len=4096,
                                                    reserve_bytes=GB))
    assert shorter.budget == largest + 1


def test_weights_that_do_not_fit_the_device():
    tiny_gpu = HardwareFacts(device_mem_free=3 * GB, host_ram_available=200 * GB, disk_free=0)
    with pytest.raises(
        SpecexecError,
        match=r"^target needs .* of device memory \(embeddings/head 2\.1 GB, "
        r"draft 1\.0 GB, 2 layer buffers 3\.4 GB, KV cache for \d+ tokens and a 1-token pass .*\), "
        r"3\.0 GB free",
    ):
        plan(tiny_gpu, LLAMA70, PlanRequest(offload="ram", draft_bytes=GB))


def test_disk_space_refusal():
    nf4 = ModelFacts(
        n_layers=80,
        layer_bytes=480_000_000,
        total_layer_bytes=80 * 480_000_000,
        resident_bytes=2 * GB,
        kv_bytes_per_token=327_680,
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        decode_bytes=1_711_000_000,
        disk_cache_bytes=80 * 480_000_000,
    )
    small_disk = HardwareFacts(device_mem_free=22 * GB, host_ram_available=16 * GB, disk_free=10 * GB)
    with pytest.raises(SpecexecError, match=r"^--offload disk needs 38\.4 GB of free disk .*, 10\.0 GB free"):
        plan(small_disk, nf4, PlanRequest(offload="disk"))


def test_cpu_is_one_pool():
    cpu = HardwareFacts(device_mem_free=24 * GB, host_ram_available=24 * GB, disk_free=100 * GB, unified=True)
    qwen15 = ModelFacts(
        n_layers=28,
        layer_bytes=186_000_000,
        total_layer_bytes=28 * 186_000_000,
        resident_bytes=934_000_000,
        kv_bytes_per_token=28_672,
        vocab_size=151_936,
        hidden_size=1536,
        intermediate_size=8960,
        dtype_bytes=4,
    )
    p = plan(cpu, qwen15, PlanRequest(offload="ram", context_len=2048))
    assert p.device_bytes + p.host_bytes <= cpu.host_ram_available
    with pytest.raises(
        SpecexecError, match=r"RAM \(the CPU is the device\).*use --offload disk or a 4-bit variant$"
    ):
        plan(HardwareFacts(4 * GB, 4 * GB, 100 * GB, unified=True), qwen15, PlanRequest(offload="ram"))
    # from disk, only the ring and the pass workspace need RAM
    p = plan(HardwareFacts(4 * GB, 4 * GB, 100 * GB, unified=True), qwen15, PlanRequest(offload="disk"))
    assert p.offload == "disk" and p.host_bytes == 0


def test_bad_requests():
    with pytest.raises(UsageError, match="--buffers must be >= 2"):
        plan(A100, LLAMA70, PlanRequest(buffers=1))
    with pytest.raises(UsageError, match="--resident-layers"):
        plan(A100, LLAMA70, PlanRequest(resident_layers=81))
    with pytest.raises(UsageError, match="--offload"):
        plan(A100, LLAMA70, PlanRequest(offload="ssd"))
    with pytest.raises(UsageError, match="--budget"):
        plan(A100, LLAMA70, PlanRequest(budget=-1))


def test_budget_0_is_plain_decoding_a_one_token_pass():
    p = plan(A100, LLAMA70, PlanRequest(offload="ram", budget=0, context_len=4096))
    assert p.budget == 0
    assert p.device_bytes >= budget_device_bytes(LLAMA70, PlanRequest(context_len=4096), 0)


# Qwen2.5-Coder-1.5B on a CPU (float32 compute, float16 layers upcast per call) and its 0.5B draft
QWEN15 = ModelFacts(n_layers=28, layer_bytes=94_000_000, total_layer_bytes=28 * 94_000_000,
                    resident_bytes=933_000_000, kv_bytes_per_token=2 * 28 * 2 * 128 * 4, vocab_size=151_936,
                    hidden_size=1536, intermediate_size=8960, dtype_bytes=4)
SHAPES = {"llama70": LLAMA70, "llama70-gptq": LLAMA70_GPTQ, "qwen1.5b": QWEN15}


@settings(max_examples=300, deadline=None)
@given(
    shape=st.sampled_from(sorted(SHAPES)),
    unified=st.booleans(),
    device_gb=st.floats(0.5, 100),
    host_gb=st.floats(0.5, 300),
    offload=st.sampled_from(["none", "ram", "disk", "auto"]),
    draft_gb=st.floats(0.01, 20),
    budget=st.one_of(st.none(), st.integers(1, 4096)),
    context=st.integers(16, 16384),
    resident=st.one_of(st.none(), st.integers(0, 80)),
)
def test_plain_decoding_is_never_given_less_memory_than_speculation_under_the_same_cap(
    shape, unified, device_gb, host_gb, offload, draft_gb, budget, context, resident
):
    """Equal memory: plain decoding planned under the same caps, with no draft and no tree (budget 0),
    fits whenever the speculative plan does and keeps at least as many target layers resident."""
    model = SHAPES[shape]
    resident = None if resident is None else min(resident, model.n_layers)
    hw = HardwareFacts(device_mem_free=int(device_gb * GB), host_ram_available=int(host_gb * GB),
                       disk_free=2000 * GB, unified=unified)
    speculative = PlanRequest(offload=offload, budget=budget, context_len=context, resident_layers=resident,
                              draft_bytes=int(draft_gb * GB),
                              draft_kv_bytes_per_token=model.kv_bytes_per_token // 4)
    plain_request = replace(speculative, budget=0, draft_bytes=0, draft_kv_bytes_per_token=0)
    try:
        spec = plan(hw, model, speculative)
    except SpecexecError:
        return  # nothing to compare: speculation does not fit here
    plain = plan(hw, model, plain_request)  # must not raise
    assert plain.resident_layers >= spec.resident_layers
    # the streaming tier is never a slower one: none < ram < disk in the order the planner tries them
    order = {"none": 0, "ram": 1, "disk": 2}
    assert order[plain.offload] <= order[spec.offload]
    pool = hw.host_ram_available if unified else hw.device_mem_free
    assert plain.device_bytes + (plain.host_bytes if unified else 0) <= pool


def test_every_layer_resident_needs_no_ring():
    p = plan(A100, LLAMA70_GPTQ, PlanRequest(offload="ram", resident_layers=80, budget=128))
    assert p.resident_layers == 80 and p.buffers == 0 and p.host_bytes == 0


@settings(max_examples=60, deadline=None)
@given(
    free=st.integers(4, 200),
    extra=st.integers(0, 50),
    context=st.sampled_from([512, 2048, 8192]),
    quantized=st.booleans(),
)
def test_more_device_memory_never_shrinks_the_budget(free, extra, context, quantized):
    model = LLAMA70_GPTQ if quantized else LLAMA70

    def budget(mem: int) -> int:
        hw = HardwareFacts(device_mem_free=mem * GB, host_ram_available=1000 * GB, disk_free=0)
        try:
            p = plan(hw, model, PlanRequest(offload="ram", context_len=context))
        except SpecexecError:
            return 0
        assert budget_device_bytes(model, PlanRequest(context_len=context), p.budget) + 0 <= mem * GB
        assert p.device_bytes <= mem * GB
        return p.budget

    assert budget(free + extra) >= budget(free)


def test_resident_layers_are_expanded_with_the_memory_left_and_never_past_it():
    """4-bit resident layers decode once into the compute dtype where the plan has room: all of them with
    plenty of memory, as many as fit under a cap, none when there is nothing to decode."""
    gptq = replace(LLAMA70, layer_bytes=445_000_000, total_layer_bytes=80 * 445_000_000,
                   expand_bytes=1_711_000_000 - 445_000_000)
    roomy = HardwareFacts(device_mem_free=400 * GB, host_ram_available=400 * GB, disk_free=0)
    p = plan(roomy, gptq, PlanRequest(offload="none", budget=64, context_len=2048))
    assert (p.resident_layers, p.expanded_layers) == (80, 80)
    fixed = plan(roomy, gptq, PlanRequest(offload="none", budget=64, context_len=2048, expand=False))
    assert fixed.expanded_layers == 0
    assert p.device_bytes == fixed.device_bytes + 80 * gptq.expand_bytes
    capped = HardwareFacts(device_mem_free=fixed.device_bytes + 10 * gptq.expand_bytes + 1,
                           host_ram_available=400 * GB, disk_free=0)
    p = plan(capped, gptq, PlanRequest(offload="none", budget=64, context_len=2048))
    assert p.expanded_layers == 10 and p.device_bytes <= capped.device_mem_free
    assert plan(roomy, LLAMA70, PlanRequest(offload="none", budget=64)).expanded_layers == 0  # views: nothing
    streamed = plan(roomy, gptq, PlanRequest(offload="ram", resident_layers=4, budget=64))
    assert streamed.expanded_layers == 4  # only resident layers, never streamed ones


def test_an_offload_tier_that_streams_nothing_is_said_only_when_the_planner_chose_it():
    """`--offload disk` with every layer resident has no effect: said when the planner chose the
    resident layers, not for a placement that pins them (a profile's: the tuner measured that
    placement, and float16 layers kept narrow in the disk tier are not tier none's)."""
    from specexec_cli.engine import Placement, unused_offload_flags

    everything = Plan(offload="disk", buffers=0, resident_layers=28, budget=16, device_bytes=1, host_bytes=0,
                      disk_bytes=0)
    assert "has no effect" in unused_offload_flags(Placement("disk"), everything, 28)[0]
    assert unused_offload_flags(Placement("disk", resident_layers=28), everything, 28) == []
