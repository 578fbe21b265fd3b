"""The fused Triton GPTQ kernel equals the torch reference bit for bit, and the dispatch keeps CPU tensors
on torch without importing triton.

The kernel runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, read when the kernel
is defined, so that check runs in a subprocess) and for real with --device cuda /
SPECEXEC_TEST_DEVICE=cuda. Both skip when triton is not installed (CI does not install it), unless
SPECEXEC_REQUIRE_TRITON=1.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from specexec_cli.runtime import gptq_dispatch, quant

pytestmark = pytest.mark.usefixtures("one_thread")



def has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked)
        return False


HAS_TRITON = has_triton()
# scripts/gpu_check.py sets SPECEXEC_REQUIRE_TRITON=1: there a missing triton fails instead of skipping
needs_triton = pytest.mark.skipif(
    not HAS_TRITON and os.environ.get("SPECEXEC_REQUIRE_TRITON") != "1",
    reason="triton is not installed (optional: pip install triton, or the 'gpu' extra)",
)
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# (bits, n_in, n_out, group_size, scales dtype, output dtype, checkpoint format)
# 256/128: every 64-row block in one group; 96/32: per-row groups and a partial row block;
# 512/-1: one group; 208 columns: a partial column block (and divisible by 16 for 2 bits)
CASES = [
    (bits, n_in, 208, gs, F16, dtype, fmt)
    for bits in (2, 4, 8)
    for n_in, gs in ((256, 128), (96, 32), (512, -1))
    for dtype in (F16, BF16, F32)
    for fmt in (("gptq",) if gs != 128 else ("gptq", "gptq_v2"))
] + [
    (4, 256, 128, 128, BF16, BF16, "gptq"),
    (4, 256, 128, 128, BF16, F16, "gptq"),
    (8, 96, 64, 32, F32, F16, "gptq_v2"),
    (4, 128, 64, 64, F32, BF16, "gptq"),
]


# act-order (desc_act) cases: a permuted g_idx, each group still holding group_size rows
ACT_ORDER_CASES = [
    (bits, n_in, 208, gs, F16, dtype, "gptq")
    for bits in (2, 4, 8)
    for n_in, gs in ((256, 128), (96, 32))
    for dtype in (F16, BF16, F32)
] + [(4, 256, 128, 64, BF16, BF16, "gptq_v2"), (4, 128, 64, 32, F32, F16, "gptq")]


def make_case(bits: int, n_in: int, n_out: int, group_size: int, scales_dtype: torch.dtype, fmt: str,
              seed: int = 0, act_order: bool = False) -> dict[str, torch.Tensor]:
    """Random GPTQ tensors in the checkpoint layout: trivial g_idx, or a permuted one (`act_order`)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size <= 0 else n_in // group_size
    top = 1 << bits
    q = torch.randint(0, top, (n_out, n_in), generator=gen)
    zeros = torch.randint(1 if fmt == "gptq" else 0, top, (groups, n_out), generator=gen)
    scales = torch.rand(groups, n_out, generator=gen) * 0.02 + 0.001
    rows = torch.randperm(n_in, generator=gen) if act_order else torch.arange(n_in)
    g_idx = rows // (n_in // groups)
    t = quant.quantize_gptq_reference(q, zeros, scales, g_idx, bits, fmt)
    t["scales"] = scales.to(scales_dtype)
    return t


def ties_case() -> tuple[dict[str, torch.Tensor], int]:
    """Scales 1 + j/256: many products fall exactly halfway between two bfloat16 (or float16) values."""
    n_in, n_out = 96, 256
    q = torch.randint(0, 16, (n_out, n_in), generator=torch.Generator().manual_seed(1))
    zeros = torch.full((3, n_out), 8)
    scales = 1 + torch.arange(3 * n_out).remainder(256).view(3, n_out) / 256
    t = quant.quantize_gptq_reference(q, zeros, scales, torch.arange(n_in) // 32, 4, "gptq")
    return t, 1


def check_cases(device: str) -> int:
    """Kernel on `device` vs the torch reference on CPU (and on `device`): exact equality for every case.
    Returns how many comparisons passed (raises AssertionError on the first mismatch)."""
    from specexec_cli.runtime import gptq_triton

    runs = []
    for act_order, cases in ((False, CASES), (True, ACT_ORDER_CASES)):
        for bits, n_in, n_out, gs, sdt, dtype, fmt in cases:
            t = make_case(bits, n_in, n_out, gs, sdt, fmt, act_order=act_order)
            g_idx = t["g_idx"] if act_order else None
            runs.append((t, g_idx, bits, 1 if fmt == "gptq" else 0, dtype))
    ties, offset = ties_case()
    for sdt in (F16, BF16, F32):
        for dtype in (BF16, F16):
            runs.append(({**ties, "scales": ties["scales"].to(sdt)}, None, 4, offset, dtype))
    done = 0
    for t, g_idx, bits, zero_offset, dtype in runs:
        args = (t["qweight"], t["qzeros"], t["scales"])
        expected = quant.dequantize_gptq(*args, g_idx, bits, zero_offset, dtype)  # [out, in] on CPU
        g_dev = None if g_idx is None else g_idx.to(device)
        # every other run writes into a caller's [in, out] buffer, as the offload engine's scratch
        out = torch.full(tuple(reversed(expected.shape)), float("nan"), dtype=dtype, device=device) if (
            done % 2) else None
        got = gptq_triton.dequantize(*(a.to(device) for a in args), bits, zero_offset, dtype, g_dev, out)
        if out is not None:
            assert got.data_ptr() == out.data_ptr()
        what = (f"{bits} bits, {tuple(expected.shape)}, {t['scales'].dtype} scales -> {dtype}, "
                f"{'act-order' if g_idx is not None else 'trivial'} g_idx")
        assert got.shape == expected.shape and got.dtype == dtype, what
        assert torch.equal(got.cpu(), expected), what
        if device != "cpu":
            on_device = quant.dequantize_gptq(*(a.to(device) for a in args), g_dev, bits, zero_offset, dtype)
            assert torch.equal(got, on_device), what + " (torch on the device)"
        done += 1
    return done


def expected_runs() -> int:
    return len(CASES) + len(ACT_ORDER_CASES) + 6


def python(code: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env)


# --- the kernel ------------------------------------------------------------------------------------------


@needs_triton
def test_kernel_equals_torch_under_the_interpreter(test_device):
    if test_device == "cuda":  # the compiled kernel is checked on the GPU instead; minutes of CPU saved
        pytest.skip("with --device cuda the compiled kernel runs the same cases")
    code = "import test_gptq_triton as t; print(t.check_cases('cpu'))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    result = python(code, env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) == expected_runs()


@needs_triton
def test_kernel_equals_torch_on_cuda(test_device, monkeypatch):
    if test_device != "cuda":
        pytest.skip("the compiled kernel needs --device cuda (or SPECEXEC_TEST_DEVICE=cuda)")
    assert check_cases("cuda") == expected_runs()
    # and the dispatch uses it
    t = make_case(4, 256, 128, 128, F16, "gptq")
    args = [a.cuda() for a in (t["qweight"], t["qzeros"], t["scales"])]
    assert gptq_dispatch.triton_kernels() is not None
    w = gptq_dispatch.dequantize_gptq(*args, None, 4, 1, BF16)
    expected = quant.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], None, 4, 1, BF16)
    assert torch.equal(w.cpu(), expected)
    scratch = torch.empty(256, 128, dtype=BF16, device="cuda")  # the engine's reused [in, out] scratch
    w = gptq_dispatch.dequantize_gptq(*args, None, 4, 1, BF16, scratch)
    assert w.data_ptr() == scratch.data_ptr() and torch.equal(w.cpu(), expected)
    # an act-order g_idx goes through the kernel too
    t = make_case(4, 256, 128, 64, F16, "gptq", act_order=True)
    kernels, calls = gptq_dispatch.triton_kernels(), []
    kernel = kernels.dequantize
    monkeypatch.setattr(kernels, "dequantize", lambda *a: calls.append(a) or kernel(*a))
    w = gptq_dispatch.dequantize_gptq(*(t[k].cuda() for k in ("qweight", "qzeros", "scales", "g_idx")),
                                      4, 1, F16)
    assert len(calls) == 1
    expected = quant.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1, F16)
    assert torch.equal(w.cpu(), expected)


@needs_triton
def test_kernel_refuses_what_it_does_not_handle():
    from specexec_cli.runtime import gptq_triton

    assert gptq_triton.supports(4, F16, BF16) and not gptq_triton.supports(3, F16, F16)
    assert not gptq_triton.supports(4, F16, torch.float64)
    t = make_case(4, 256, 128, 128, F16, "gptq")
    with pytest.raises(ValueError, match="3 bits"):
        gptq_triton.dequantize(t["qweight"], t["qzeros"], t["scales"], 3, 1, F16)
    with pytest.raises(ValueError, match="do not agree"):
        gptq_triton.dequantize(t["qweight"], t["qzeros"][:, :-1], t["scales"], 4, 1, F16)
    with pytest.raises(ValueError, match="out must be"):  # the scratch must be [in, out] in the dtype
        gptq_triton.dequantize(t["qweight"], t["qzeros"], t["scales"], 4, 1, F16,
                               out=torch.empty(128, 256, dtype=F16))


# --- the dispatch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("g_idx", [False, True])
def test_cpu_tensors_stay_on_torch(monkeypatch, g_idx):
    monkeypatch.setattr(gptq_dispatch, "triton_kernels", lambda: pytest.fail("asked for triton on CPU"))
    t = make_case(4, 128, 64, 32, F16, "gptq")
    g = t["g_idx"] if g_idx else None
    w = gptq_dispatch.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], g, 4, 1, BF16)
    assert torch.equal(w, quant.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], g, 4, 1, BF16))


def test_dequantizing_on_cpu_imports_no_triton():
    code = (
        "import json, sys, torch\n"
        "from specexec_cli.runtime import quant\n"
        "from specexec_cli.runtime.layout import build_param\n"
        "from specexec_cli.runtime import gptq_dispatch\n"
        "q = torch.randint(0, 16, (64, 128)); z = torch.full((4, 64), 8); s = torch.ones(4, 64)\n"
        "t = quant.quantize_gptq_reference(q, z, s, torch.arange(128) // 32)\n"
        "args = (t['qweight'], t['qzeros'], t['scales'], None, 4, 1, torch.float16)\n"
        "w = gptq_dispatch.dequantize_gptq(*args)\n"
        "print(json.dumps({'triton': 'triton' in sys.modules,\n"
        "                  'kernel': 'specexec_cli.runtime.gptq_triton' in sys.modules,\n"
        "                  'ok': bool(torch.equal(w, (q - 8).to(torch.float16)))}))\n"
    )
    result = python(code, {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"triton": False, "kernel": False, "ok": True}


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """The dispatch as if triton had never been asked for in this process."""
    import specexec_cli.runtime as runtime_pkg

    monkeypatch.setattr(gptq_dispatch, "_state", "untried")
    monkeypatch.setattr(gptq_dispatch, "_kernels", None)
    monkeypatch.delitem(sys.modules, "specexec_cli.runtime.gptq_triton", raising=False)
    monkeypatch.delattr(runtime_pkg, "gptq_triton", raising=False)
    return gptq_dispatch


def test_no_triton_means_torch(monkeypatch, fresh_dispatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what an install without triton looks like
    assert fresh_dispatch.triton_kernels() is None
    assert fresh_dispatch._state == "off"


def test_env_turns_the_kernel_off(monkeypatch, fresh_dispatch):
    monkeypatch.setenv("SPECEXEC_GPTQ_TRITON", "0")
    assert fresh_dispatch.triton_kernels() is None


def test_a_failing_kernel_falls_back_once(monkeypatch, fresh_dispatch, caplog):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("Failed to find C compiler")

    fake = SimpleNamespace(supports=lambda *a: True, dequantize=broken)
    monkeypatch.setattr(fresh_dispatch, "_kernels", fake)
    monkeypatch.setattr(fresh_dispatch, "_state", "ready")
    monkeypatch.setattr(fresh_dispatch.quant, "dequantize_gptq", lambda *a: "torch")
    cuda_like, scales = SimpleNamespace(is_cuda=True), SimpleNamespace(dtype=F16)
    with caplog.at_level(logging.WARNING, logger=fresh_dispatch.__name__):
        for _ in range(2):
            assert fresh_dispatch.dequantize_gptq(cuda_like, None, scales, None, 4, 1, F16) == "torch"
    assert len(calls) == 1 and fresh_dispatch.triton_kernels() is None
    warnings = [r.message for r in caplog.records if "Triton" in r.message]
    assert len(warnings) == 1 and "RuntimeError: Failed to find C compiler" in warnings[0]
